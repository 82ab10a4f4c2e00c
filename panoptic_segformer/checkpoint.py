"""Loading ``MODEL.WEIGHTS`` with clear errors.

Detectron2's ``DetectionCheckpointer`` (fvcore's ``Checkpointer``) skips every tensor whose shape
differs from the model's with a warning. For the class heads that is how a checkpoint of another
dataset (e.g. COCO's 80 thing / 53 stuff classes with the 4 / 3 classes of ``shapes``) would silently
leave random classifiers, and ``--eval-only`` would score them. :class:`PanopticSegFormerCheckpointer`
makes a shape mismatch in a class head or in the stuff queries an error naming the tensors and both
shapes, unless ``MODEL.PANOPTIC_SEGFORMER.SKIP_MISMATCHED_CLASS_HEADS`` asks for fine-tuning from
another dataset. A file that is not a checkpoint at all (a text file, say) is an error naming the
file, not the unpickler's ``IndexError: pop from empty list``.
"""
import re

from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["PanopticSegFormerCheckpointer", "checkpoint_load_error", "is_class_head_key"]

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
