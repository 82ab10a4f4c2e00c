"""Registry of panoptic post-processors (paper Sec. 3.5, Table 7, Table B.2).

The registry is ``fvcore.common.registry.Registry`` -- the very class Detectron2 re-exports as
``detectron2.utils.registry.Registry`` -- so no Detectron2 import is needed here.
"""

from typing import Any, Callable, List, Optional, TypeVar

from fvcore.common.registry import Registry

__all__ = [
    "POSTPROCESSOR_REGISTRY",
    "UnknownPostProcessorError",
    "build_postprocessor",
    "register_postprocessor",
    "registered_postprocessors",
]

POSTPROCESSOR_REGISTRY = Registry("PANOPTIC_POSTPROCESSOR")
POSTPROCESSOR_REGISTRY.__doc__ = """
Registry for panoptic post-processors: per-image merging of query predictions into
Detectron2's ``(panoptic_seg, segments_info)``.

A registered object is a class whose plain constructor takes its thresholds as keyword
arguments and whose instances are called with the common signature (see
``panoptic_segformer.postprocessing.common``)::

    panoptic_seg, segments_info = obj(mask_probs, class_probs, labels, is_thing,
                                      mask_logits=None, class_distribution=None)

Optional members (``masks_to_image``, ``max_mask_value``, ``instance_scores``) tell the
meta-architecture how to prepare the inputs and rank its ``instances`` output; see
``panoptic_segformer.postprocessing.common``.

Built-in names: "mask_wise" (Sec. 3.5, Algorithm 1), "pixel_argmax" (DETR), "pixel_argmax_prob"
(MaskFormer's p*), "heuristic" (Kirillov et al.) and "official" (the official code's inference, for
converted official checkpoints). Register a class under its class name with
``@POSTPROCESSOR_REGISTRY.register()`` or under any name with ``@register_postprocessor("name")``.
"""

T = TypeVar("T")


class UnknownPostProcessorError(KeyError):
    """Raised by :func:`build_postprocessor` for a name that is not registered."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


def register_postprocessor(name: Optional[str] = None) -> Callable[[T], T]:
    """Class decorator registering a post-processor under ``name`` (default: its ``__name__``).

    fvcore's ``Registry.register`` always uses ``__name__``; this helper calls the registry's own
    ``_do_register`` so built-ins can use short names such as "mask_wise". Registering a taken
    name raises AssertionError (fvcore's duplicate check).
    """

    def deco(obj: T) -> T:
        POSTPROCESSOR_REGISTRY._do_register(name or obj.__name__, obj)  # noqa: SLF001
        return obj

    return deco


def registered_postprocessors() -> List[str]:
    """Sorted names of all registered post-processors."""
    return sorted(name for name, _ in POSTPROCESSOR_REGISTRY)


def build_postprocessor(name: str, **kwargs: Any) -> Any:
    """Instantiate the post-processor registered as ``name`` with constructor ``kwargs``.

    Raises:
        UnknownPostProcessorError (a KeyError): ``name`` is not registered; the message lists
            the registered names.
    """
    if name not in POSTPROCESSOR_REGISTRY:
        raise UnknownPostProcessorError(
            f"Unknown panoptic post-processor {name!r}; registered names: "
            f"{', '.join(repr(n) for n in registered_postprocessors())}")
    return POSTPROCESSOR_REGISTRY.get(name)(**kwargs)
