"""DataLoader workers run the mapper with one intra-op thread: on a 2-core machine the
workers' default thread pools oversubscribed the cores and slowed training several times.

OpenCV's thread count must be set in the parent before the workers fork: setting it inside a forked
worker deadlocks once the parent's OpenCV pool has started and gone idle. The test starts that pool first,
so a mapper that set the threads inside its workers would hang here (the loader's timeout turns the hang
into a failure)."""
import time

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog, build_detection_test_loader

from conftest import small_cfg
from panoptic_segformer import PanopticSegFormerDatasetMapper


def _start_opencv_pool():
    image = np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    for _ in range(3):
        cv2.GaussianBlur(image, (15, 15), 3)
    time.sleep(0.5)  # the pool's threads go idle, waiting on their condition variable


def test_workers_map_with_one_thread_without_deadlock_after_the_parent_used_opencv():
    threads_before = (torch.get_num_threads(), cv2.getNumThreads())
    _start_opencv_pool()
    cfg = small_cfg()
    cfg.defrost()
    cfg.DATALOADER.NUM_WORKERS = 1
    try:
        mapper = PanopticSegFormerDatasetMapper(cfg, is_train=True)

        def probe(d):
            out = mapper(d)
            out["threads"] = (torch.get_num_threads(), cv2.getNumThreads())
            return out

        dicts = DatasetCatalog.get("shapes_panoptic_train_tiny")[:2]
        _start_opencv_pool()  # again right before the fork (the pool the workers would inherit)
        loader = build_detection_test_loader(dicts, mapper=probe, num_workers=1)
        loader.timeout = 60  # a deadlocked worker fails the test instead of hanging it
        assert [batch[0]["threads"] for batch in loader] == [(1, 1), (1, 1)]
        assert torch.get_num_threads() == threads_before[0]  # the main process keeps its torch threads
    finally:
        cv2.setNumThreads(threads_before[1])


def test_mapper_without_workers_leaves_opencv_threads_alone():
    before = cv2.getNumThreads()
    cfg = small_cfg()
    cfg.defrost()
    cfg.DATALOADER.NUM_WORKERS = 0
    PanopticSegFormerDatasetMapper(cfg, is_train=True)
    assert cv2.getNumThreads() == before
