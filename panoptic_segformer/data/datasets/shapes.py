"""The built-in synthetic panoptic dataset ``shapes``.

A small, CPU-friendly panoptic segmentation dataset written in the *real* COCO panoptic format
(Kirillov et al., "Panoptic Segmentation"; the format the paper evaluates on, Sec. 4.1), so that the
whole Panoptic SegFormer pipeline (data loading, training, mask-wise merging, PQ evaluation) can be
exercised in minutes without downloading COCO:

* ``<root>/<split>/images/%06d.jpg``: RGB images (JPEG, like COCO).
* ``<root>/<split>/panoptic/%06d.png``: RGB PNGs whose pixel value encodes the segment id as
  ``id = R + 256 * G + 256**2 * B``; ``0`` is void (unlabeled).
* ``<root>/<split>/panoptic.json``: ``{"images", "annotations", "categories"}``; every annotation
  has ``segments_info`` entries ``{"id", "category_id", "iscrowd", "bbox": [x, y, w, h], "area"}``.
* ``<root>/<split>/COMPLETE``: completion marker, written last. A split without a valid marker
  (interrupted run, other parameters, older generator version) is generated again from scratch.

Content of one image:

* *Stuff* ("grass", "water", "wall"): 2-3 large irregular regions (argmax over smoothed random
  noise fields) that tile the background, each with its own texture (streaky noise, wavy stripes,
  bricks). Each stuff class is at most one segment per image (it may be disconnected, as in COCO).
* *Void*: thin dark strokes and occasional grey blotches on the background, id ``0``.
* *Things* ("circle", "triangle", "square", "star"): 2-8 instances with diameters from 7% of the
  image side (18 px at 256 px) to half of it. About half of the instances are placed next to an
  earlier instance of the *same* class, so same-class instances touch and overlap; later instances
  occlude earlier ones. A placement is rejected (and retried elsewhere) when it would split an
  earlier instance into several pieces or leave less than a minimum visible area of it, so every
  segment is one 4-connected region.
* *Crowd*: occasionally a cluster of many small shapes of one thing class is annotated as a single
  ``iscrowd=1`` segment.

Dataset category ids are deliberately non-contiguous (things 1-4, stuff 10-12) so that bugs in the
dataset-id <-> contiguous-id mapping show up.

Every image is drawn from its own random generator seeded by ``(seed, split, index)``, so the
bytes written do not depend on the number of workers or on the order of generation.
This module only needs numpy, OpenCV and the standard library (no torch, no Detectron2); the
Detectron2 registration lives in ``register_shapes.py``.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import uuid
import zlib
from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

__all__ = [
    "SHAPES_CATEGORIES",
    "SHAPES_GENERATOR_VERSION",
    "default_shapes_root",
    "shapes_dataset_dir",
    "shapes_split_paths",
    "is_shapes_split_complete",
    "render_shapes_sample",
    "generate_shapes_panoptic",
]

#: Bumped whenever the generated content changes, so cached splits are regenerated.
SHAPES_GENERATOR_VERSION = 2  # 2: smallest things >= ~1.5 cells of the 1/8 mask grid

#: COCO-style categories; things first, then stuff, with non-contiguous dataset ids.
SHAPES_CATEGORIES: List[Dict] = [
    {"id": 1, "name": "circle", "isthing": 1, "color": [230, 70, 160], "supercategory": "shape"},
    {"id": 2, "name": "triangle", "isthing": 1, "color": [240, 210, 40], "supercategory": "shape"},
    {"id": 3, "name": "square", "isthing": 1, "color": [70, 200, 230], "supercategory": "shape"},
    {"id": 4, "name": "star", "isthing": 1, "color": [250, 130, 30], "supercategory": "shape"},
    {"id": 10, "name": "grass", "isthing": 0, "color": [60, 140, 50], "supercategory": "ground"},
    {"id": 11, "name": "water", "isthing": 0, "color": [40, 80, 170], "supercategory": "ground"},
    {"id": 12, "name": "wall", "isthing": 0, "color": [150, 85, 65], "supercategory": "ground"},
]

_THING_CATS = [c for c in SHAPES_CATEGORIES if c["isthing"]]
_STUFF_CATS = [c for c in SHAPES_CATEGORIES if not c["isthing"]]

_MARKER = "COMPLETE"
_JPEG_QUALITY = 92
_SHIFT = 4  # sub-pixel bits for cv2 drawing
_ONE = 1 << _SHIFT

ImageSize = Union[int, Sequence[int]]


# --------------------------------------------------------------------------------------------
# paths and arguments
# --------------------------------------------------------------------------------------------
def default_cache_root() -> str:
    """The project's cache folder: ``$PANOPTIC_SEGFORMER_CACHE`` if set, else
    ``~/.cache/panoptic_segformer``."""
    cache = os.environ.get("PANOPTIC_SEGFORMER_CACHE")
    if cache:
        return os.path.expanduser(cache)
    return os.path.join(os.path.expanduser("~"), ".cache", "panoptic_segformer")


def default_shapes_root() -> str:
    """Base folder of the cached shapes datasets: ``<default_cache_root()>/shapes``. Each
    generated configuration lives in its own sub-folder, see :func:`shapes_dataset_dir`."""
    return os.path.join(default_cache_root(), "shapes")


def _check_args(split: str, num_images: int, image_size: ImageSize, seed: int) -> Tuple[int, int]:
    """Validate the generation arguments; returns ``(height, width)``."""
    if (
        not isinstance(split, str)
        or not split
        or split in (".", "..")
        or any(s in split for s in ("/", "\\", os.sep))
    ):
        raise ValueError(
            f"split must be a non-empty folder name without path separators, got {split!r}"
        )
    if (
        isinstance(num_images, bool)
        or not isinstance(num_images, (int, np.integer))
        or num_images < 1
    ):
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        hw = (int(image_size), int(image_size))
    elif (
        isinstance(image_size, (tuple, list))
        and len(image_size) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in image_size)
    ):
        hw = (int(image_size[0]), int(image_size[1]))
    else:
        raise ValueError(
            f"image_size must be an int or a (height, width) pair of ints, got {image_size!r}"
        )
    if min(hw) < 32:
        raise ValueError(f"image_size must be >= 32 pixels on each side, got {image_size!r}")
    return hw


def _size_tag(hw: Tuple[int, int]) -> str:
    return f"{hw[0]}" if hw[0] == hw[1] else f"{hw[0]}x{hw[1]}"


def shapes_dataset_dir(
    num_images: int, image_size: ImageSize, seed: int, root: Optional[str] = None
) -> str:
    """Folder of one configuration: ``<root or default_shapes_root()>/n{N}_px{S}_seed{seed}``.

    Different sizes / seeds never share a folder; pass it as ``root`` to
    :func:`generate_shapes_panoptic`.
    """
    hw = _check_args("x", num_images, image_size, seed)
    base = default_shapes_root() if root is None else os.path.expanduser(root)
    return os.path.join(base, f"n{int(num_images)}_px{_size_tag(hw)}_seed{int(seed)}")


def shapes_split_paths(root: str, split: str) -> Dict[str, str]:
    """Paths of a split: ``split_dir``, ``image_root``, ``panoptic_root``, ``panoptic_json``."""
    split_dir = os.path.join(root, split)
    return {
        "split_dir": split_dir,
        "image_root": os.path.join(split_dir, "images"),
        "panoptic_root": os.path.join(split_dir, "panoptic"),
        "panoptic_json": os.path.join(split_dir, "panoptic.json"),
    }


def _marker_content(split: str, num_images: int, hw: Tuple[int, int], seed: int) -> Dict:
    return {
        "version": SHAPES_GENERATOR_VERSION,
        "split": split,
        "num_images": int(num_images),
        "image_size": [hw[0], hw[1]],
        "seed": int(seed),
    }


def is_shapes_split_complete(
    root: str, split: str, num_images: int, image_size: ImageSize, seed: int
) -> bool:
    """True if ``root/split`` holds a finished generation with exactly these parameters."""
    hw = _check_args(split, num_images, image_size, seed)
    marker = os.path.join(root, split, _MARKER)
    try:
        with open(marker, "r") as f:
            content = json.load(f)
    except (OSError, ValueError):
        return False
    return content == _marker_content(split, num_images, hw, seed)


# --------------------------------------------------------------------------------------------
# drawing helpers
# --------------------------------------------------------------------------------------------
def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Independent generator per image: depends only on (seed, split, index)."""
    return np.random.default_rng(
        np.random.SeedSequence([int(seed), zlib.crc32(split.encode("utf-8")), int(index)])
    )


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """(h, w) float32 smooth random field: a ``cells``-grid of uniforms, bicubically upsampled."""
    gh = max(2, int(round(cells * h / max(h, w))))
    gw = max(2, int(round(cells * w / max(h, w))))
    grid = rng.random((gh, gw), dtype=np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _stuff_layout(rng: np.random.Generator, h: int, w: int, k: int) -> np.ndarray:
    """(h, w) int array in [0, k): large irregular regions from argmax of smooth noise fields."""
    min_frac = 0.12
    labels = None
    for _ in range(8):
        fields = np.stack(
            [
                _smooth_noise(rng, h, w, int(rng.integers(3, 6)))
                + 0.35 * _smooth_noise(rng, h, w, int(rng.integers(8, 14)))
                for _ in range(k)
            ]
        )
        labels = fields.argmax(0)
        counts = np.bincount(labels.ravel(), minlength=k)
        if counts.min() >= min_frac * h * w:
            break
    return labels


def _texture(cat_name: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float32 RGB texture of one stuff class, with per-image colour jitter."""
    base = np.array(
        next(c["color"] for c in _STUFF_CATS if c["name"] == cat_name), dtype=np.float32
    ) + rng.uniform(-18, 18, 3).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    s = min(h, w) / 256.0
    if cat_name == "grass":
        # vertical streaks (noise stretched along y) plus fine speckle
        streak = rng.standard_normal((max(2, h // 8), w), dtype=np.float32)
        streak = cv2.resize(streak, (w, h), interpolation=cv2.INTER_LINEAR)
        speckle = rng.standard_normal((h, w), dtype=np.float32)
        shade = 1.0 + 0.16 * streak + 0.08 * speckle
        return base[None, None, :] * shade[..., None]
    if cat_name == "water":
        # wavy horizontal stripes
        period = rng.uniform(9, 16) * max(s, 0.5)
        wobble = rng.uniform(2, 5) * max(s, 0.5)
        phase = rng.uniform(0, 2 * math.pi)
        wave = np.sin(
            2 * math.pi * yy / period
            + wobble * np.sin(2 * math.pi * xx / (period * rng.uniform(4, 7)) + phase) / period * 2
        )
        shade = 1.0 + 0.22 * wave
        tex = base[None, None, :] * shade[..., None]
        tex[..., 2] += 25.0 * np.clip(wave, 0, 1)  # bright crests
        return tex
    if cat_name == "wall":
        # bricks with mortar; each brick has its own shade
        bh = max(4, int(round(rng.uniform(9, 14) * s)))
        bw = 2 * bh + int(rng.integers(0, bh // 2 + 1))
        mortar = max(1, int(round(1.5 * s)))
        yi, xi = np.mgrid[0:h, 0:w]
        row = yi // bh
        xs = xi + (row % 2) * (bw // 2)
        col = xs // bw
        is_mortar = ((yi % bh) < mortar) | ((xs % bw) < mortar)
        nrow, ncol = h // bh + 2, w // bw + 3
        brick_shade = rng.uniform(0.8, 1.15, (nrow, ncol)).astype(np.float32)
        tex = base[None, None, :] * brick_shade[row, col][..., None]
        tex[is_mortar] = np.float32(195.0) + rng.uniform(-10, 10)
        return tex
    raise ValueError(f"unknown stuff class {cat_name!r}")


def _thing_polygon(
    rng: np.random.Generator, cat_name: str, cx: float, cy: float, r: float
) -> Optional[np.ndarray]:
    """Vertices (n, 2) of a polygonal thing of radius ``r``; ``None`` for circles."""
    theta = rng.uniform(0, 2 * math.pi)
    if cat_name == "circle":
        return None
    if cat_name == "triangle":
        ang = theta + np.array([0.0, 2.0, 4.0]) * math.pi / 3 + rng.uniform(-0.15, 0.15, 3)
        rad = r * rng.uniform(0.9, 1.1, 3)
    elif cat_name == "square":
        ang = theta + np.array([0.25, 0.75, 1.25, 1.75]) * math.pi
        rad = np.full(4, r)
    elif cat_name == "star":
        ang = theta + np.arange(10) * math.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(0.42, 0.55))
    else:
        raise ValueError(f"unknown thing class {cat_name!r}")
    return np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)


def _draw_thing(
    canvas: np.ndarray, rng: np.random.Generator, cat_name: str, cx: float, cy: float, r: float
) -> None:
    """Fill one thing of class ``cat_name`` (centre ``(cx, cy)``, radius ``r`` px) with 1s."""
    poly = _thing_polygon(rng, cat_name, cx, cy, r)
    if poly is None:
        axes = (int(round(r * _ONE)), int(round(r * rng.uniform(0.85, 1.0) * _ONE)))
        center = (int(round(cx * _ONE)), int(round(cy * _ONE)))
        cv2.ellipse(
            canvas, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1, cv2.LINE_8, _SHIFT
        )
    else:
        pts = np.round(poly * _ONE).astype(np.int32)
        cv2.fillPoly(canvas, [pts], 1, cv2.LINE_8, _SHIFT)


def _num_components(mask_u8: np.ndarray) -> int:
    """Number of 4-connected foreground components of a uint8 mask."""
    n, _ = cv2.connectedComponents(mask_u8, connectivity=4)
    return n - 1


def _largest_component(mask_u8: np.ndarray) -> np.ndarray:
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask_u8, connectivity=4)
    if n <= 1:
        return np.zeros(mask_u8.shape, dtype=bool)
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return lab == best


# --------------------------------------------------------------------------------------------
# one sample
# --------------------------------------------------------------------------------------------
def render_shapes_sample(
    seed: int, split: str, index: int, image_size: ImageSize = 256
) -> Tuple[np.ndarray, np.ndarray, List[Dict]]:
    """Draw sample ``index`` of ``split``; a pure function of its arguments.

    Returns:
        image: (H, W, 3) uint8 RGB.
        pan_id: (H, W) int64 segment ids (0 = void).
        segments_info: COCO panoptic ``segments_info`` list (dataset category ids).
    """
    h, w = _check_args(split, 1, image_size, seed)
    rng = _image_rng(seed, split, index)
    s = min(h, w)
    npix = h * w

    # ---- stuff: 2 or 3 classes as large irregular regions covering the whole image
    k = int(rng.integers(2, len(_STUFF_CATS) + 1))
    stuff_cats = [_STUFF_CATS[i] for i in rng.permutation(len(_STUFF_CATS))[:k]]
    seg = _stuff_layout(rng, h, w, k).astype(np.int32)  # segment index per pixel; -1 = void
    segments: List[Dict] = [{"cat": c, "iscrowd": 0} for c in stuff_cats]

    # ---- void: thin dark strokes and occasional blotches (only on the background)
    void = np.zeros((h, w), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        npts = int(rng.integers(3, 7))
        start = rng.uniform(0, 1, 2) * (w, h)
        steps = rng.normal(0, 0.15 * s, (npts, 2))
        pts = np.round((start + np.cumsum(steps, axis=0)) * _ONE).astype(np.int32)
        thick = int(rng.integers(1, max(2, int(round(3 * s / 256))) + 1))
        cv2.polylines(void, [pts], False, 1, thick, cv2.LINE_8, _SHIFT)
    if rng.random() < 0.35:
        c = (int(rng.uniform(0, w) * _ONE), int(rng.uniform(0, h) * _ONE))
        ax = (int(rng.uniform(0.02, 0.06) * s * _ONE), int(rng.uniform(0.02, 0.06) * s * _ONE))
        cv2.ellipse(void, c, ax, float(rng.uniform(0, 180)), 0, 360, 2, -1, cv2.LINE_8, _SHIFT)
    seg[void > 0] = -1

    # ---- things
    # Sizes from small to large. The smallest visible thing keeps >= ~1.5 cells of the model's 1/8
    # mask grid (Eq. 2) at the native size: 7% of the side across, >= 0.15% of the image visible.
    d_min, d_max = max(8.0, 0.07 * s), 0.5 * s
    min_visible = max(24, int(round(1.5e-3 * npix)))
    canvas = np.zeros((h, w), dtype=np.uint8)
    full_area: Dict[int, int] = {}  # thing segment index -> area when it was drawn

    def try_place(mask: np.ndarray) -> bool:
        """Accept ``mask`` on top unless it breaks or hides an earlier thing too much."""
        area = int(mask.sum())
        if area < min_visible or _num_components(mask.astype(np.uint8)) != 1:
            return False
        under = np.unique(seg[mask])
        for j in under[under >= k]:
            visible = (seg == j) & ~mask
            left = int(visible.sum())
            if left < max(min_visible, 0.25 * full_area[int(j)]):
                return False
            if _num_components(visible.astype(np.uint8)) != 1:
                return False
        new = len(segments)
        seg[mask] = new
        full_area[new] = area
        return True

    # occasionally a crowd: a connected cluster of many small shapes of one class
    if rng.random() < 0.2:
        cat = _THING_CATS[int(rng.integers(len(_THING_CATS)))]
        for _ in range(5):
            canvas[:] = 0
            r_small = max(3.0, rng.uniform(0.018, 0.03) * s)
            pos = rng.uniform(0.2, 0.8, 2) * (w, h)
            for _ in range(int(rng.integers(6, 15))):
                _draw_thing(
                    canvas, rng, cat["name"], pos[0], pos[1], r_small * rng.uniform(0.8, 1.2)
                )
                ang = rng.uniform(0, 2 * math.pi)
                pos = np.clip(
                    pos + 1.2 * r_small * np.array([math.cos(ang), math.sin(ang)]),
                    0,
                    (w - 1, h - 1),
                )
            mask = _largest_component(canvas)
            if try_place(mask):
                segments.append({"cat": cat, "iscrowd": 1})
                break

    n_things = int(rng.integers(2, 9))
    placed: List[Tuple[int, float, float, float]] = []  # (segment index, cx, cy, r)
    for _ in range(n_things):
        sibling = placed and rng.random() < 0.5
        if sibling:
            parent = placed[int(rng.integers(len(placed)))]
            cat = segments[parent[0]]["cat"]
        else:
            cat = _THING_CATS[int(rng.integers(len(_THING_CATS)))]
        for _attempt in range(8):
            r = 0.5 * math.exp(rng.uniform(math.log(d_min), math.log(d_max)))
            if sibling:
                _, pcx, pcy, pr = parent
                ang = rng.uniform(0, 2 * math.pi)
                dist = (pr + r) * rng.uniform(0.45, 0.95)
                cx, cy = pcx + dist * math.cos(ang), pcy + dist * math.sin(ang)
                cx, cy = float(np.clip(cx, 0, w - 1)), float(np.clip(cy, 0, h - 1))
            else:
                cx, cy = rng.uniform(0, w - 1), rng.uniform(0, h - 1)
            canvas[:] = 0
            _draw_thing(canvas, rng, cat["name"], cx, cy, r)
            if try_place(canvas > 0):
                placed.append((len(segments), cx, cy, r))
                segments.append({"cat": cat, "iscrowd": 0})
                break

    # ---- segment ids, areas and boxes
    nseg = len(segments)
    areas = np.bincount(seg.ravel() + 1, minlength=nseg + 1)[1:]
    ids = np.zeros(nseg, dtype=np.int64)
    used = set()
    for i in range(nseg):
        while True:  # random unique ids in [1, 2**24) exercise all three PNG channels
            v = int(rng.integers(1, 1 << 24))
            if v not in used:
                used.add(v)
                ids[i] = v
                break
    id_lut = np.concatenate([[0], ids])
    pan_id = id_lut[seg + 1]

    segments_info: List[Dict] = []
    for i, sgm in enumerate(segments):
        if areas[i] == 0:
            continue
        ys, xs = np.nonzero(seg == i)
        x0, y0 = int(xs.min()), int(ys.min())
        segments_info.append(
            {
                "id": int(ids[i]),
                "category_id": int(sgm["cat"]["id"]),
                "iscrowd": int(sgm["iscrowd"]),
                "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                "area": int(areas[i]),
            }
        )

    # ---- image
    img = np.zeros((h, w, 3), dtype=np.float32)
    for i, c in enumerate(stuff_cats):
        m = seg == i
        if m.any():
            img[m] = _texture(c["name"], rng, h, w)[m]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(k, nseg):
        m = seg == i
        if not m.any():
            continue
        base = np.array(segments[i]["cat"]["color"], np.float32) + rng.uniform(-30, 30, 3).astype(
            np.float32
        )
        gx, gy = rng.uniform(-0.25, 0.25, 2) / max(8.0, 0.25 * s)
        cyx = np.array(np.nonzero(m)).mean(1)
        shade = 1.0 + gx * (xx[m] - cyx[1]) + gy * (yy[m] - cyx[0])
        col = base[None, :] * np.clip(shade, 0.7, 1.3)[:, None]
        if segments[i]["iscrowd"]:
            col *= rng.uniform(0.85, 1.1, (col.shape[0], 1)).astype(np.float32)
        img[m] = col
    # darker outline on thing boundaries (also between touching same-class instances)
    edge = np.zeros((h, w), dtype=bool)
    dy = seg[1:, :] != seg[:-1, :]
    dx = seg[:, 1:] != seg[:, :-1]
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    img[edge & (seg >= k)] *= 0.55
    vm = seg < 0
    img[vm] = rng.uniform(20, 90) + rng.uniform(-15, 15, 3).astype(np.float32)
    img[void == 2] = rng.uniform(110, 170)  # blotches: grey
    img += rng.normal(0.0, 7.0, (h, w, 3)).astype(np.float32)
    image = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return image, pan_id, segments_info


# --------------------------------------------------------------------------------------------
# dataset generation
# --------------------------------------------------------------------------------------------
def _write_one(job: Tuple[str, int, str, int, Tuple[int, int]]) -> Dict:
    """Render and write one image + panoptic PNG; returns its JSON entries (worker function)."""
    out_dir, seed, split, index, hw = job
    image, pan_id, segments_info = render_shapes_sample(seed, split, index, hw)
    stem = f"{index:06d}"
    rgb = np.stack([pan_id & 255, (pan_id >> 8) & 255, (pan_id >> 16) & 255], axis=-1).astype(
        np.uint8
    )
    ok1 = cv2.imwrite(
        os.path.join(out_dir, "images", stem + ".jpg"),
        np.ascontiguousarray(image[..., ::-1]),
        [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY],
    )
    ok2 = cv2.imwrite(
        os.path.join(out_dir, "panoptic", stem + ".png"),
        np.ascontiguousarray(rgb[..., ::-1]),
        [cv2.IMWRITE_PNG_COMPRESSION, 3],
    )
    if not (ok1 and ok2):
        raise OSError(f"could not write sample {stem} under {out_dir}")
    return {
        "image": {"id": index, "file_name": stem + ".jpg", "height": hw[0], "width": hw[1]},
        "annotation": {
            "image_id": index,
            "file_name": stem + ".png",
            "segments_info": segments_info,
        },
    }


def generate_shapes_panoptic(
    root: str,
    split: str,
    num_images: int = 500,
    image_size: ImageSize = 256,
    seed: int = 0,
    workers: Optional[int] = None,
) -> Dict[str, str]:
    """Write the ``shapes`` split ``root/split`` in COCO panoptic format (no-op if complete).

    Args:
        root: dataset folder (e.g. :func:`shapes_dataset_dir`); the split goes to ``root/split``.
        split: split name, e.g. ``"train"``; part of the per-image seed.
        num_images: number of images (>= 1).
        image_size: side length, or ``(height, width)``; each side >= 32.
        seed: base seed (>= 0). Image ``i`` depends only on ``(seed, split, i, image_size)``.
        workers: processes to use; default ``min(2, cpu_count)``, ``0``/``1`` = in-process.

    The split is written to a temporary sibling folder and renamed into place after its
    completion marker is written, so an interrupted or concurrent run never exposes a partial
    split. Returns the paths of :func:`shapes_split_paths`.
    """
    hw = _check_args(split, num_images, image_size, seed)
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 0:
        raise ValueError(f"workers must be a non-negative integer or None, got {workers!r}")
    root = os.path.expanduser(root)
    paths = shapes_split_paths(root, split)
    if is_shapes_split_complete(root, split, num_images, hw, seed):
        return paths

    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".{split}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(os.path.join(tmp, "images"))
        os.makedirs(os.path.join(tmp, "panoptic"))
        jobs = [(tmp, int(seed), split, i, hw) for i in range(int(num_images))]
        if workers <= 1 or num_images < 16:
            entries = [_write_one(j) for j in jobs]
        else:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
            # One process per core: OpenCV's own thread pool is shut down (cleanly, here in the
            # parent) before forking. Forked children must not touch a pool whose threads they
            # did not inherit (cv2.setNumThreads in a child deadlocks).
            cv2_threads = cv2.getNumThreads()
            cv2.setNumThreads(1)
            try:
                with ctx.Pool(int(workers)) as pool:
                    entries = pool.map(
                        _write_one, jobs, chunksize=max(1, len(jobs) // (8 * workers))
                    )
            finally:
                cv2.setNumThreads(cv2_threads)
        data = {
            "info": {
                "description": "Panoptic SegFormer synthetic 'shapes' panoptic dataset",
                "version": SHAPES_GENERATOR_VERSION,
                "split": split,
                "seed": int(seed),
            },
            "licenses": [],
            "images": [e["image"] for e in entries],
            "annotations": [e["annotation"] for e in entries],
            "categories": [dict(c) for c in SHAPES_CATEGORIES],
        }
        with open(os.path.join(tmp, "panoptic.json"), "w") as f:
            json.dump(data, f)
        with open(os.path.join(tmp, _MARKER), "w") as f:  # written last
            json.dump(_marker_content(split, num_images, hw, seed), f)

        if is_shapes_split_complete(root, split, num_images, hw, seed):
            return paths  # a concurrent run finished first
        if os.path.lexists(paths["split_dir"]):
            shutil.rmtree(paths["split_dir"])  # stale / interrupted / other parameters
        try:
            os.rename(tmp, paths["split_dir"])
        except OSError:
            if not is_shapes_split_complete(root, split, num_images, hw, seed):
                raise
        return paths
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
