#!/usr/bin/env python
"""Parameter count of a Panoptic SegFormer config, total and per component.

    python projects/benchmarks/model_stats.py --config-file configs/coco/panoptic_segformer_R50_24ep.yaml

Builds the model on CPU at random initialisation (no weights needed) and prints a markdown table.
"""
import argparse
from collections import OrderedDict

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from panoptic_segformer import add_panoptic_segformer_config

# Paper component -> attribute prefixes of PanopticSegFormer.
COMPONENTS = OrderedDict([
    ("backbone", ("backbone.",)),
    ("channel mapper", ("channel_mapper.",)),
    ("transformer encoder", ("encoder.",)),
    ("location decoder (incl. auxiliary heads)", ("location_decoder.",)),
    ("stuff queries", ("stuff_query_embed.",)),
    ("mask decoder (incl. class FCs and mask heads)", ("mask_decoder.",)),
])


def parameter_table(model):
    """OrderedDict component -> number of parameters (every parameter counted exactly once)."""
    counts = OrderedDict((name, 0) for name in COMPONENTS)
    counts["other"] = 0
    for pname, p in model.named_parameters():
        for comp, prefixes in COMPONENTS.items():
            if pname.startswith(prefixes):
                counts[comp] += p.numel()
                break
        else:
            counts["other"] += p.numel()
    if not counts["other"]:
        del counts["other"]
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args()
    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu"] + args.opts)
    model = build_model(cfg)
    counts = parameter_table(model)
    total = sum(counts.values())
    print(f"Config: {args.config_file}")
    print("| component | parameters (M) |\n| --- | ---: |")
    for name, n in counts.items():
        print(f"| {name} | {n / 1e6:.3f} |")
    print(f"| **total** | **{total / 1e6:.3f}** |")
    print(f"trainable: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.3f} M")


if __name__ == "__main__":
    main()
