"""Detectron2 glue: each part of Panoptic SegFormer built from the config (``MODEL.PANOPTIC_SEGFORMER.*``).

:meth:`PanopticSegFormer.from_config <panoptic_segformer.panoptic_segformer.PanopticSegFormer.from_config>`
calls these builders; the parts themselves (``modeling/``, ``postprocessing/``) take plain arguments.
Mask decoders are built by name from :data:`MASK_DECODER_REGISTRY` (``MASK_DECODER_TYPE``), as
post-processors are from ``POSTPROCESSOR_REGISTRY`` (``TEST.POSTPROCESSOR``). Every error names the
config key.
"""
from typing import Callable, Dict

from fvcore.common.registry import Registry
from torch import nn

from .modeling.criterion import PanopticSegFormerCriterion
from .modeling.encoder import DeformableTransformerEncoder
from .modeling.location_decoder import LocationDecoder
from .modeling.mask_decoder import MaskDecoder
from .modeling.matcher import HungarianMatcher
from .modeling.official_criterion import OfficialCriterion
from .modeling.official_mask_decoder import OfficialMaskDecoder
from .modeling.query_selection import ThingQuerySelection
from .postprocessing import POSTPROCESSOR_REGISTRY, MaskWiseMerging, build_postprocessor
from .postprocessing.common import check_unit_interval

__all__ = [
    "MASK_DECODER_REGISTRY",
    "build_channel_mapper",
    "build_criterion",
    "build_encoder",
    "build_location_decoder",
    "build_mask_decoder",
    "build_postprocessor_from_config",
    "build_query_selection",
]

MASK_DECODER_REGISTRY = Registry("PANOPTIC_SEGFORMER_MASK_DECODER")
MASK_DECODER_REGISTRY.__doc__ = """Mask decoders by ``MODEL.PANOPTIC_SEGFORMER.MASK_DECODER_TYPE``: functions
``(cfg, num_thing_classes, n_levels) -> nn.Module`` with :class:`~.modeling.mask_decoder.MaskDecoder`'s call
signature and output format. Built-in: "paper" (Sec. 3.3.3) and "official" (the released code's heads)."""


def _register(name: str) -> Callable:
    def deco(fn):
        MASK_DECODER_REGISTRY._do_register(name, fn)  # noqa: SLF001 (fvcore's register uses __name__)
        return fn

    return deco


def build_channel_mapper(cfg, input_shapes: Dict) -> nn.ModuleList:
    """Channel mapper (Sec. 3.1): per backbone level a 1x1 conv to HIDDEN_DIM + GroupNorm, as Deformable
    DETR's input_proj; levels beyond IN_FEATURES (NUM_FEATURE_LEVELS): 3x3 stride-2 conv + GroupNorm, the
    first on the last backbone feature. CHANNEL_MAPPER_CONV_BIAS False: the conv biases stay 0 (frozen)."""
    psf = cfg.MODEL.PANOPTIC_SEGFORMER
    d, n_levels, names = psf.HIDDEN_DIM, psf.NUM_FEATURE_LEVELS, list(psf.IN_FEATURES)
    for f in names:
        if f not in input_shapes:
            raise ValueError(f"MODEL.PANOPTIC_SEGFORMER.IN_FEATURES: backbone has no output {f!r} "
                             f"(it has {sorted(input_shapes)})")
    if n_levels < len(names):
        raise ValueError(f"MODEL.PANOPTIC_SEGFORMER.NUM_FEATURE_LEVELS ({n_levels}) must be >= the "
                         f"number of IN_FEATURES {names}")
    mapper = nn.ModuleList(
        nn.Sequential(nn.Conv2d(input_shapes[f].channels, d, kernel_size=1), nn.GroupNorm(32, d)) for f in names)
    for i in range(len(names), n_levels):
        c_in = input_shapes[names[-1]].channels if i == len(names) else d
        mapper.append(nn.Sequential(nn.Conv2d(c_in, d, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, d)))
    if not isinstance(psf.CHANNEL_MAPPER_CONV_BIAS, bool):
        raise ValueError(f"MODEL.PANOPTIC_SEGFORMER.CHANNEL_MAPPER_CONV_BIAS must be True or False, got "
                         f"{psf.CHANNEL_MAPPER_CONV_BIAS!r}")
    for proj in mapper:
        nn.init.xavier_uniform_(proj[0].weight, gain=1)
        nn.init.constant_(proj[0].bias, 0)
        # mmcv's ConvModule (official neck) has no conv bias before its GroupNorm: a zero bias that never
        # trains is the same function (kept so converted checkpoints, which hold zeros, load unchanged).
        proj[0].bias.requires_grad_(psf.CHANNEL_MAPPER_CONV_BIAS)
    return mapper


def build_encoder(cfg) -> DeformableTransformerEncoder:
    """Transformer encoder (Sec. 3.2)."""
    psf = cfg.MODEL.PANOPTIC_SEGFORMER
    return DeformableTransformerEncoder(
        d_model=psf.HIDDEN_DIM, num_layers=psf.ENC_LAYERS, n_heads=psf.NHEADS, n_levels=psf.NUM_FEATURE_LEVELS,
        n_points=psf.ENC_N_POINTS, d_ffn=psf.DIM_FEEDFORWARD, dropout=psf.DROPOUT, msda_impl=psf.MSDA_IMPL)


def build_location_decoder(cfg, num_classes: int, num_queries: int) -> LocationDecoder:
    """Location decoder (Sec. 3.3.2) over all NUM_FEATURE_LEVELS levels."""
    psf = cfg.MODEL.PANOPTIC_SEGFORMER
    return LocationDecoder(
        num_classes, d_model=psf.HIDDEN_DIM, num_layers=psf.LOCATION_DECODER_LAYERS, num_queries=num_queries,
        n_heads=psf.NHEADS, n_levels=psf.NUM_FEATURE_LEVELS, n_points=psf.DEC_N_POINTS,
        d_ffn=psf.DIM_FEEDFORWARD, dropout=psf.DROPOUT, box_free=psf.BOX_FREE, msda_impl=psf.MSDA_IMPL)


def build_mask_decoder(cfg, num_thing_classes: int, n_levels: int) -> nn.Module:
    """The mask decoder registered as MODEL.PANOPTIC_SEGFORMER.MASK_DECODER_TYPE (Sec. 3.3.3)."""
    name = cfg.MODEL.PANOPTIC_SEGFORMER.MASK_DECODER_TYPE
    if name not in MASK_DECODER_REGISTRY:
        raise ValueError(f"MODEL.PANOPTIC_SEGFORMER.MASK_DECODER_TYPE must be one of "
                         f"{sorted(n for n, _ in MASK_DECODER_REGISTRY)}, got {name!r}")
    return MASK_DECODER_REGISTRY.get(name)(cfg, num_thing_classes, n_levels)


@_register("paper")
def build_paper_mask_decoder(cfg, num_thing_classes: int, n_levels: int) -> MaskDecoder:
    """The paper's mask decoder: one decoder for thing and stuff queries (Sec. 3.3.3)."""
    psf = cfg.MODEL.PANOPTIC_SEGFORMER
    return MaskDecoder(num_thing_classes, d_model=psf.HIDDEN_DIM, num_layers=psf.MASK_DECODER_LAYERS,
                       n_heads=psf.NHEADS, n_levels=n_levels, d_ffn=psf.DIM_FEEDFORWARD, dropout=psf.DROPOUT,
                       self_attn=psf.MASK_DECODER_SELF_ATTN)


@_register("official")
def build_official_mask_decoder(cfg, num_thing_classes: int, n_levels: int) -> OfficialMaskDecoder:
    """The released code's thing and stuff decoders, to run converted official checkpoints."""
    psf = cfg.MODEL.PANOPTIC_SEGFORMER
    if not psf.QUERY_DECOUPLING:
        raise ValueError("MASK_DECODER_TYPE 'official' needs MODEL.PANOPTIC_SEGFORMER.QUERY_DECOUPLING True "
                         "(separate thing and stuff decoders)")
    if psf.TEST.NUM_MASK_DECODER_LAYERS:
        raise ValueError("MODEL.PANOPTIC_SEGFORMER.TEST.NUM_MASK_DECODER_LAYERS must be 0 with "
                         "MASK_DECODER_TYPE 'official' (its masks come from the final tail layer)")
    return OfficialMaskDecoder(
        num_thing_classes, d_model=psf.HIDDEN_DIM, n_heads=psf.NHEADS, d_ffn=psf.DIM_FEEDFORWARD,
        num_thing_layers=psf.MASK_DECODER_LAYERS, num_stuff_layers=psf.STUFF_MASK_DECODER_LAYERS,
        thing_self_attn=psf.MASK_DECODER_SELF_ATTN, stuff_self_attn=psf.STUFF_MASK_DECODER_SELF_ATTN,
        n_levels=n_levels)


def build_criterion(cfg, num_classes: int, num_stuff: int) -> PanopticSegFormerCriterion:
    """Hungarian matcher + losses: the paper's (Sec. 3.4, Eq. 3-5; ``num_stuff`` 0 for joint matching,
    Table 8) or, with CRITERION "official", the released code's (:class:`OfficialCriterion`)."""
    psf = cfg.MODEL.PANOPTIC_SEGFORMER
    key = "MODEL.PANOPTIC_SEGFORMER."
    if psf.CRITERION not in ("paper", "official"):
        raise ValueError(f"{key}CRITERION must be 'paper' or 'official', got {psf.CRITERION!r}")
    if not isinstance(psf.OFFICIAL_LOSS.STUFF_CLASS_LOSS_WITHOUT_THINGS, bool):
        raise ValueError(f"{key}OFFICIAL_LOSS.STUFF_CLASS_LOSS_WITHOUT_THINGS must be True or False, got "
                         f"{psf.OFFICIAL_LOSS.STUFF_CLASS_LOSS_WITHOUT_THINGS!r}")
    matcher = HungarianMatcher(
        cost_class=psf.MATCHER.COST_CLASS, cost_bbox=psf.MATCHER.COST_BBOX, cost_giou=psf.MATCHER.COST_GIOU,
        cost_mask=psf.MATCHER.COST_MASK, focal_alpha=psf.FOCAL_ALPHA, focal_gamma=psf.FOCAL_GAMMA,
        box_free=psf.BOX_FREE)
    if psf.CRITERION == "official":
        for bad, why in ((psf.MASK_DECODER_TYPE != "official", "MASK_DECODER_TYPE 'official'"),
                         (not psf.QUERY_DECOUPLING or num_stuff == 0, "QUERY_DECOUPLING True"),
                         (psf.BOX_FREE, "BOX_FREE False"), (not psf.DEEP_SUPERVISION, "DEEP_SUPERVISION True"),
                         (psf.LOCATION_DECODER_LAYERS == 0, "LOCATION_DECODER_LAYERS > 0")):
            if bad:
                raise ValueError(f"{key}CRITERION 'official' needs {key}{why}")
        return OfficialCriterion(
            num_classes, num_stuff, matcher,
            OfficialCriterion.official_mask_matcher(
                psf.MATCHER.COST_CLASS, psf.MATCHER.COST_BBOX, psf.MATCHER.COST_GIOU, psf.MATCHER.COST_MASK,
                psf.FOCAL_ALPHA, psf.FOCAL_GAMMA),
            loss_weight_cls=psf.CLASS_WEIGHT, loss_weight_seg=psf.MASK_WEIGHT, loss_weight_det=psf.DET_WEIGHT,
            det_weight_class=psf.DET_CLASS_WEIGHT, det_weight_bbox=psf.DET_BBOX_WEIGHT,
            det_weight_giou=psf.DET_GIOU_WEIGHT, focal_alpha=psf.FOCAL_ALPHA, focal_gamma=psf.FOCAL_GAMMA,
            dynamic_things_stuff_weight=psf.DYNAMIC_THINGS_STUFF_WEIGHT,
            stuff_class_loss_without_things=psf.OFFICIAL_LOSS.STUFF_CLASS_LOSS_WITHOUT_THINGS)
    if psf.OFFICIAL_LOSS.STUFF_CLASS_LOSS_WITHOUT_THINGS:
        raise ValueError(f"{key}OFFICIAL_LOSS.STUFF_CLASS_LOSS_WITHOUT_THINGS is read only with "
                         f"{key}CRITERION 'official' (got CRITERION 'paper')")
    return PanopticSegFormerCriterion(
        num_classes, num_stuff, matcher, loss_weight_cls=psf.CLASS_WEIGHT, loss_weight_seg=psf.MASK_WEIGHT,
        loss_weight_det=psf.DET_WEIGHT, det_weight_class=psf.DET_CLASS_WEIGHT,
        det_weight_bbox=psf.DET_BBOX_WEIGHT, det_weight_giou=psf.DET_GIOU_WEIGHT, focal_alpha=psf.FOCAL_ALPHA,
        focal_gamma=psf.FOCAL_GAMMA, deep_supervision=psf.DEEP_SUPERVISION, box_free=psf.BOX_FREE,
        dynamic_things_stuff_weight=psf.DYNAMIC_THINGS_STUFF_WEIGHT)


def build_query_selection(cfg, matcher: HungarianMatcher) -> ThingQuerySelection:
    """Thing-query selection (App. B.2): query filtering in training, TEST.NUM_THING_QUERIES or the official
    (query, class) pairs (TEST.THING_CLASS_SOURCE "location_decoder") at inference; with joint matching
    (QUERY_DECOUPLING False) or no location-decoder layer, every query is kept."""
    psf = cfg.MODEL.PANOPTIC_SEGFORMER
    t = psf.TEST
    if t.THING_CLASS_SOURCE not in ("mask_decoder", "location_decoder"):
        raise ValueError(f"MODEL.PANOPTIC_SEGFORMER.TEST.THING_CLASS_SOURCE must be 'mask_decoder' or "
                         f"'location_decoder', got {t.THING_CLASS_SOURCE!r}")
    pairs = t.THING_CLASS_SOURCE == "location_decoder"
    if pairs and (psf.LOCATION_DECODER_LAYERS == 0 or not psf.QUERY_DECOUPLING):
        raise ValueError("MODEL.PANOPTIC_SEGFORMER.TEST.THING_CLASS_SOURCE 'location_decoder' needs "
                         "LOCATION_DECODER_LAYERS > 0 and QUERY_DECOUPLING True")
    if not psf.QUERY_DECOUPLING:
        return ThingQuerySelection(matcher)
    filtering = psf.QUERY_FILTER.ENABLED and psf.LOCATION_DECODER_LAYERS > 0
    if not isinstance(psf.QUERY_FILTER.TOP_UP, bool):
        raise ValueError(f"MODEL.PANOPTIC_SEGFORMER.QUERY_FILTER.TOP_UP must be True or False, got "
                         f"{psf.QUERY_FILTER.TOP_UP!r}")
    return ThingQuerySelection(
        matcher, filter_rounds=psf.QUERY_FILTER.NUM_ROUNDS,
        filter_queries=psf.QUERY_FILTER.NUM_QUERIES if filtering else 0,
        test_queries=t.NUM_THING_QUERIES, test_pairs=t.DETECTIONS_PER_IMAGE if pairs else 0,
        filter_top_up=psf.QUERY_FILTER.TOP_UP)


def _check_test_thresholds(t):
    """The TEST.* thresholds of mask-wise merging (Eq. 6) and of the binary masks, checked with the
    post-processors' own validator but named by their config keys."""
    prefix = "MODEL.PANOPTIC_SEGFORMER.TEST."
    for key in ("CONF_THRESHOLD_THING", "CONF_THRESHOLD_STUFF", "KEEP_THRESHOLD_THING", "KEEP_THRESHOLD_STUFF"):
        check_unit_interval(getattr(t, key), prefix + key)
    check_unit_interval(t.MASK_THRESHOLD, prefix + "MASK_THRESHOLD", high_open=True)


def build_postprocessor_from_config(cfg):
    """The TEST.POSTPROCESSOR of the registry; mask-wise merging and its variants take the TEST.* merging
    keys, the other built-ins their own papers' thresholds."""
    t = cfg.MODEL.PANOPTIC_SEGFORMER.TEST
    _check_test_thresholds(t)
    registered = POSTPROCESSOR_REGISTRY.get(t.POSTPROCESSOR) if t.POSTPROCESSOR in POSTPROCESSOR_REGISTRY else None
    merging = isinstance(registered, type) and issubclass(registered, MaskWiseMerging)
    return build_postprocessor(
        t.POSTPROCESSOR,
        **({"alpha": t.ALPHA, "beta": t.BETA, "mask_threshold": t.MASK_THRESHOLD,
            "conf_threshold": (t.CONF_THRESHOLD_THING, t.CONF_THRESHOLD_STUFF),
            "keep_threshold": (t.KEEP_THRESHOLD_THING, t.KEEP_THRESHOLD_STUFF)} if merging else {}))
