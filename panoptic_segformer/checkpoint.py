"""Loading ``MODEL.WEIGHTS`` with clear errors.

Detectron2's ``DetectionCheckpointer`` (fvcore's ``Checkpointer``) skips every tensor whose shape
differs from the model's with a warning. For the class heads that is how a checkpoint of another
dataset (e.g. COCO's 80 thing / 53 stuff classes with the 4 / 3 classes of ``shapes``) would silently
leave random classifiers, and ``--eval-only`` would score them. :class:`PanopticSegFormerCheckpointer`
makes a shape mismatch in a class head or in the stuff queries an error naming the tensors and both
shapes, unless ``MODEL.PANOPTIC_SEGFORMER.SKIP_MISMATCHED_CLASS_HEADS`` asks for fine-tuning from
another dataset. A file that is not a checkpoint at all (a text file, say) is an error naming the
file, not the unpickler's ``IndexError: pop from empty list``.

Checkpoints and the ``last_checkpoint`` file that names the newest are written atomically
(:func:`atomic_write`: a temporary file in the same folder, flushed and fsync'ed, then ``os.replace``):
a process killed while writing (a preempted job's SIGKILL) or a full disk leaves the previous checkpoint
and ``last_checkpoint`` as they were, so ``--resume`` continues from the previous checkpoint.
"""
import errno
import io
import logging
import os
import re

import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import Checkpointer

__all__ = ["PanopticSegFormerCheckpointer", "checkpoint_load_error", "is_class_head_key", "atomic_write",
           "write_checkpoint_data", "TEMP_SUFFIX"]

# Temporary files are ".<name>" + TEMP_SUFFIX in the checkpoint's folder (hidden, and not "*.pth": never
# listed as checkpoints by Detectron2's get_all_checkpoint_files).
TEMP_SUFFIX = ".incomplete"


def write_checkpoint_data(data, f) -> None:
    """Serialise checkpoint `data` into the open binary file `f` (``torch.save``)."""
    torch.save(data, f)


def atomic_write(path: str, write, mode: str = "wb") -> None:
    """Write `path` with ``write(f)`` so that `path` is either its old content or the complete new one:
    ``write`` fills ``<folder>/.<name>.incomplete``, which is flushed, fsync'ed and renamed over `path`
    (``os.replace``), then the folder is fsync'ed. On any error the temporary file is removed and `path`
    is untouched; an OSError (a full disk, a quota) is re-raised naming `path` and saying so."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, "." + name + TEMP_SUFFIX)
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            full = " (the disk is full)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            raise OSError(e.errno, f"could not write {path}{full}: {e.strerror or e}. The previous file at "
                                   f"that path, if any, is unchanged") from e
        raise
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a folder; the rename itself is atomic
        pass
    finally:
        os.close(fd)

# Tensors whose shape depends on the number of classes: the thing classifiers of the location and
# mask decoders (``class_embed``, ``thing_class_embed``, over all classes in the joint-matching
# baseline) and the stuff queries (one per stuff class, Sec. 3.3.1).
_CLASS_HEAD = re.compile(r"(^|\.)(\w*class_embed|stuff_query_embed)\.")


def is_class_head_key(key: str) -> bool:
    """Whether state-dict `key` is a class head or stuff-query tensor (its shape depends on the
    dataset's number of classes)."""
    return bool(_CLASS_HEAD.search(key))


def _file_kind(path):
    """A few words on what `path` is, judged from its first bytes, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head:
        return "an empty file"
    if head.startswith(b"PK"):
        return "a zip archive that torch.load cannot read (truncated, or not written by torch.save)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return "a text file"


def checkpoint_load_error(path, error, what="checkpoint"):
    """ValueError for a `what` file that torch.load / pickle could not read: names the file, says
    what it is not (and what it looks like), and keeps the loader's own message."""
    kind = _file_kind(path)
    looks = f"; it is {kind}" if kind else ""
    return ValueError(
        f"{path}: not a {what} that can be loaded (neither a torch.save file nor a Detectron2 .pkl "
        f"pickle){looks}. Loader error: {type(error).__name__}: {error}")


class PanopticSegFormerCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that refuses a checkpoint whose class heads or stuff queries have
    other shapes than the model's (see the module docstring) and names unreadable files.

    Args:
        model, save_dir, checkpointables: as ``DetectionCheckpointer``.
        skip_mismatched_class_heads: ``MODEL.PANOPTIC_SEGFORMER.SKIP_MISMATCHED_CLASS_HEADS``: load
            the checkpoint without its mismatched class heads (fine-tuning from another dataset),
            with Detectron2's warning for each.
    """

    def __init__(self, model, save_dir="", *, skip_mismatched_class_heads=False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.skip_mismatched_class_heads = bool(skip_mismatched_class_heads)
        self._received = {}  # path -> bytes of a checkpoint received from rank 0 (see load_bytes)

    def _local(self) -> bool:
        return "://" not in str(self.save_dir)

    def save(self, name, **kwargs):
        """Detectron2's ``save`` (model, checkpointables, `kwargs`; main process only), written atomically
        (:func:`atomic_write`), then ``last_checkpoint`` atomically."""
        if not self._local():
            return super().save(name, **kwargs)
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        os.makedirs(self.save_dir, exist_ok=True)
        atomic_write(save_file, lambda f: write_checkpoint_data(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        if not self._local():
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write(os.path.join(self.save_dir, "last_checkpoint"), lambda f: f.write(last_filename_basename),
                     mode="w")

    def remove_incomplete(self):
        """Remove temporary files of writes that a killed process left in ``save_dir``; returns them."""
        if not self._local() or not os.path.isdir(self.save_dir):
            return []
        removed = [os.path.join(self.save_dir, n) for n in os.listdir(self.save_dir)
                   if n.startswith(".") and n.endswith(TEMP_SUFFIX)]
        for path in removed:
            os.remove(path)
        if removed:
            self.logger.warning(f"Removed the incomplete writes of an interrupted run: {', '.join(removed)}")
        return removed

    def load_agreed(self, path, data=None):
        """Load `path` with every checkpointable on a process that agreed on `path` with the others
        (``panoptic_segformer.resume.agree_on_resume_checkpoint``): no collective (Detectron2's ``load``
        all-gathers whether each process has the file and otherwise leaves the optimizer and iteration of a
        process without it at their start). `data`: the file's bytes, for a process without a copy of it."""
        if data is None:
            return Checkpointer.load(self, path)
        self.logger.info(f"[Checkpointer] Loading from {path} (rank 0's copy) ...")
        self._received[path] = data
        try:
            checkpoint = self._load_file(path)
        finally:
            del self._received[path]
        incompatible = self._load_model(checkpoint)
        if incompatible is not None:
            self._log_incompatible_keys(incompatible)
        for key, obj in self.checkpointables.items():
            if key in checkpoint:
                obj.load_state_dict(checkpoint.pop(key))
        return checkpoint

    @classmethod
    def from_config(cls, model, cfg, save_dir="", **kwargs):
        """The checkpointer of `model` with `cfg`'s SKIP_MISMATCHED_CLASS_HEADS."""
        skip = cfg.MODEL.PANOPTIC_SEGFORMER.SKIP_MISMATCHED_CLASS_HEADS
        return cls(model, save_dir, skip_mismatched_class_heads=skip, **kwargs)

    def load(self, path, *args, **kwargs):
        try:
            return super().load(path, *args, **kwargs)
        except OSError as e:  # urllib's URLError and socket errors of a download
            if "://" not in str(path) or str(path).startswith("file://"):
                raise
            raise OSError(
                f"MODEL.WEIGHTS {path}: cannot be downloaded ({type(e).__name__}: {e}). Download it on a "
                f"machine with internet access and pass MODEL.WEIGHTS /path/to/the/file, or MODEL.WEIGHTS "
                f"\"\" to start from random initialisation.") from e

    def _load_file(self, filename):
        if filename in self._received:
            return torch.load(io.BytesIO(self._received[filename]), map_location=torch.device("cpu"))
        try:
            return super()._load_file(filename)
        except Exception as e:  # torch.load / pickle raise anything from KeyError to IndexError
            raise checkpoint_load_error(filename, e) from e

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        heads = [(k, a, b) for k, a, b in incompatible.incorrect_shapes if is_class_head_key(k)]
        if heads and not self.skip_mismatched_class_heads:
            listed = "; ".join(f"{k}: {tuple(a)} in the checkpoint, {tuple(b)} in the model"
                               for k, a, b in heads)
            raise ValueError(
                f"the checkpoint's class heads / stuff queries do not fit the model's number of classes "
                f"(MODEL.PANOPTIC_SEGFORMER.NUM_THING_CLASSES / NUM_STUFF_CLASSES, from the dataset): "
                f"{listed}. Use weights trained on this dataset, or set "
                f"MODEL.PANOPTIC_SEGFORMER.SKIP_MISMATCHED_CLASS_HEADS True to fine-tune from them "
                f"(those tensors then keep their random initialisation)")
        return incompatible
