"""Configuration of Panoptic SegFormer: every hyper-parameter of the paper, with its paper default.

`add_panoptic_segformer_config(cfg)` adds the keys below to a Detectron2 `CfgNode`. Detectron2 raises
a KeyError for any key of a YAML file that is not declared here or in its own defaults, so a typo in a
config is an error, never silently ignored; and every key declared here is read by the code.

Paper defaults (Appendix A.1): 300 thing queries, one stuff query per stuff class, 6 encoder /
location-decoder / mask-decoder layers, 8 heads, 4 sampling points, 3 feature levels (C3-C5),
lambda_cls = 2, lambda_seg = 1, lambda_det = 1, alpha = 1, beta = 2, t_cnf = 0.25, t_keep = 0.6,
AdamW with lr 1.4e-4 and a backbone multiplier of 0.1.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_panoptic_segformer_config", "setup_cfg"]


def add_panoptic_segformer_config(cfg):
    """Add Panoptic SegFormer's keys to `cfg` in place (idempotent) and return it."""
    if "PANOPTIC_SEGFORMER" in cfg.MODEL:
        return cfg
    cfg.MODEL.PANOPTIC_SEGFORMER = CN()
    psf = cfg.MODEL.PANOPTIC_SEGFORMER
    # Classes. Contiguous ids follow Detectron2's "standard" panoptic convention (ids over all
    # categories; which of them are things comes from the dataset metadata). These two numbers must
    # match the training dataset's metadata (checked when the model is built).
    psf.NUM_THING_CLASSES = 80
    psf.NUM_STUFF_CLASSES = 53
    # Loading MODEL.WEIGHTS whose class heads (thing classifiers) or stuff queries have another number
    # of classes is an error naming the tensors (e.g. COCO weights with another dataset's config).
    # True: fine-tune from another dataset: those tensors are skipped and keep their initialisation
    # (panoptic_segformer/checkpoint.py).
    psf.SKIP_MISMATCHED_CLASS_HEADS = False
    # Backbone features C3-C5 (strides 8/16/32), mapped to HIDDEN_DIM by the channel mapper (Sec. 3.1).
    psf.IN_FEATURES = ["res3", "res4", "res5"]
    # Feature levels of the encoder and location decoder. Levels beyond IN_FEATURES are extra
    # stride-2 3x3 convolutions (+ GroupNorm) on the last backbone feature, as Deformable DETR and the
    # official code (4 levels) do. The mask decoder always attends to the IN_FEATURES levels only.
    psf.NUM_FEATURE_LEVELS = 3
    # Offset added to the 1-based positions of the sine positional encoding before normalisation
    # (DETR: 0; mmdet's SinePositionalEncoding in the official code: -0.5).
    psf.POSITION_ENCODING_OFFSET = 0.0
    # Trainable biases in the channel mapper's convolutions (Deformable DETR's input_proj). False: frozen at
    # 0 (the official neck, mmcv's ConvModule, has no conv bias before GroupNorm; with 8 channels per group a
    # trained bias is not a no-op, and even where GroupNorm removes it AdamW turns its float-noise
    # gradients into +-lr steps).
    psf.CHANNEL_MAPPER_CONV_BIAS = True
    psf.HIDDEN_DIM = 256
    psf.NHEADS = 8
    psf.DIM_FEEDFORWARD = 1024
    psf.DROPOUT = 0.1
    # Transformer encoder of deformable attention layers (Sec. 3.2).
    psf.ENC_LAYERS = 6
    psf.ENC_N_POINTS = 4
    # Multi-scale deformable attention implementation of this model's MSDeformAttn modules (chosen per
    # module, never process-wide): "auto" (Triton kernel on CUDA tensors when available, pure PyTorch
    # otherwise), "pytorch" or "triton".
    psf.MSDA_IMPL = "auto"
    # Query decoupling (Sec. 3.3.1): N_th thing queries + one stuff query per stuff class.
    # False = the joint-matching baseline of Table 8 (N_th + N_st queries through both decoders, all
    # matched by Hungarian matching over all classes).
    psf.QUERY_DECOUPLING = True
    psf.NUM_THING_QUERIES = 300
    # Location decoder (Sec. 3.3.2): 0-6 deformable decoder layers with iterative box refinement.
    psf.LOCATION_DECODER_LAYERS = 6
    psf.DEC_N_POINTS = 4
    # Box-free variant (Table 6, row 6*): predict mask mass centres, supervised by L1 only.
    psf.BOX_FREE = False
    # Query filtering (Appendix B.2): multi-round matching on the location decoder's outputs selects
    # the promising thing queries fed to the mask decoder in training.
    psf.QUERY_FILTER = CN()
    psf.QUERY_FILTER.ENABLED = True
    psf.QUERY_FILTER.NUM_ROUNDS = 3
    psf.QUERY_FILTER.NUM_QUERIES = 45  # + 53 COCO stuff queries: the mask decoder sees < 100 (App. B.2)
    # True: the matched queries are topped up by score to NUM_QUERIES. False (the official code): only the
    # matched queries (at most NUM_QUERIES), in query order, padded per batch.
    psf.QUERY_FILTER.TOP_UP = True
    # Mask decoder (Sec. 3.3.3): cross-attention layers, masks from attention maps (Eq. 1-2).
    psf.MASK_DECODER_LAYERS = 6
    psf.MASK_DECODER_SELF_ATTN = False
    # "paper": one mask decoder for thing and stuff queries as Sec. 3.3.3 describes.
    # "official": the released code's heads, to run converted checkpoints (projects/convert/):
    # separate thing (MASK_DECODER_LAYERS, MASK_DECODER_SELF_ATTN) and stuff
    # (STUFF_MASK_DECODER_LAYERS, STUFF_MASK_DECODER_SELF_ATTN) decoders, GELU FFNs, a per-level
    # Linear+ReLU / Linear+ReLU mask head, a final attention-only "tail" layer, masks without sigmoid.
    psf.MASK_DECODER_TYPE = "paper"
    psf.STUFF_MASK_DECODER_LAYERS = 6
    psf.STUFF_MASK_DECODER_SELF_ATTN = True
    psf.DEEP_SUPERVISION = True
    # Training objective: "paper" (Sec. 3.4, panoptic_segformer/modeling/criterion.py) or "official" (the
    # released code's losses, matchers and weighting, panoptic_segformer/modeling/official_criterion.py;
    # needs MASK_DECODER_TYPE "official"). With "official" the keys below keep their meaning: DET_* and
    # MATCHER.* for the location decoder (the mask-decoder matcher doubles COST_CLASS as the official code
    # does), MASK_WEIGHT for every Dice term, CLASS_WEIGHT x 2 for the stuff class terms.
    psf.CRITERION = "paper"
    psf.OFFICIAL_LOSS = CN()
    # The released code has no stuff class loss in a batch (per GPU) without a filtered thing query
    # (panformer_head.py:988 tests the thing logits). False reproduces that; True = the intended loss.
    # Read only with CRITERION "official" (another value with "paper" is an error).
    psf.OFFICIAL_LOSS.STUFF_CLASS_LOSS_WITHOUT_THINGS = False
    # Loss weights (Eq. 3-5, Appendix A.1) and Deformable DETR's detection loss weights.
    psf.CLASS_WEIGHT = 2.0
    psf.MASK_WEIGHT = 1.0
    psf.DET_WEIGHT = 1.0
    psf.DET_CLASS_WEIGHT = 2.0
    psf.DET_BBOX_WEIGHT = 5.0
    psf.DET_GIOU_WEIGHT = 2.0
    psf.FOCAL_ALPHA = 0.25
    psf.FOCAL_GAMMA = 2.0
    # lambda_things / lambda_stuff set per image from the proportion of things and stuff (Eq. 3).
    psf.DYNAMIC_THINGS_STUFF_WEIGHT = True
    # Hungarian matcher costs (things: classification + detection + segmentation, Sec. 3.4).
    psf.MATCHER = CN()
    psf.MATCHER.COST_CLASS = 2.0
    psf.MATCHER.COST_BBOX = 5.0
    psf.MATCHER.COST_GIOU = 2.0
    psf.MATCHER.COST_MASK = 1.0
    # Inference.
    psf.TEST = CN()
    # Post-processor from panoptic_segformer.postprocessing.POSTPROCESSOR_REGISTRY: "mask_wise"
    # (Algorithm 1, Sec. 3.5), "pixel_argmax" (DETR), "pixel_argmax_prob" (MaskFormer), "heuristic",
    # "official" (the official code's inference, for converted official checkpoints).
    psf.TEST.POSTPROCESSOR = "mask_wise"
    # Mask-wise merging (Eq. 6) and "official": alpha, beta, binarisation threshold, t_cnf and t_keep,
    # each for things and stuff (the official code uses separate values; the paper's are the
    # defaults; "official" reads t_cnf as its quality thresholds and t_keep as 1 - its overlap
    # thresholds). The other post-processors use their own papers' values.
    psf.TEST.ALPHA = 1.0
    psf.TEST.BETA = 2.0
    psf.TEST.MASK_THRESHOLD = 0.5
    psf.TEST.CONF_THRESHOLD_THING = 0.25
    psf.TEST.CONF_THRESHOLD_STUFF = 0.25
    psf.TEST.KEEP_THRESHOLD_THING = 0.6
    psf.TEST.KEEP_THRESHOLD_STUFF = 0.6
    # Use only the first K mask-decoder layers at inference (Table 10); 0 = all.
    psf.TEST.NUM_MASK_DECODER_LAYERS = 0
    # Thing queries passed to the mask decoder at inference, the top ones by the location decoder's
    # class score; 0 = all N_th.
    psf.TEST.NUM_THING_QUERIES = 0
    # Where thing class scores come from at inference: "mask_decoder" (its last layer's thing FC,
    # Sec. 3.3.3) or "location_decoder" (the official code: the top DETECTIONS_PER_IMAGE
    # (query, class) pairs of the location decoder's last layer).
    psf.TEST.THING_CLASS_SOURCE = "mask_decoder"
    # Outputs: panoptic_seg, instances (top DETECTIONS_PER_IMAGE things, Table 4), sem_seg.
    psf.TEST.PANOPTIC_ON = True
    psf.TEST.INSTANCE_ON = True
    psf.TEST.SEMANTIC_ON = True
    psf.TEST.DETECTIONS_PER_IMAGE = 100

    # timm backbones (Swin, PVTv2; Appendix D) wrapped as Detectron2 backbones by
    # panoptic_segformer.modeling.backbone (MODEL.BACKBONE.NAME: "build_timm_backbone"). Stages are
    # frozen with MODEL.BACKBONE.FREEZE_AT as for ResNets (1 = patch embedding, k = + stages 1..k-1).
    cfg.MODEL.TIMM = CN()
    cfg.MODEL.TIMM.NAME = "pvt_v2_b2"  # any timm model name
    # Local ImageNet weights (timm, or the original Swin/PVTv2 release format); "" = random init.
    # Nothing is downloaded at run time; a missing file is an error.
    cfg.MODEL.TIMM.PRETRAINED_WEIGHTS = ""
    cfg.MODEL.TIMM.DROP_PATH_RATE = 0.1
    # LayerNorm on each output feature (Swin's detection backbone has one per output stage).
    cfg.MODEL.TIMM.OUT_NORM = False
    cfg.MODEL.TIMM.OUT_FEATURES = ["res3", "res4", "res5"]

    # Solver extras (Appendix A.1): AdamW, backbone LR multiplier, full-model gradient clipping.
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # More LR multipliers by parameter name, as the official config's paramwise_cfg custom_keys
    # (sampling_offsets / reference_points 0.1): [[substring, factor], ...]. A parameter whose full name
    # contains a substring gets base LR x factor (the first listed match; backbone parameters keep
    # BACKBONE_MULTIPLIER and take no other).
    cfg.SOLVER.PARAM_LR_MULTIPLIERS = []
    # Detectron2's CLIP_TYPE "value"/"norm" clip per parameter; "full_model" clips the global norm
    # of all parameters together (as DETR / Deformable DETR do).

    # Intra-op threads of the training process (panoptic_segformer.engine.CPUThreadsHook). 0 = auto: on a
    # CPU device, warm up with 1 thread and measure the cores available to the process; keep 1 thread when
    # no other core is free, else time a few iterations with 1 thread and with the free cores (at most
    # torch's default) and keep the faster (on a busy CPU, 1 thread can be 2-5x faster; on an idle one,
    # more threads are); on CUDA, 0 leaves the count alone. 0 rather than "auto" because yacs refuses an
    # int override such as `SOLVER.CPU_THREADS 2` for a string key. n >= 1: torch.set_num_threads(n) for
    # the whole run, on any device. The count changes only the order of floating-point sums; seeded CPU
    # runs that must match bit for bit need a fixed count, since two "auto" runs may pick different ones.
    cfg.SOLVER.CPU_THREADS = 0
    # With CPU_THREADS 0: iterations between two probes, since the machine's load changes; 0 = probe once.
    cfg.SOLVER.CPU_THREADS_PROBE_PERIOD = 1000
    # Signals that stop training gracefully (panoptic_segformer/resume.py): all processes stop at the same
    # iteration, rank 0 writes its checkpoint, and the process exits with code 75 (then run the same command
    # with --resume). SLURM sends SIGTERM before it kills a job, or the signal of `--signal=USR1@120`.
    # [] = Python's default handling (the process dies at once; --resume continues from the last checkpoint).
    cfg.SOLVER.PREEMPTION_SIGNALS = ["SIGTERM", "SIGUSR1"]

    # Data (Sec. 4.1): augmentations of PanopticSegFormerDatasetMapper.
    # With this probability, DETR-style crop: resize the short side to one of CROP_RESIZE_SHORT,
    # random crop (INPUT.CROP, absolute_range 384-600), then the multi-scale resize.
    cfg.INPUT.DETR_CROP_PROB = 0.5
    cfg.INPUT.CROP_RESIZE_SHORT = [400, 500, 600]
    # Cap on the long side of that pre-crop resize; 0 = none (the paper-text pipeline). The authors' config
    # caps it at 4200 (Resize img_scale (400..600, 4200)).
    cfg.INPUT.CROP_RESIZE_MAX_SIZE = 0
    # Which training/test pipeline the dataset mapper builds from the INPUT keys:
    # "paper": Detectron2's ResizeShortestEdge / RandomCrop / RandomFlip (PIL resize), tight boxes of the
    #   augmented masks, stuff merged per class, crop survivors = non-empty masks;
    # "official": the authors' released pipeline, mmdet 2.12 / mmcv 1.3.4 reproduced
    #   (panoptic_segformer/data/official_augmentation.py): flip, then AutoAugment between the multi-scale
    #   resize (MIN_SIZE_TRAIN x MAX_SIZE_TRAIN) and resize (CROP_RESIZE_SHORT x CROP_RESIZE_MAX_SIZE) ->
    #   crop (CROP.SIZE, absolute_range) -> multi-scale resize, with mmcv's size rounding and cv2 bilinear;
    #   annotation boxes transformed with the image; test: mmcv.imrescale to (MAX_SIZE_TEST, MIN_SIZE_TEST).
    #   It needs RANDOM_FLIP horizontal|none, MIN_SIZE_TRAIN_SAMPLING choice, CROP.TYPE absolute_range and
    #   DETR_CROP_PROB 0.5 (AutoAugment's uniform choice); other values are an error naming the key.
    cfg.INPUT.AUGMENTATION = "paper"
    cfg.INPUT.SIZE_DIVISIBILITY = 32
    # Images smaller than this (either side, in pixels) are rejected with an error naming the file.
    cfg.INPUT.MIN_IMAGE_SIZE = 32

    # Robustness to natural corruptions (Sec. 4.4, Table 11, COCO-C): the test-time mapper corrupts each
    # image right after reading it with imagecorruptions' NAME at SEVERITY (1-5), seeded by the image
    # id (panoptic_segformer/data/corruptions.py). "" = clean images. Under cfg.TEST, next to
    # Detectron2's TEST.AUG, because it changes the evaluation data, not the model: it applies to any
    # checkpoint and never to training (MODEL.PANOPTIC_SEGFORMER.TEST holds the model's inference).
    cfg.TEST.CORRUPTION = CN()
    cfg.TEST.CORRUPTION.NAME = ""
    cfg.TEST.CORRUPTION.SEVERITY = 1
    return cfg


def setup_cfg(config_file, opts=(), freeze=True):
    """The Detectron2 config of ``config_file`` with this project's keys and ``opts`` (KEY VALUE ...).

    The one config setup shared by ``train_net.py`` and every tool under ``projects/``; a tool changes
    what it needs on the unfrozen config (``freeze=False``) and freezes it itself. A missing file or
    an odd number of overrides is an error naming it (FileNotFoundError / ValueError); an unknown key is
    Detectron2's KeyError.
    """
    import os

    from detectron2.config import get_cfg

    if not config_file or not os.path.isfile(config_file):
        raise FileNotFoundError(f"--config-file {config_file!r} does not exist")
    opts = list(opts or [])
    if len(opts) % 2:
        raise ValueError(f"config overrides must be KEY VALUE pairs, got {opts}")
    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    if freeze:
        cfg.freeze()
    return cfg
