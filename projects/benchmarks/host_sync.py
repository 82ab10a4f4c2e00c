"""Count the device->host synchronisations a piece of PyTorch code would make on a GPU.

On a GPU, reading a tensor's value on the host (``.item()``, ``.tolist()``, ``bool(t)``,
``int(t)``, ``.cpu()``) blocks Python until every queued kernel has finished. So do the ops whose
output size depends on the data (``nonzero``, boolean-mask indexing, ``unique``, ``bincount``,
``masked_select``, ...). Each such sync stops the host from queueing work ahead of the GPU, so
the forward pass should make none that it does not need.

:class:`HostSyncCounter` is a ``torch.overrides.TorchFunctionMode``. It sees every torch function
and Tensor method called *directly* by the code under it (not the ops inside a torch function that
is itself written in Python, e.g. ``F.multi_head_attention_forward``), and records the ones above
with the caller's file and line. It works on any device. On the CPU it counts the calls that
*would* sync on a GPU; nothing is mocked, and every call runs unchanged. On CUDA,
``torch.cuda.set_sync_debug_mode("warn")`` is the driver-level check; ``model_stats.py --count-syncs``
uses both.

    with HostSyncCounter() as syncs:
        model.encoder(srcs, masks, pos)
    print(syncs.total, syncs.by_location())
"""
import collections
import os
import sys
from typing import Counter, Dict, List, Tuple

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HostSyncCounter", "SYNC_METHODS", "DATA_DEPENDENT_OPS"]

# Tensor -> Python value, or a device -> host copy.
SYNC_METHODS = frozenset({
    "item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__", "cpu",
    "__format__", "__array__", "is_nonzero", "equal", "allclose",
})
# Ops whose output shape depends on tensor values: a GPU implementation must sync to size the output.
DATA_DEPENDENT_OPS = frozenset({
    "nonzero", "nonzero_static_", "argwhere", "masked_select", "unique", "unique_consecutive",
    "_unique", "_unique2", "bincount", "repeat_interleave",
})
_HERE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _name(func) -> str:
    return getattr(func, "__name__", None) or str(func)


def _has_bool_index(index) -> bool:
    """Whether a ``__getitem__`` / ``__setitem__`` index holds a bool/uint8 tensor (mask indexing,
    which runs ``nonzero``)."""
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in items)


def _is_sync(name: str, args, kwargs) -> bool:
    if name in SYNC_METHODS or name in DATA_DEPENDENT_OPS:
        if name == "repeat_interleave":  # only with tensor repeats and no output_size
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
            return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
        return True
    if name in ("__getitem__", "__setitem__") and len(args) > 1:
        return _has_bool_index(args[1])
    if name == "where":  # torch.where(cond) with one argument == nonzero
        return len(args) + len(kwargs) == 1
    if name == "to" and args and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
        # .to("cpu") of a device tensor. (On a CPU run, ``.to(device)`` cannot be told apart from
        # ``.to("cpu")``; explicit ``.cpu()`` calls are counted on every device.)
        for a in list(args[1:]) + [kwargs.get("device")]:
            if isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu":
                return True
    return False


def _caller() -> str:
    """``file:line`` of the innermost frame outside torch and this module."""
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path != _HERE and not path.startswith(_TORCH_DIR):
            return f"{os.path.relpath(path)}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


class HostSyncCounter(TorchFunctionMode):
    """Context manager counting calls that synchronise the host with the device (see module doc).

    Attributes:
        events: list of ``(op name, "file:line")`` in call order.
    """

    def __init__(self):
        super().__init__()
        self.events: List[Tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if _is_sync(name, args, kwargs):
            self.events.append((name, _caller()))
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return len(self.events)

    def by_op(self) -> Counter[str]:
        return collections.Counter(name for name, _ in self.events)

    def by_location(self) -> Dict[str, int]:
        """``{"file:line op": count}``, most frequent first."""
        counts = collections.Counter(f"{loc} {name}" for name, loc in self.events)
        return dict(counts.most_common())
