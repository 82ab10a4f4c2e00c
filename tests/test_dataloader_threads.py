"""DataLoader workers run the mapper with one intra-op thread (issue 15): on a 2-core machine the
workers' default thread pools oversubscribed the cores and slowed training several times."""
import cv2
import torch
from detectron2.data import DatasetCatalog, build_detection_test_loader

from conftest import small_cfg
from panoptic_segformer import PanopticSegFormerDatasetMapper


def test_mapper_runs_with_one_thread_in_workers_and_leaves_the_main_process_alone():
    mapper = PanopticSegFormerDatasetMapper(small_cfg(), is_train=True)

    def probe(d):
        out = mapper(d)
        out["threads"] = (torch.get_num_threads(), cv2.getNumThreads())
        return out

    dicts = DatasetCatalog.get("shapes_panoptic_train_tiny")[:2]
    loader = build_detection_test_loader(dicts, mapper=probe, num_workers=1)
    assert [batch[0]["threads"] for batch in loader] == [(1, 1), (1, 1)]
    before = torch.get_num_threads()
    assert "instances" in mapper(dicts[0]) and torch.get_num_threads() == before  # main process: unchanged
