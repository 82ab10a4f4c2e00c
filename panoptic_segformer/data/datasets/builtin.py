"""Dataset registration in Detectron2's catalog (standard COCO panoptic format).

- COCO panoptic: Detectron2's own registration (``coco_2017_{train,val,val_100}_panoptic``, under
  ``$DETECTRON2_DATASETS``) is kept, metadata and all; only its loader is wrapped by
  :func:`load_panoptic_json_checked` so a missing folder or a bad JSON is a clear error naming the
  path (and the environment variable) instead of a crash inside the loader.
- ADE20K panoptic (``ade20k_panoptic_{train,val}``): 150 classes (100 things, 50 stuff) in the COCO
  panoptic format under ``$DETECTRON2_DATASETS/ADEChallengeData2016`` (``images/{training,validation}``,
  ``ade20k_panoptic_{train,val}/`` PNGs and ``ade20k_panoptic_{train,val}.json``).
- ``coco_panoptic_sample``: the 2 real COCO val images of ``shared/data/coco_panoptic_sample``
  (``$PANOPTIC_SEGFORMER_COCO_SAMPLE`` overrides the location).
- ``shapes_panoptic_{train,val}``: the synthetic dataset of :mod:`.shapes` (generated on first use).

All use Detectron2's "standard" panoptic metadata convention: contiguous ids over all categories,
things listed in ``thing_dataset_id_to_contiguous_id``, stuff in ``stuff_dataset_id_to_contiguous_id``.
"""
import json
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco_panoptic import load_coco_panoptic_json

from ..dataset_mapper import DatasetError
from .ade20k_categories import ADE20K_150_CATEGORIES
from .instances_json import panoptic_to_instances_json
from .shapes import default_cache_root

__all__ = [
    "load_panoptic_json_checked",
    "panoptic_metadata",
    "register_panoptic_dataset",
    "register_all",
    "coco_sample_root",
]

_DATASETS_ENV = "DETECTRON2_DATASETS"
_SAMPLE_ENV = "PANOPTIC_SEGFORMER_COCO_SAMPLE"


def _datasets_root():
    return os.path.expanduser(os.getenv(_DATASETS_ENV, "datasets"))


def coco_sample_root():
    """Folder of the 2-image COCO panoptic sample (``$PANOPTIC_SEGFORMER_COCO_SAMPLE`` or
    ``<repo>/../shared/data/coco_panoptic_sample``)."""
    default = os.path.join(
        os.path.dirname(__file__), "..", "..", "..", "..", "shared", "data", "coco_panoptic_sample"
    )
    return os.path.normpath(os.getenv(_SAMPLE_ENV, default))


def panoptic_metadata(categories):
    """Detectron2 "standard" panoptic metadata for a list of COCO-style category dicts
    ({"id", "name", "isthing", "color"}): contiguous id = index in `categories`."""
    names = [c["name"] for c in categories]
    colors = [list(c["color"]) for c in categories]
    return {
        "thing_classes": names,
        "thing_colors": colors,
        "stuff_classes": names,
        "stuff_colors": colors,
        "thing_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(categories) if c["isthing"]
        },
        "stuff_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(categories) if not c["isthing"]
        },
    }


def load_panoptic_json_checked(json_file, image_dir, gt_dir, meta, env_hint=None):
    """Validate a COCO-format panoptic dataset, then load it with Detectron2's
    `load_coco_panoptic_json`.

    Raises DatasetError naming the path (and `env_hint`, the variable that sets it) when a folder or
    the JSON is missing, the JSON is malformed, has no annotations, or uses an unknown category id.
    Per-image consistency of PNG and JSON is checked by the dataset mapper when the image is read.
    """
    hint = f" (set ${env_hint} to the folder that holds your datasets)" if env_hint else ""
    for path, what in ((image_dir, "image folder"), (gt_dir, "panoptic PNG folder")):
        if not os.path.isdir(path):
            raise DatasetError(f"{path}: {what} does not exist{hint}")
    if not os.path.isfile(json_file):
        raise DatasetError(f"{json_file}: panoptic JSON does not exist{hint}")
    try:
        with open(json_file) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{json_file}: cannot parse panoptic JSON ({e})") from e
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise DatasetError(f"{json_file}: no 'annotations' list in the panoptic JSON")
    if not annotations:
        raise DatasetError(f"{json_file}: the annotation list is empty")
    known = set(meta["thing_dataset_id_to_contiguous_id"]) | set(
        meta["stuff_dataset_id_to_contiguous_id"]
    )
    for ann in annotations:
        for key in ("file_name", "image_id", "segments_info"):
            if key not in ann:
                raise DatasetError(f"{json_file}: an annotation lacks '{key}': {str(ann)[:200]}")
        for seg in ann["segments_info"]:
            if seg.get("category_id") not in known:
                raise DatasetError(
                    f"{json_file}: image {ann['image_id']} ({ann['file_name']}) segment "
                    f"{seg.get('id')} has unknown category id {seg.get('category_id')!r}"
                )
    return load_coco_panoptic_json(json_file, image_dir, gt_dir, meta)


def register_panoptic_dataset(name, metadata, image_root, panoptic_root, panoptic_json,
                              instances_json=None, env_hint=None, derive_instances_json=False):
    """Register a standard COCO-format panoptic dataset `name` with a checked loader.

    `instances_json` (metadata ``json_file``) enables COCOEvaluator's mask AP; with
    `derive_instances_json` the loader writes it from the panoptic annotations (thing segments).
    """
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)

    def load():
        dicts = load_panoptic_json_checked(panoptic_json, image_root, panoptic_root, metadata, env_hint)
        if derive_instances_json:
            panoptic_to_instances_json(panoptic_json, panoptic_root, instances_json)
        return dicts

    DatasetCatalog.register(name, load)
    meta = MetadataCatalog.get(name)
    fields = dict(
        metadata,
        panoptic_root=panoptic_root,
        image_root=image_root,
        panoptic_json=panoptic_json,
        evaluator_type="coco_panoptic_seg",
        ignore_label=255,
        label_divisor=1000,
    )
    if instances_json:
        fields["json_file"] = instances_json
    for key, value in fields.items():
        if getattr(meta, key, None) != value:
            if hasattr(meta, key):
                meta.__dict__.pop(key)  # allow re-registration with a new root
            meta.set(**{key: value})


def _wrap_detectron2_coco_panoptic():
    """Keep Detectron2's COCO panoptic registration, with the checked loader."""
    for name in ("coco_2017_train_panoptic", "coco_2017_val_panoptic", "coco_2017_val_100_panoptic"):
        if name not in DatasetCatalog.list():
            continue
        meta = MetadataCatalog.get(name)
        standard = {k: getattr(meta, k) for k in (
            "thing_classes", "thing_colors", "stuff_classes", "stuff_colors",
            "thing_dataset_id_to_contiguous_id", "stuff_dataset_id_to_contiguous_id")}
        json_file, image_root = meta.panoptic_json, meta.image_root
        pan_root = meta.panoptic_root
        DatasetCatalog.remove(name)
        DatasetCatalog.register(
            name,
            lambda j=json_file, i=image_root, p=pan_root, m=standard: load_panoptic_json_checked(
                j, i, p, m, _DATASETS_ENV),
        )


def coco_standard_metadata():
    """COCO panoptic (133 classes) standard metadata, as Detectron2 registers it."""
    meta = MetadataCatalog.get("coco_2017_val_panoptic")
    return {k: getattr(meta, k) for k in (
        "thing_classes", "thing_colors", "stuff_classes", "stuff_colors",
        "thing_dataset_id_to_contiguous_id", "stuff_dataset_id_to_contiguous_id")}


def register_coco_sample(root=None):
    root = root or coco_sample_root()
    register_panoptic_dataset(
        "coco_panoptic_sample",
        coco_standard_metadata(),
        os.path.join(root, "images"),
        os.path.join(root, "panoptic"),
        os.path.join(root, "panoptic_sample.json"),
        instances_json=os.path.join(default_cache_root(), "coco_panoptic_sample", "instances.json"),
        env_hint=_SAMPLE_ENV,
        derive_instances_json=True,
    )


def register_ade20k_panoptic(root=None):
    root = os.path.join(root or _datasets_root(), "ADEChallengeData2016")
    metadata = panoptic_metadata(ADE20K_150_CATEGORIES)
    for split, image_dir in (("train", "training"), ("val", "validation")):
        register_panoptic_dataset(
            f"ade20k_panoptic_{split}",
            metadata,
            os.path.join(root, "images", image_dir),
            os.path.join(root, f"ade20k_panoptic_{split}"),
            os.path.join(root, f"ade20k_panoptic_{split}.json"),
            env_hint=_DATASETS_ENV,
        )


def register_all():
    """Register every dataset of this project (idempotent)."""
    from .register_shapes import register_all_shapes

    _wrap_detectron2_coco_panoptic()
    register_coco_sample()
    register_ade20k_panoptic()
    register_all_shapes()
