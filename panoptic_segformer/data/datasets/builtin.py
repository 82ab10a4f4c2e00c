"""Dataset registration in Detectron2's catalog (standard COCO panoptic format).

- Your own dataset: :func:`register_panoptic_dataset` (docs/DATASETS.md, "Your own dataset").
- COCO panoptic: Detectron2's own registration (``coco_2017_{train,val,val_100}_panoptic``, under
  ``$DETECTRON2_DATASETS``) is kept, metadata and all; only its loader is replaced by
  :func:`load_panoptic_json_checked` so a missing folder or a bad JSON is a clear error naming the
  path (and the environment variable) instead of a crash inside the loader.
- ADE20K panoptic (``ade20k_panoptic_{train,val}``): 150 classes (100 things, 50 stuff) in the COCO
  panoptic format under ``$DETECTRON2_DATASETS/ADEChallengeData2016`` (``images/{training,validation}``,
  ``ade20k_panoptic_{train,val}/`` PNGs and ``ade20k_panoptic_{train,val}.json``).
- ``coco_panoptic_sample``: the 2 real COCO val images shipped in the package
  (``panoptic_segformer/data/coco_panoptic_sample``); ``$PANOPTIC_SEGFORMER_COCO_SAMPLE``, if set, is
  used instead and must be the sample folder itself (the one holding ``images/``, ``panoptic/`` and
  ``panoptic_sample.json``).
- ``shapes_panoptic_{train,val}``: the synthetic dataset of :mod:`.shapes` (generated on first use).

All use Detectron2's "standard" panoptic metadata convention: contiguous ids over all categories,
things listed in ``thing_dataset_id_to_contiguous_id``, stuff in ``stuff_dataset_id_to_contiguous_id``.
(Datasets registered elsewhere may also use Mask2Former's convention, see :mod:`..metadata`.)
"""
import json
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.colormap import colormap

from ..io import DatasetError
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
#: The 2-image COCO panoptic sample shipped as package data (setup.py ``package_data``).
_PACKAGED_SAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "coco_panoptic_sample")
_DATASETS_HINT = f"set ${_DATASETS_ENV} to the folder that holds your datasets"
_SAMPLE_HINT = (f"${_SAMPLE_ENV} must be the sample folder itself, the one holding images/, panoptic/ "
                f"and panoptic_sample.json; unset, the copy shipped in the package is used: {_PACKAGED_SAMPLE}")


def _datasets_root():
    return os.path.expanduser(os.getenv(_DATASETS_ENV, "datasets"))


def coco_sample_root():
    """Folder of the 2-image COCO panoptic sample: ``$PANOPTIC_SEGFORMER_COCO_SAMPLE`` (the sample
    folder itself) or the copy shipped in the package."""
    return os.path.normpath(os.path.expanduser(os.getenv(_SAMPLE_ENV) or _PACKAGED_SAMPLE))


def _check_categories(categories, source):
    """COCO-style category dicts: int "id" (unique), str "name", "isthing" 0/1; DatasetError naming
    `source` otherwise."""
    if not isinstance(categories, (list, tuple)) or not categories:
        raise DatasetError(f"{source}: categories must be a non-empty list of dicts with 'id', 'name', "
                           f"'isthing', got {str(categories)[:200]}")
    seen = set()
    for c in categories:
        if not isinstance(c, dict) or not all(k in c for k in ("id", "name", "isthing")):
            raise DatasetError(f"{source}: a category lacks 'id', 'name' or 'isthing': {str(c)[:200]}")
        if c["isthing"] not in (0, 1):
            raise DatasetError(f"{source}: category {c['id']} ({c['name']}) has isthing={c['isthing']!r}, "
                               "expected 0 or 1")
        if c["id"] in seen:
            raise DatasetError(f"{source}: category id {c['id']} appears twice")
        seen.add(c["id"])
    if not any(c["isthing"] for c in categories):
        raise DatasetError(f"{source}: no thing category (isthing=1); Panoptic SegFormer needs at least one")


def panoptic_metadata(categories, source="categories"):
    """Detectron2 "standard" panoptic metadata for a list of COCO-style category dicts
    ({"id", "name", "isthing", optional "color"}): contiguous id = index in `categories`.
    Categories without a colour get one of Detectron2's colormap."""
    _check_categories(categories, source)
    palette = colormap(rgb=True, maximum=255).astype(int).tolist()
    names = [c["name"] for c in categories]
    colors = [list(c.get("color") or palette[i % len(palette)]) for i, c in enumerate(categories)]
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


def _read_json(json_file, hint=None):
    hint = f" ({hint})" if hint else ""
    if not os.path.isfile(json_file):
        raise DatasetError(f"{json_file}: panoptic JSON does not exist{hint}")
    try:
        with open(json_file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{json_file}: cannot parse panoptic JSON ({e})") from e


def load_panoptic_json_checked(json_file, image_dir, gt_dir, meta, hint=None):
    """Load a COCO-format panoptic dataset as Detectron2 dataset dicts, checking it first.

    The dicts are those of Detectron2's `load_coco_panoptic_json` ("file_name", "image_id",
    "pan_seg_file_name", "segments_info" with contiguous "category_id" and "isthing"), except that
    image file names come from the JSON's ``images`` list (Detectron2's loader assumes ``.jpg``).
    `meta` may use the standard or Mask2Former's convention (a category in the thing map is a thing).

    Raises DatasetError naming the path (and `hint`, how to set it) when a folder or the JSON is
    missing, and naming the JSON when it is malformed, has no annotations, an annotation whose
    ``image_id`` is not in ``images``, or an unknown category id. Per-image consistency of PNG and
    JSON is checked by the dataset mapper when the image is read (training and evaluation).
    """
    suffix = f" ({hint})" if hint else ""
    for path, what in ((image_dir, "image folder"), (gt_dir, "panoptic PNG folder")):
        if not os.path.isdir(path):
            raise DatasetError(f"{path}: {what} does not exist{suffix}")
    data = _read_json(json_file, hint)
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise DatasetError(f"{json_file}: no 'annotations' list in the panoptic JSON")
    if not annotations:
        raise DatasetError(f"{json_file}: the annotation list is empty")
    images = data.get("images")
    if not isinstance(images, list):
        raise DatasetError(f"{json_file}: no 'images' list in the panoptic JSON (it gives the image "
                           "file name of each annotation's image_id)")
    image_files = {}
    for image in images:
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise DatasetError(f"{json_file}: an entry of 'images' lacks 'id' or 'file_name': {str(image)[:200]}")
        image_files[image["id"]] = image["file_name"]
    thing_map = meta["thing_dataset_id_to_contiguous_id"]
    stuff_map = meta["stuff_dataset_id_to_contiguous_id"]
    dicts = []
    for ann in annotations:
        for key in ("file_name", "image_id", "segments_info"):
            if key not in ann:
                raise DatasetError(f"{json_file}: an annotation lacks '{key}': {str(ann)[:200]}")
        if ann["image_id"] not in image_files:
            raise DatasetError(f"{json_file}: annotation {ann['file_name']} has image_id {ann['image_id']!r}, "
                               "which is not in the JSON's 'images' list")
        segments = []
        for seg in ann["segments_info"]:
            category = seg.get("category_id")
            if category in thing_map:
                segments.append(dict(seg, category_id=thing_map[category], isthing=True))
            elif category in stuff_map:
                segments.append(dict(seg, category_id=stuff_map[category], isthing=False))
            else:
                raise DatasetError(
                    f"{json_file}: image {ann['image_id']} ({ann['file_name']}) segment "
                    f"{seg.get('id')} has unknown category id {category!r}"
                )
        dicts.append({
            "file_name": os.path.join(image_dir, image_files[ann["image_id"]]),
            "image_id": ann["image_id"],
            "pan_seg_file_name": os.path.join(gt_dir, ann["file_name"]),
            "segments_info": segments,
        })
    for key, what in (("file_name", "image"), ("pan_seg_file_name", "panoptic PNG")):
        if not os.path.isfile(dicts[0][key]):  # a wrong root fails here, not at the first batch
            raise DatasetError(f"{dicts[0][key]}: {what} of image {dicts[0]['image_id']} in {json_file} "
                               "does not exist")
    return dicts


def _register(name, metadata, image_root, panoptic_root, panoptic_json, instances_json=None, hint=None,
              derive_instances_json=False):
    """Register panoptic dataset `name` with `metadata` and the checked loader.

    `instances_json` (metadata ``json_file``) enables COCOEvaluator's mask AP; with
    `derive_instances_json` the loader writes it from the panoptic annotations (thing segments).
    """
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)

    def load():
        dicts = load_panoptic_json_checked(panoptic_json, image_root, panoptic_root, metadata, hint)
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
    elif hasattr(meta, "json_file"):
        meta.__dict__.pop("json_file")  # re-registration without an instances JSON
    for key, value in fields.items():
        if getattr(meta, key, None) != value:
            if hasattr(meta, key):
                meta.__dict__.pop(key)  # allow re-registration with a new root
            meta.set(**{key: value})


def register_panoptic_dataset(name, image_root, panoptic_root, panoptic_json, categories=None,
                              instances_json=None, derive_instances_json=False):
    """Register your own COCO-panoptic-format dataset as `name` in Detectron2's catalog.

    Args:
        name: the name to use in ``DATASETS.TRAIN`` / ``DATASETS.TEST``.
        image_root: folder of the images; each annotation's image file is the ``file_name`` of its
            ``image_id`` in the JSON's ``images`` list (any extension: .jpg, .png, ...).
        panoptic_root: folder of the panoptic PNGs (segment id = R + 256 G + 256^2 B, 0 = void),
            named by each annotation's ``file_name``.
        panoptic_json: the COCO panoptic JSON (``images``, ``annotations``, ``categories``).
        categories: list of {"id", "name", "isthing", optional "color"}; default: the JSON's
            ``categories`` (read now, so the JSON must exist at registration). Contiguous class id =
            index in this list; set MODEL.PANOPTIC_SEGFORMER.NUM_THING_CLASSES / NUM_STUFF_CLASSES to
            the numbers of things and stuff.
        instances_json: a COCO *instances* JSON of the thing segments, for mask AP (COCOEvaluator);
            None: PQ only, unless `derive_instances_json`.
        derive_instances_json: write the instances JSON from the panoptic PNGs and JSON (to
            `instances_json`, default ``$PANOPTIC_SEGFORMER_CACHE/<name>/instances.json``) when the
            dataset is loaded (again only if the panoptic JSON is newer).

    The metadata follows Detectron2's "standard" panoptic convention. Problems in the data are
    :class:`DatasetError` naming the file: at load time (``DatasetCatalog.get``) a missing folder or
    JSON, an annotation whose ``image_id`` is not in ``images``, an unknown category id; when an image
    is read (training and evaluation) a PNG that disagrees with the JSON or the image.
    Registering a name again replaces the registration.
    """
    if categories is None:
        data = _read_json(panoptic_json)
        categories = data.get("categories") if isinstance(data, dict) else None
        source = f"{panoptic_json}: 'categories'"
    else:
        source = f"register_panoptic_dataset({name!r}): categories"
    metadata = panoptic_metadata(categories, source)
    if derive_instances_json and not instances_json:
        instances_json = os.path.join(default_cache_root(), name, "instances.json")
    _register(name, metadata, image_root, panoptic_root, panoptic_json, instances_json=instances_json,
              derive_instances_json=derive_instances_json)
    return name


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
                j, i, p, m, _DATASETS_HINT),
        )


def coco_standard_metadata():
    """COCO panoptic (133 classes) standard metadata, as Detectron2 registers it."""
    meta = MetadataCatalog.get("coco_2017_val_panoptic")
    return {k: getattr(meta, k) for k in (
        "thing_classes", "thing_colors", "stuff_classes", "stuff_colors",
        "thing_dataset_id_to_contiguous_id", "stuff_dataset_id_to_contiguous_id")}


def register_coco_sample(root=None):
    root = root or coco_sample_root()
    _register(
        "coco_panoptic_sample",
        coco_standard_metadata(),
        os.path.join(root, "images"),
        os.path.join(root, "panoptic"),
        os.path.join(root, "panoptic_sample.json"),
        instances_json=os.path.join(default_cache_root(), "coco_panoptic_sample", "instances.json"),
        hint=_SAMPLE_HINT,
        derive_instances_json=True,
    )


def register_ade20k_panoptic(root=None):
    root = os.path.join(root or _datasets_root(), "ADEChallengeData2016")
    metadata = panoptic_metadata(ADE20K_150_CATEGORIES)
    for split, image_dir in (("train", "training"), ("val", "validation")):
        _register(
            f"ade20k_panoptic_{split}",
            metadata,
            os.path.join(root, "images", image_dir),
            os.path.join(root, f"ade20k_panoptic_{split}"),
            os.path.join(root, f"ade20k_panoptic_{split}.json"),
            hint=_DATASETS_HINT,
        )


def register_all():
    """Register every dataset of this project (idempotent)."""
    from .register_shapes import register_all_shapes

    _wrap_detectron2_coco_panoptic()
    register_coco_sample()
    register_ade20k_panoptic()
    register_all_shapes()
