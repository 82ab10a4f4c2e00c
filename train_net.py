#!/usr/bin/env python
"""Panoptic SegFormer training / evaluation script (Detectron2's DefaultTrainer).

    python train_net.py --config-file configs/coco/panoptic_segformer_R50_24ep.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS /path/to/model.pth
    python train_net.py --config-file configs/shapes/panoptic_segformer_shapes.yaml   # CPU, minutes

The command line, the config and the launch of the processes; the Trainer and what it is built from
live in ``panoptic_segformer/engine.py``.

On a preemptible cluster: SIGTERM or SIGUSR1 (SOLVER.PREEMPTION_SIGNALS) stops every process at the same
iteration with a checkpoint, and the command exits with code 75 (``panoptic_segformer.resume.
PREEMPTION_EXIT_CODE``); run the same command with ``--resume`` to continue exactly where it stopped.
"""
import logging
import sys

import detectron2.utils.comm as comm
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils.logger import setup_logger

from panoptic_segformer.checkpoint import PanopticSegFormerCheckpointer
from panoptic_segformer.config import setup_cfg
from panoptic_segformer.engine import Trainer
from panoptic_segformer.launch import check_launch, forward_signals_to_children
from panoptic_segformer.resume import PREEMPTION_EXIT_CODE, parse_preemption_signals


def setup(args):
    cfg = setup_cfg(args.config_file, args.opts)
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="panoptic_segformer")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        PanopticSegFormerCheckpointer.from_config(model, cfg, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def run(args):
    """``launch(main)`` with this machine's processes; a preemption in any of them exits with
    PREEMPTION_EXIT_CODE (``launch`` reports a worker's exit code as an exception)."""
    check_launch(args.num_gpus * args.num_machines)
    if args.num_gpus > 1:  # this process only waits for its workers: pass the preemption signals on
        signals = setup_cfg(args.config_file, args.opts).SOLVER.PREEMPTION_SIGNALS
        forward_signals_to_children(parse_preemption_signals(signals))
    try:
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    except Exception as e:
        if getattr(e, "exit_code", None) == PREEMPTION_EXIT_CODE:  # torch.multiprocessing's ProcessExitedException
            sys.exit(PREEMPTION_EXIT_CODE)
        raise


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    logging.getLogger("panoptic_segformer").info("Command line arguments: %s", args)
    run(args)
