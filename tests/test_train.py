"""End-to-end training through the project's Trainer (train_net.py's) on CPU: runs are reproducible, odd
inputs train, NaN losses stop training, train_net.py trains and evaluates (multi-process runs:
test_multiprocess.py; that the model learns, PQ >= 90 on overfit shapes images and the COCO sample's loss
halving: `python -m projects.benchmarks.overfit`, docs/INSTALL.md "Portability")."""
import os
import subprocess
import sys

import pytest
import torch
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

from conftest import REPO_ROOT, small_cfg
from panoptic_segformer.engine import Trainer


def _losses(trainer):
    """The total loss of every iteration, in order (Detectron2's EventStorage history)."""
    return [v for v, _ in trainer.storage.history("total_loss").values()]


def test_seeded_cpu_runs_give_identical_losses(tmp_path):
    runs = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        # A fixed thread count: "auto" (0) may pick another count in each run, which changes the order
        # of floating-point sums (docs/GETTING_STARTED.md, "CPU threads").
        cfg = small_cfg("SOLVER.MAX_ITER", "8", "TEST.EVAL_PERIOD", "0", "SEED", "123",
                        "SOLVER.CPU_THREADS", str(torch.get_num_threads()), "DATASETS.TEST", "()",
                        "OUTPUT_DIR", str(out))
        seed_all_rng(cfg.SEED)  # what train_net's default_setup does with cfg.SEED
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        runs.append(_losses(trainer))
    # Same process, thread count and code path: every iteration's loss is bit-identical.
    assert len(runs[0]) == 8 and runs[0] == runs[1]


def test_image_with_no_annotated_segment_trains():
    cfg = small_cfg()
    model = Trainer.build_model(cfg)
    model.train()
    h, w = 128, 160
    empty_things = Instances((h, w), gt_classes=torch.zeros(0, dtype=torch.long),
                             gt_masks=BitMasks(torch.zeros((0, h, w), dtype=torch.bool)),
                             gt_boxes=Boxes(torch.zeros((0, 4))))
    empty_stuff = Instances((h, w), gt_classes=torch.zeros(0, dtype=torch.long),
                            gt_masks=BitMasks(torch.zeros((0, h, w), dtype=torch.bool)))
    batch = [{"image": torch.randint(0, 255, (3, h, w), dtype=torch.uint8),
              "instances": empty_things, "stuff": empty_stuff}]
    with EventStorage():
        losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    # stuff queries are still trained as negatives, thing queries towards "no object"
    assert losses["loss_stuff_cls_1"].item() > 0 or losses["loss_things_cls_1"].item() > 0


def test_nan_loss_stops_training_with_floating_point_error(tmp_path):
    cfg = small_cfg("SOLVER.MAX_ITER", "3", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    with torch.no_grad():
        trainer.model.mask_decoder.stuff_class_embed[-1].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"'loss_stuff_cls_1': (np\.float64\()?nan"):
        trainer.train()


def test_train_net_command_line_trains_then_evaluates(tmp_path):
    """`train_net.py` as users run it (default_setup, logging, launch with 1 process), then
    `--eval-only` on the checkpoint it wrote."""
    base = [sys.executable, os.path.join(REPO_ROOT, "train_net.py"),
            "--config-file", os.path.join(REPO_ROOT, "configs/shapes/panoptic_segformer_shapes.yaml")]
    opts = ["DATASETS.TRAIN", "('shapes_panoptic_train_tiny',)", "DATASETS.TEST", "('shapes_panoptic_val_tiny',)",
            "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MIN_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "2",
            "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "DATALOADER.NUM_WORKERS", "0",
            "OUTPUT_DIR", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(base + opts, capture_output=True, text=True, timeout=600, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "copypaste: PQ,SQ,RQ" in log and os.path.isfile(tmp_path / "model_final.pth")
    proc = subprocess.run(base + ["--eval-only"] + opts + ["MODEL.WEIGHTS", str(tmp_path / "model_final.pth")],
                          capture_output=True, text=True, timeout=600, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "copypaste: PQ,SQ,RQ" in log
