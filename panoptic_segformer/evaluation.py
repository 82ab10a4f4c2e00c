"""Evaluation glue: mask AP of the thing results (Table 4) with Detectron2's COCOEvaluator on
datasets that use Detectron2's "standard" or Mask2Former's panoptic metadata (data/metadata.py)."""
import copy

from detectron2.data.catalog import Metadata
from detectron2.evaluation import COCOEvaluator

from .data.metadata import thing_class_names

__all__ = ["ThingMaskAPEvaluator"]


class ThingMaskAPEvaluator(COCOEvaluator):
    """COCOEvaluator (task "segm") for models that predict Detectron2's standard panoptic contiguous
    ids (over all categories, things possibly interleaved with stuff, e.g. ADE20K).

    COCOEvaluator expects thing ids 0..K_th-1 and ``thing_classes`` of length K_th; the standard
    panoptic metadata lists all classes there (Mask2Former's lists the things only). This evaluator
    scores in thing-index space: its metadata view names only the things, and predicted classes are
    remapped before COCOEvaluator sees them. Uses the pure-Python COCO API (``use_fast_impl=False``), which needs no C++ op.
    """

    def __init__(self, dataset_name, output_dir=None):
        super().__init__(dataset_name, tasks=("segm",), output_dir=output_dir, use_fast_impl=False)
        meta = self._metadata
        things = sorted(meta.thing_dataset_id_to_contiguous_id.items(), key=lambda kv: kv[1])
        self._to_thing_index = {contiguous: i for i, (_, contiguous) in enumerate(things)}
        self._metadata = Metadata(
            name=meta.name,
            json_file=meta.json_file,
            thing_classes=thing_class_names(meta, meta.name),
            thing_dataset_id_to_contiguous_id={d: i for i, (d, _) in enumerate(things)},
        )

    def process(self, inputs, outputs):
        remapped = []
        for output in outputs:
            if "instances" in output:
                output = dict(output)
                instances = copy.copy(output["instances"])
                classes = instances.pred_classes.tolist()
                unknown = sorted({c for c in classes if c not in self._to_thing_index})
                if unknown:
                    raise ValueError(f"instances predict non-thing class id(s) {unknown} for "
                                     f"dataset {self._metadata.name!r}")
                instances.pred_classes = instances.pred_classes.new_tensor(
                    [self._to_thing_index[c] for c in classes])
                output["instances"] = instances
            remapped.append(output)
        super().process(inputs, remapped)
