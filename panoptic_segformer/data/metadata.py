"""Reading the class sets of a panoptic dataset from its Detectron2 metadata.

Two conventions are in use for panoptic datasets registered with Detectron2, and both are accepted:

- Detectron2's builtin "standard" panoptic metadata (``coco_2017_*_panoptic``, this project's own
  registrations): contiguous ids over all categories; ``thing_dataset_id_to_contiguous_id`` holds the
  things and ``stuff_dataset_id_to_contiguous_id`` the stuff only; ``thing_classes`` and
  ``stuff_classes`` both list every name, indexed by contiguous id.
- Mask2Former's (``register_coco_panoptic_annos_semseg``, its ADE20K / Cityscapes panoptic
  registrations): the same contiguous ids, but ``stuff_dataset_id_to_contiguous_id`` holds *every*
  category ("to use the sem_seg evaluator") and ``thing_classes`` lists the things only.

In both, the stuff classes are the categories that are not things. Detectron2's "separated"
convention of Panoptic FPN (stuff id 0 = "things") is not a panoptic class set and is rejected.
"""
from typing import List, Tuple

__all__ = ["panoptic_class_ids", "thing_class_names"]


def _get(meta, key, default=None):
    return meta.get(key, default) if isinstance(meta, dict) else getattr(meta, key, default)


def panoptic_class_ids(meta, dataset_name: str = "dataset") -> Tuple[List[int], List[int]]:
    """(thing_ids, stuff_ids): sorted contiguous ids of the thing and stuff classes of a panoptic
    dataset's metadata (a ``Metadata`` or a dict), in either convention of the module docstring.

    Raises ValueError naming `dataset_name` if the metadata has no thing id map, maps one dataset
    id to two contiguous ids, or its contiguous ids are not 0..K-1 over thing and stuff classes.
    """
    thing_map = _get(meta, "thing_dataset_id_to_contiguous_id")
    if thing_map is None:
        raise ValueError(f"dataset {dataset_name!r}: metadata has no thing_dataset_id_to_contiguous_id "
                         "(register it as a panoptic dataset, e.g. with register_panoptic_dataset)")
    stuff_map = _get(meta, "stuff_dataset_id_to_contiguous_id", None) or {}
    for dataset_id, contiguous in stuff_map.items():
        if dataset_id in thing_map and thing_map[dataset_id] != contiguous:
            raise ValueError(
                f"dataset {dataset_name!r}: category {dataset_id} has contiguous id {thing_map[dataset_id]} "
                f"in thing_dataset_id_to_contiguous_id but {contiguous} in stuff_dataset_id_to_contiguous_id")
    thing_ids = sorted(set(thing_map.values()))
    # Stuff = the categories that are not things (Mask2Former lists the things in the stuff map too).
    stuff_ids = sorted({c for d, c in stuff_map.items() if d not in thing_map})
    if len(thing_ids) != len(thing_map) or len(stuff_ids) != len(stuff_map) - len(set(stuff_map) & set(thing_map)):
        raise ValueError(f"dataset {dataset_name!r}: two categories share a contiguous id in its metadata")
    all_ids = sorted(thing_ids + stuff_ids)
    if all_ids != list(range(len(all_ids))):
        raise ValueError(
            f"dataset {dataset_name!r}: the contiguous ids of its thing and stuff classes must be 0..K-1, "
            f"each once, got things {thing_ids} and stuff {stuff_ids} (Detectron2's 'separated' "
            "convention of Panoptic FPN is not a panoptic class set; register the dataset with "
            "register_panoptic_dataset)")
    return thing_ids, stuff_ids


def thing_class_names(meta, dataset_name: str = "dataset") -> List[str]:
    """Names of the thing classes in order of their contiguous ids: ``thing_classes`` lists every
    class (standard convention, indexed by contiguous id) or only the things (Mask2Former's)."""
    thing_ids, stuff_ids = panoptic_class_ids(meta, dataset_name)
    names = list(_get(meta, "thing_classes", []))
    if len(names) == len(thing_ids) + len(stuff_ids):
        return [names[c] for c in thing_ids]
    if len(names) == len(thing_ids):
        return names
    raise ValueError(f"dataset {dataset_name!r}: thing_classes has {len(names)} names, expected "
                     f"{len(thing_ids) + len(stuff_ids)} (all classes) or {len(thing_ids)} (the things)")
