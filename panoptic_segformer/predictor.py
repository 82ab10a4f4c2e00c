"""``PanopticSegFormerPredictor``: Detectron2's ``DefaultPredictor`` for arrays as users have them.

``DefaultPredictor`` takes an (H, W, 3) BGR array. Given a grayscale (H, W) array it fails with an
``IndexError`` inside its own pre-processing, a channels-first (3, H, W) or an empty array inside
the resize, before the model is reached; Detectron2's class cannot be changed from here. This
subclass converts what can be converted unambiguously (grayscale -> 3 channels, BGRA -> BGR) and
rejects every other layout with a ``ValueError`` naming the shape and the expected layout
(:func:`as_bgr_image`). Non-finite values and wrong tensor shapes that reach the model by any path
(plain ``DefaultPredictor``, a direct ``model(inputs)`` call) are rejected by the model's
``check_input_image``. Weights are loaded with :class:`.checkpoint.PanopticSegFormerCheckpointer`
(class heads of another dataset are an error unless SKIP_MISMATCHED_CLASS_HEADS).
"""
import numpy as np
from detectron2.engine import DefaultPredictor

from .checkpoint import PanopticSegFormerCheckpointer
from .data.official_augmentation import build_official_test_augmentation, check_augmentation_config

__all__ = ["PanopticSegFormerPredictor", "as_bgr_image"]

_LAYOUT = ("an (H, W, 3) BGR array as cv2.imread returns it; (H, W) or (H, W, 1) grayscale and "
           "(H, W, 4) BGRA arrays are converted")


def as_bgr_image(image) -> np.ndarray:
    """(H, W, 3) BGR view/copy of `image`: (H, W, 3) as is, (H, W) and (H, W, 1) grayscale repeated
    to 3 channels, (H, W, 4) BGRA without its alpha channel.

    Raises:
        ValueError: `image` is not a numpy array, is empty, or has another layout (e.g. a
            channels-first (3, H, W) array); the message names the shape and the expected layout.
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image is a {type(image).__name__}, expected a numpy array: {_LAYOUT}")
    if image.size == 0:
        raise ValueError(f"image array of shape {image.shape} is empty: expected {_LAYOUT}")
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2] if image.ndim == 3 else None
    if channels == 3:
        return image
    if channels == 1:
        return np.repeat(image, 3, axis=2)
    if channels == 4:
        return image[:, :, :3]
    hint = (" (channels-first? use image.transpose(1, 2, 0))"
            if image.ndim == 3 and image.shape[0] in (1, 3, 4) else "")
    raise ValueError(f"image array of shape {image.shape}: expected {_LAYOUT}{hint}")


class PanopticSegFormerPredictor(DefaultPredictor):
    """``DefaultPredictor(cfg)`` that also accepts grayscale and BGRA arrays and rejects other
    layouts clearly (:func:`as_bgr_image`), and loads MODEL.WEIGHTS with
    :class:`PanopticSegFormerCheckpointer`. Same outputs as ``DefaultPredictor`` on (H, W, 3) BGR, except
    that with ``INPUT.AUGMENTATION "official"`` the image is resized as the official test mapper does
    (``mmcv.imrescale`` with cv2 bilinear) instead of with ``ResizeShortestEdge``."""

    def __init__(self, cfg):
        blank = cfg.clone()
        blank.defrost()
        blank.MODEL.WEIGHTS = ""  # DefaultPredictor would load with DetectionCheckpointer
        super().__init__(blank)
        self.cfg = cfg.clone()
        if check_augmentation_config(cfg) == "official":  # mmcv.imrescale (cv2), as the test mapper
            self.aug = build_official_test_augmentation(cfg)[0]
        PanopticSegFormerCheckpointer.from_config(self.model, cfg).load(cfg.MODEL.WEIGHTS)

    def __call__(self, original_image):
        """Predictions for one image array (see :func:`as_bgr_image` for the accepted layouts)."""
        return super().__call__(as_bgr_image(original_image))
