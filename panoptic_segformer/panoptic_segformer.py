"""The Detectron2 meta-architecture ``PanopticSegFormer`` (paper Fig. 2).

backbone (C3-C5) -> channel mapper (1x1 conv + GroupNorm to C) + sine positional encoding
-> deformable transformer encoder (Sec. 3.2) -> tokens F
thing queries -> location decoder (Sec. 3.3.2) --+
stuff queries (one per stuff class) -------------+-> mask decoder (Sec. 3.3.3) -> classes + masks per layer
training: matcher + criterion (Sec. 3.4) -> loss dict
inference: post-processor from POSTPROCESSOR_REGISTRY (mask-wise merging, Sec. 3.5, by default)
           -> {"panoptic_seg", "instances", "sem_seg"} at the original image size.

Class ids: the model works with Detectron2's "standard" panoptic contiguous ids (over all categories
of the dataset). ``thing_ids`` / ``stuff_ids`` (from the dataset metadata) give the contiguous id of
each thing-classifier output and of each stuff query.
"""
import bisect
import inspect
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn
from torchvision.ops import box_convert

from .builders import (
    build_channel_mapper,
    build_criterion,
    build_encoder,
    build_location_decoder,
    build_mask_decoder,
    build_postprocessor_from_config,
    build_query_selection,
)
from .data.metadata import panoptic_class_ids
from .modeling.encoder import DeformableTransformerEncoder, PositionEmbeddingSine
from .modeling.location_decoder import LocationDecoder
from .modeling.query_selection import ThingQuerySelection
from .postprocessing import binary_mask_stats, mean_mask_instance_scores
from .utils import ScratchBuffers, masks_to_boxes, upsample_masks_to_image

__all__ = ["PanopticSegFormer", "dataset_class_ids", "padding_mask"]


def dataset_class_ids(dataset_names):
    """(thing_ids, stuff_ids): sorted contiguous ids of thing and stuff classes, read from the
    metadata of `dataset_names` (which must agree; :func:`.data.metadata.panoptic_class_ids`)."""
    result = None
    for name in dataset_names:
        # Standard or Mask2Former metadata: stuff = the categories that are not things.
        ids = panoptic_class_ids(MetadataCatalog.get(name), name)
        if result is not None and ids != result:
            raise ValueError(f"datasets {list(dataset_names)} have different class sets")
        result = ids
    if result is None:
        raise ValueError("no dataset given: set DATASETS.TRAIN or DATASETS.TEST")
    return result


def padding_mask(images: ImageList, device) -> torch.Tensor:
    """(N, H_pad, W_pad) bool, True at the padding of each image of the padded batch ``images``.

    ``images.image_sizes`` holds each image's (h, w): Python ints (copied to ``device`` without blocking, no
    host-device sync), or an (N, 2) int64 tensor (the exported network's ``image_size`` input, so that the
    ONNX graph computes the mask from the runtime sizes, :mod:`panoptic_segformer.deploy`).
    """
    n, _, hp, wp = images.tensor.shape
    sizes = images.image_sizes
    if not isinstance(sizes, torch.Tensor):  # under torch.jit.trace (fvcore's FLOP count) they are 0-dim tensors
        sizes = [[int(h), int(w)] for h, w in sizes]
    sizes = torch.as_tensor(sizes, dtype=torch.long).to(device, non_blocking=True).view(n, 2)
    rows = torch.arange(hp, device=device)[None, :, None] >= sizes[:, 0, None, None]
    cols = torch.arange(wp, device=device)[None, None, :] >= sizes[:, 1, None, None]
    return rows | cols


@META_ARCH_REGISTRY.register()
class PanopticSegFormer(nn.Module):
    """Panoptic SegFormer. Input: Detectron2's list of dicts with "image" (C, H, W) and optionally
    "height"/"width", and in training "instances" (things) and "stuff" (per stuff class) from
    :class:`PanopticSegFormerDatasetMapper`."""

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        in_features: List[str],
        channel_mapper: nn.ModuleList,
        position_encoding: nn.Module,
        encoder: DeformableTransformerEncoder,
        location_decoder: LocationDecoder,
        mask_decoder: nn.Module,
        stuff_query_embed: nn.Embedding,
        query_selection: ThingQuerySelection,
        criterion: nn.Module,
        postprocessor,
        thing_ids: List[int],
        stuff_ids: List[int],
        test_mask_decoder_layers: int,
        mask_threshold: float,
        panoptic_on: bool,
        instance_on: bool,
        semantic_on: bool,
        detections_per_image: int,
        pixel_mean,
        pixel_std,
        size_divisibility: int,
        mask_stride: int = 8,
    ):
        super().__init__()
        self.backbone = backbone
        self.in_features = in_features
        self.channel_mapper = channel_mapper
        self.position_encoding = position_encoding
        self.encoder = encoder
        self.location_decoder = location_decoder
        self.mask_decoder = mask_decoder
        self.stuff_query_embed = stuff_query_embed
        self.query_selection = query_selection
        self.criterion = criterion
        self.postprocessor = postprocessor
        self.thing_ids = list(thing_ids)
        self.stuff_ids = list(stuff_ids)
        self.num_classes = len(self.thing_ids) + len(self.stuff_ids)
        self.query_decoupling = stuff_query_embed is not None
        self.test_mask_decoder_layers = test_mask_decoder_layers
        self.mask_threshold = mask_threshold
        self.panoptic_on = panoptic_on
        self.instance_on = instance_on
        self.semantic_on = semantic_on
        self.detections_per_image = detections_per_image
        self.size_divisibility = size_divisibility
        # Stride of the masks: the first (finest) backbone level of the encoder, 1/8 (Sec. 3.1).
        self.mask_stride = mask_stride
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        # Contiguous id -> classifier index (decoupled: thing FC index / stuff query index).
        self.register_buffer("_thing_ids", torch.tensor(self.thing_ids, dtype=torch.long), False)
        self.register_buffer("_stuff_ids", torch.tensor(self.stuff_ids, dtype=torch.long), False)

    @classmethod
    def from_config(cls, cfg):
        psf, t = cfg.MODEL.PANOPTIC_SEGFORMER, cfg.MODEL.PANOPTIC_SEGFORMER.TEST
        names = cfg.DATASETS.TRAIN or cfg.DATASETS.TEST
        thing_ids, stuff_ids = dataset_class_ids(names)
        if (len(thing_ids), len(stuff_ids)) != (psf.NUM_THING_CLASSES, psf.NUM_STUFF_CLASSES):
            raise ValueError(
                f"MODEL.PANOPTIC_SEGFORMER.NUM_THING_CLASSES/NUM_STUFF_CLASSES = "
                f"{psf.NUM_THING_CLASSES}/{psf.NUM_STUFF_CLASSES}, but dataset {names[0]!r} has "
                f"{len(thing_ids)} thing and {len(stuff_ids)} stuff classes")
        if not 0 <= t.NUM_MASK_DECODER_LAYERS <= psf.MASK_DECODER_LAYERS:
            raise ValueError(f"MODEL.PANOPTIC_SEGFORMER.TEST.NUM_MASK_DECODER_LAYERS must be in "
                             f"[0, {psf.MASK_DECODER_LAYERS}], got {t.NUM_MASK_DECODER_LAYERS}")
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        channel_mapper = build_channel_mapper(cfg, shapes)
        # Query decoupling (Sec. 3.3.1); joint matching (Table 8): one set of N_th + N_st queries
        # classified over all classes by the location and mask decoders.
        decoupled, num_stuff = psf.QUERY_DECOUPLING, len(stuff_ids)
        num_classes = len(thing_ids) if decoupled else len(thing_ids) + num_stuff
        encoder = build_encoder(cfg)
        location_decoder = build_location_decoder(
            cfg, num_classes, psf.NUM_THING_QUERIES if decoupled else psf.NUM_THING_QUERIES + num_stuff)
        # The mask decoder attends to the backbone levels only (extra levels feed the encoder and the
        # location decoder, as in the official code).
        mask_decoder = build_mask_decoder(cfg, num_classes, len(psf.IN_FEATURES))
        criterion = build_criterion(cfg, num_classes, num_stuff if decoupled else 0)
        return {
            "backbone": backbone,
            "in_features": list(psf.IN_FEATURES),
            "channel_mapper": channel_mapper,
            "position_encoding": PositionEmbeddingSine(
                psf.HIDDEN_DIM // 2, normalize=True, offset=psf.POSITION_ENCODING_OFFSET),
            "encoder": encoder,
            "location_decoder": location_decoder,
            "mask_decoder": mask_decoder,
            "criterion": criterion,
            "query_selection": build_query_selection(cfg, criterion.matcher),
            "postprocessor": build_postprocessor_from_config(cfg),
            "stuff_query_embed": nn.Embedding(num_stuff, 2 * psf.HIDDEN_DIM) if decoupled else None,
            "thing_ids": thing_ids,
            "stuff_ids": stuff_ids,
            "test_mask_decoder_layers": t.NUM_MASK_DECODER_LAYERS or mask_decoder.num_layers,
            "mask_threshold": t.MASK_THRESHOLD,
            "panoptic_on": t.PANOPTIC_ON,
            "instance_on": t.INSTANCE_ON,
            "semantic_on": t.SEMANTIC_ON,
            "detections_per_image": t.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
            "mask_stride": shapes[psf.IN_FEATURES[0]].stride,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    # ------------------------------------------------------------------------------------------
    def preprocess_image(self, batched_inputs) -> ImageList:
        """Normalised, padded batch of the inputs' "image" tensors, each checked first by
        :meth:`check_input_image`."""
        images = [(self.check_input_image(x.get("image"), i).to(self.device) - self.pixel_mean)
                  / self.pixel_std for i, x in enumerate(batched_inputs)]
        return ImageList.from_tensors(images, self.size_divisibility)

    def check_input_image(self, image, index: int = 0) -> torch.Tensor:
        """Return input `index`'s "image" after checking it is a (C, H, W) tensor with C = the
        channels of MODEL.PIXEL_MEAN, H, W >= 1 and finite values; ValueError naming the input, its
        shape and the expected layout otherwise (instead of a broadcast error or NaN scores later).
        Integer images cannot hold NaN/inf; float ones are checked on the device they come on (the
        CPU for the dataset mapper and DefaultPredictor)."""
        channels = self.pixel_mean.shape[0]
        expected = (f"expected a (C, H, W) tensor with C = {channels} channels in INPUT.FORMAT order and "
                    "H, W >= 1 (an (H, W, C) array must be transposed to channels-first)")
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"input {index}: 'image' is {type(image).__name__}: {expected}")
        if image.dim() != 3 or image.shape[0] != channels or min(image.shape[1:]) < 1:
            raise ValueError(f"input {index}: 'image' has shape {tuple(image.shape)}: {expected}")
        if image.is_floating_point() and not bool(torch.isfinite(image).all()):
            raise ValueError(f"input {index}: 'image' of shape {tuple(image.shape)} has non-finite values "
                             "(NaN or inf): inputs must be finite pixel values")
        return image

    def _multi_scale_inputs(self, images: ImageList):
        """Backbone + channel mapper + padding masks + positional encodings for each level."""
        features = self.backbone(images.tensor)
        pad = padding_mask(images, self.device)
        srcs, masks, pos = [], [], []
        num_backbone = len(self.in_features)
        for i, proj in enumerate(self.channel_mapper):
            if i < num_backbone:
                src = proj(features[self.in_features[i]])
            else:  # extra level: stride-2 conv on the last backbone feature, then on the previous level
                src = proj(features[self.in_features[-1]] if i == num_backbone else srcs[-1])
            mask = F.interpolate(pad[None].float(), size=src.shape[-2:])[0].bool()
            srcs.append(src)
            masks.append(mask)
            pos.append(self.position_encoding(mask).to(src.dtype))
        return srcs, masks, pos

    def forward_outputs(self, images: ImageList, targets=None, num_mask_layers=None,
                        return_attention=False) -> Dict:
        """Run the network. Returns a dict with "location" (pred_logits / pred_boxes per location
        layer), "thing_query_index" (N, Q_th), "mask" (per mask-decoder layer: thing_logits,
        stuff_logits, pred_masks[, attention]) -- the inputs of the criterion -- and "levels", the
        LevelLayout of the tokens the mask decoder attended to (to split attention maps, Eq. 1). When thing
        classes come from the location decoder (TEST.THING_CLASS_SOURCE), also "thing_boxes"
        (N, Q_th, 4): the boxes of those (query, class) pairs, normalized (cx, cy, w, h)."""
        srcs, masks, pos = self._multi_scale_inputs(images)
        enc = self.encoder(srcs, masks, pos)
        loc = self.location_decoder(enc.memory, enc.levels)
        things = self.query_selection(loc, self.training, targets)
        queries, query_pos = self.with_stuff_queries(things.queries, things.query_pos)
        levels = enc.levels.first(len(self.in_features))
        s = levels.num_tokens
        layers = self.mask_decoder(queries, query_pos, things.queries.shape[1], enc.memory[:, :s], enc.pos[:, :s],
                                   levels, num_layers=num_mask_layers, return_attention=return_attention,
                                   masks_of="all" if self.training else "last")
        self.query_selection.use_pair_classes(layers, things)
        outputs = {"location": {"pred_logits": loc["pred_logits"], "pred_boxes": loc["pred_boxes"]},
                   "thing_query_index": things.index, "mask": layers, "levels": levels}
        if things.valid is not None:  # query filtering without top-up: padded per batch
            outputs["thing_query_valid"] = things.valid
        if things.pair_classes is not None and loc["pred_boxes"][-1].shape[-1] == 4:
            outputs["thing_boxes"] = loc["pred_boxes"][-1].gather(1, things.index[..., None].expand(-1, -1, 4))
        return outputs

    def with_stuff_queries(self, queries, query_pos):
        """Append the class-fixed stuff queries (one per stuff class, Sec. 3.3.1) to the thing queries
        (N, Q_th, C); their embedding holds (query_pos, query) halves."""
        if self.stuff_query_embed is None:
            return queries, query_pos
        n = queries.shape[0]
        stuff_pos, stuff_tgt = self.stuff_query_embed.weight.split(queries.shape[-1], dim=1)
        return (torch.cat([queries, stuff_tgt[None].expand(n, -1, -1)], dim=1),
                torch.cat([query_pos, stuff_pos[None].expand(n, -1, -1)], dim=1))

    def prepare_targets(self, batched_inputs, images: ImageList):
        """Criterion targets from the mapper's "instances" (things) and "stuff" (per class)."""
        hp, wp = images.tensor.shape[-2:]
        thing_index = {c: i for i, c in enumerate(self.thing_ids)}
        stuff_index = {c: i for i, c in enumerate(self.stuff_ids)}
        targets = []
        for x, (h, w) in zip(batched_inputs, images.image_sizes):
            thing_classes = x["instances"].gt_classes.tolist()  # mapper output, still on the host
            stuff_classes = x["stuff"].gt_classes.tolist()
            things = x["instances"].to(self.device)
            stuff = x["stuff"].to(self.device)

            def padded(bitmasks):
                m = bitmasks.tensor
                out = torch.zeros((m.shape[0], hp, wp), dtype=torch.bool, device=self.device)
                out[:, : m.shape[1], : m.shape[2]] = m
                return out

            scale = torch.tensor([w, h, w, h], dtype=torch.float32).to(self.device, non_blocking=True)
            thing_boxes = box_convert(things.gt_boxes.tensor, "xyxy", "cxcywh") / scale
            thing_masks = padded(things.gt_masks)
            stuff_masks = padded(stuff.gt_masks)
            if self.query_decoupling:
                labels = torch.tensor([thing_index[c] for c in thing_classes],
                                      dtype=torch.long).to(self.device, non_blocking=True)
                stuff_labels = torch.tensor([stuff_index[c] for c in stuff_classes],
                                            dtype=torch.long).to(self.device, non_blocking=True)
                targets.append({"labels": labels, "boxes": thing_boxes, "masks": thing_masks,
                                "stuff_labels": stuff_labels, "stuff_masks": stuff_masks,
                                "image_size": (h, w)})
            else:  # joint matching: stuff segments are matched like things, over all classes
                stuff_boxes = box_convert(masks_to_boxes(stuff.gt_masks.tensor),
                                          "xyxy", "cxcywh") / scale
                targets.append({
                    "labels": torch.cat([things.gt_classes, stuff.gt_classes]).long(),
                    "boxes": torch.cat([thing_boxes, stuff_boxes]),
                    "masks": torch.cat([thing_masks, stuff_masks]),
                    "stuff_labels": torch.zeros(0, dtype=torch.long, device=self.device),
                    "stuff_masks": stuff_masks[:0],
                    "image_size": (h, w),
                })
        return targets

    def forward(self, batched_inputs):
        images = self.preprocess_image(batched_inputs)
        if self.training:
            if not getattr(self.criterion, "official", False):  # the official criterion trains the official decoder
                self.mask_decoder.check_trainable()
            for x in batched_inputs:
                if "instances" not in x or "stuff" not in x:
                    raise ValueError("training inputs need 'instances' and 'stuff' "
                                     "(use PanopticSegFormerDatasetMapper)")
            targets = self.prepare_targets(batched_inputs, images)
            outputs = self.forward_outputs(images, targets)
            return self.criterion(outputs, targets)
        outputs = self.forward_outputs(images, num_mask_layers=self.test_mask_decoder_layers)
        return self.inference(outputs, batched_inputs, images)

    # ------------------------------------------------------------------------------------------
    def per_query_predictions(self, layer: Dict, i: int):
        """Unified per-query predictions of image i (things and stuff in one format, Sec. 3.3.1):
        class_distribution (Q, K_all) over contiguous ids, class_probs (Q,), labels (Q,) contiguous,
        is_thing (Q,) bool, mask_logits (Q, h, w) at 1/8 of the padded input."""
        thing_probs = layer["thing_logits"][i].sigmoid()
        q_th = thing_probs.shape[0]
        dist = thing_probs.new_zeros((q_th, self.num_classes))
        if self.query_decoupling:
            dist[:, self._thing_ids] = thing_probs
            stuff_probs = layer["stuff_logits"][i].sigmoid()
            stuff_dist = stuff_probs.new_zeros((stuff_probs.shape[0], self.num_classes))
            stuff_dist[torch.arange(stuff_probs.shape[0], device=self.device), self._stuff_ids] = stuff_probs
            dist = torch.cat([dist, stuff_dist])
        else:
            dist = thing_probs
        class_probs, labels = dist.max(-1)
        is_thing = torch.zeros(self.num_classes, dtype=torch.bool, device=self.device)
        is_thing[self._thing_ids] = True
        return dist, class_probs, labels, is_thing[labels], layer["pred_masks"][i]

    def inference(self, outputs, batched_inputs, images: ImageList, postprocessor=None):
        """Detectron2 outputs from `forward_outputs`' last mask-decoder layer. `postprocessor`
        (common signature of :mod:`panoptic_segformer.postprocessing`) replaces the configured one,
        e.g. to compare post-processors on one forward pass (Table 7).

        The post-processor's optional members (:mod:`panoptic_segformer.postprocessing.common`) say how
        the 1/8 masks reach the output size (``masks_to_image``), whether they are clamped to [0, 1]
        (``max_mask_value``), which queries it reads (``read_queries``), whether it reads the mask
        logits (``reads_mask_logits``) and how the thing results of "instances" are scored
        (``instance_scores``). Only the masks an output needs are brought to full resolution, in one
        pass over query chunks shared by the three outputs (:meth:`full_resolution_outputs`).
        """
        last = outputs["mask"][-1]
        results = []
        for i, (x, image_size) in enumerate(zip(batched_inputs, images.image_sizes)):
            thing_boxes = outputs["thing_boxes"][i] if "thing_boxes" in outputs else None
            results.append(self.image_outputs(self.per_query_predictions(last, i), thing_boxes, x, image_size,
                                              postprocessor))
        return results

    def image_outputs(self, per_query, thing_boxes, x: Dict, image_size, postprocessor=None) -> Dict:
        """One image's Detectron2 outputs from its per-query predictions: the post-processing shared by
        :meth:`inference` and the ONNX runtime's outputs (:class:`panoptic_segformer.deploy.OnnxPredictor`).

        Args:
            per_query: :meth:`per_query_predictions`' (class_distribution, class_probs, labels, is_thing,
                mask_logits) of the image.
            thing_boxes: (Q_th, 4) the image's "thing_boxes" of :meth:`forward_outputs`, or None.
            x: the image's input dict ("height" / "width", when given, are the output size).
            image_size: (h, w) of the image inside the padded batch.
        """
        postprocessor = postprocessor or self.postprocessor
        output_size = (x.get("height", image_size[0]), x.get("width", image_size[1]))
        dist, class_probs, labels, is_thing, maps = per_query
        boxes = None
        if self.instance_on and thing_boxes is not None:
            boxes = self.thing_boxes_to_image(thing_boxes, image_size, output_size)
        return self.full_resolution_outputs(postprocessor, maps, dist, class_probs, labels, is_thing, image_size,
                                            output_size, boxes)

    def full_resolution_outputs(self, postprocessor, maps, dist, class_probs, labels, is_thing, image_size,
                                output_size, thing_boxes=None, chunk_elements: int = 1 << 26) -> Dict:
        """One image's "panoptic_seg", "instances" and "sem_seg" (as enabled) from its per-query
        predictions: class distribution (Q, K), class_probs / labels / is_thing (Q,), maps (Q, h, w) at 1/8.

        Queries are brought to ``output_size`` in chunks of about ``chunk_elements`` values, and only the
        ones some output reads: the post-processor's ``read_queries`` (panoptic), the thing queries
        (instances: a running top-``detections_per_image``), every query (sem_seg, accumulated). Memory
        is the outputs plus the masks the post-processor reads plus one chunk. The default chunk (2^26
        values, 62 queries at 800x1333) gives sem_seg's thing-plane product an inner dimension large enough
        to be efficient: against 2^25, post-processing took 4.2 instead of 4.9 s for 70 MB more peak memory
        (measured on a 2-core CPU; docs/BENCHMARKS.md, "CPU speed", has the current stage times).
        """
        to_image = getattr(postprocessor, "masks_to_image", upsample_masks_to_image)
        # Each chunk's full-resolution temporaries go into buffers reused across chunks (ScratchBuffers:
        # on the CPU a fresh one page-faults), when the post-processor's masks_to_image takes them.
        buffers = ScratchBuffers()
        to_image_kwargs = {"buffers": buffers} if "buffers" in inspect.signature(to_image).parameters else {}
        max_mask_value = getattr(postprocessor, "max_mask_value", 1.0)
        read = torch.zeros_like(is_thing)
        if self.panoptic_on:
            read_queries = getattr(postprocessor, "read_queries", None)
            read = read_queries(class_probs, labels, is_thing) if read_queries else torch.ones_like(is_thing)
        needed = read | is_thing if self.instance_on else read.clone()
        if self.semantic_on:
            needed[:] = True
        index = needed.nonzero().squeeze(1)
        height, width = output_size
        chunk = max(1, chunk_elements // max(1, height * width))
        keep_logits = getattr(postprocessor, "reads_mask_logits", True)
        # The masks the post-processor reads, written once each into their final place.
        read_index = read.nonzero().squeeze(1)
        read_maps = maps.new_empty((len(read_index), height, width))
        read_logits = maps.new_empty((len(read_index), height, width)) if keep_logits else None
        filled = 0
        sem = _SemanticMap(dist, height, width, *self._semantic_blocks(dist)) if self.semantic_on else None
        top = _RunningTopK(self.detections_per_image, getattr(postprocessor, "instance_scores",
                                                                 mean_mask_instance_scores), self.mask_threshold)
        for rows in index.split(chunk) if index.numel() else ():
            up = to_image(maps[rows], image_size, self.mask_stride, output_size, **to_image_kwargs)
            probs = self.mask_decoder.mask_probabilities(up, max_value=max_mask_value, buffers=buffers)
            r = read[rows].nonzero().squeeze(1)
            if len(r):
                torch.index_select(probs, 0, r, out=read_maps[filled:filled + len(r)])
                if keep_logits:
                    torch.index_select(up, 0, r, out=read_logits[filled:filled + len(r)])
                filled += len(r)
            if sem is not None:
                sem.add(rows, probs)
            if self.instance_on:
                t = is_thing[rows].nonzero().squeeze(1)
                top.update(rows[t], probs, t.tolist(), class_probs[rows[t]])
        up = probs = buffers = to_image_kwargs = None  # the chunk buffers are freed before the merge runs
        result = {}
        if self.panoptic_on:
            r = read_index
            logits = self.mask_decoder.mask_logits(read_logits) if keep_logits and index.numel() else None
            result["panoptic_seg"] = postprocessor(read_maps, class_probs[r], labels[r], is_thing[r],
                                                   mask_logits=logits, class_distribution=dist[r])
        if self.instance_on:
            result["instances"] = top.instances(output_size, class_probs, labels, thing_boxes)
        if sem is not None:
            result["sem_seg"] = sem.sem
        return result

    def _semantic_blocks(self, dist):
        """(num_thing_queries, thing_classes, stuff_classes) of :class:`_SemanticMap`'s block-sparse
        accumulation when ``dist`` (Q, K) has query decoupling's structure (Sec. 3.3: thing queries
        first, zero outside the thing classes; then one stuff query per stuff class, zero elsewhere);
        ``()`` (the dense product) otherwise. Checked on the values (one host read per image)."""
        num_stuff = len(self.stuff_ids)
        if not self.query_decoupling or dist.shape[0] < num_stuff or dist.shape[1] != self.num_classes:
            return ()
        q_th = dist.shape[0] - num_stuff
        first, last = min(self.thing_ids, default=0), max(self.thing_ids, default=-1)
        contiguous = sorted(self.thing_ids) == list(range(first, last + 1))
        thing_classes = slice(first, last + 1) if contiguous else slice(0, self.num_classes)
        outside = torch.ones(self.num_classes, dtype=torch.bool, device=dist.device)
        outside[thing_classes] = False
        stuff_rows = dist[q_th:].clone()
        stuff_rows[torch.arange(num_stuff, device=dist.device), self._stuff_ids] = 0
        if bool(dist[:q_th, outside].any() | stuff_rows.any()):
            return ()
        return q_th, thing_classes, self.stuff_ids

    @staticmethod
    def thing_boxes_to_image(boxes, image_size, output_size) -> Boxes:
        """Normalized (cx, cy, w, h) boxes (Q_th, 4) of the location decoder, relative to the
        unpadded image of `image_size`, -> XYXY boxes in `output_size` pixels, clipped (the official
        ``_get_bboxes_single``: scale to the input image, clamp, rescale to the original size)."""
        h, w = image_size
        boxes = Boxes(box_convert(boxes, "cxcywh", "xyxy") * boxes.new_tensor([w, h, w, h]))
        boxes.clip((h, w))
        boxes.scale(output_size[1] / w, output_size[0] / h)
        return boxes


class _SemanticMap:
    """Detectron2's (and Mask2Former's) ``sem_seg`` (K, H, W) = sum over queries q of ``dist[q, k] *
    mask_probs[q]``, accumulated in place over chunks of queries (no (K, H, W) temporary per chunk).

    Dense by default: one ``addmm_`` of all K planes per chunk. With query decoupling's block structure
    (``num_thing_queries`` given, see ``PanopticSegFormer._semantic_blocks``) the thing queries update
    only the ``thing_classes`` planes (one ``addmm_`` on that slice per chunk) and each stuff query
    writes its own plane once (``stuff_classes[j]`` of stuff query ``j``), where the dense product read
    and wrote all K planes per chunk. The products skipped are exact zeros, so the values are the same
    (tests/test_model.py); on COCO (80 thing, 53 stuff classes, 353 queries at 800x1333) the dense
    product moved about 12 GB through memory per image.
    """

    def __init__(self, dist, height: int, width: int, num_thing_queries: Optional[int] = None,
                 thing_classes: Optional[slice] = None, stuff_classes: Optional[List[int]] = None):
        self.dist = dist
        self.sem = dist.new_zeros((dist.shape[1], height, width))
        self.num_thing_queries, self.thing_classes, self.stuff_classes = num_thing_queries, thing_classes, stuff_classes

    def add(self, rows, probs) -> None:
        """rows (n,) increasing query indices; probs (n, H, W) their mask probabilities."""
        probs = probs.to(self.sem.dtype).reshape(len(rows), -1)
        if self.num_thing_queries is None:
            self.sem.view(self.sem.shape[0], -1).addmm_(self.dist[rows].to(self.sem.dtype).t(), probs)
            return
        rows = rows.tolist()
        n_th = bisect.bisect_left(rows, self.num_thing_queries)
        if n_th:
            planes = self.sem[self.thing_classes]
            planes.view(planes.shape[0], -1).addmm_(
                self.dist[rows[:n_th], self.thing_classes].to(self.sem.dtype).t(), probs[:n_th])
        for j, q in enumerate(rows[n_th:], n_th):  # one stuff query per stuff class: its plane, once
            c = self.stuff_classes[q - self.num_thing_queries]
            self.sem[c].view(-1).addcmul_(probs[j], self.dist[q, c].to(self.sem.dtype))


class _RunningTopK:
    """The top-``k`` thing results of one image over chunks of thing queries (Table 4: stuff dropped).

    Each result is a binary mask ``mask_probs > mask_threshold`` scored by ``instance_scores(class_probs,
    areas, prob_sums)`` of the binary masks (:func:`~.postprocessing.binary_mask_stats`; default: class
    probability x mean mask probability inside the binary mask);
    results are ranked by descending score, ties by query index. Only the current top-``k`` binary masks
    are kept between chunks (chunks must come in increasing query order), each in its own tensor: a mask
    is copied once when it enters the top-``k`` and freed when it leaves, so memory is ``k`` masks plus
    one chunk and time is linear in the thing queries (re-gathering all ``k`` masks per chunk was
    quadratic: with one query per chunk at 4000x6000, 300 copies of 2.4 GB).
    """

    def __init__(self, k: int, instance_scores, mask_threshold: float):
        self.k, self.instance_scores, self.mask_threshold = k, instance_scores, mask_threshold
        self.index = self.scores = None
        self.masks: List[torch.Tensor] = []  # binary (H, W) mask of each current top result, in rank order

    def update(self, index, mask_probs, rows: List[int], class_probs):
        """index (M,) query indices (increasing) whose mask probabilities are ``mask_probs[rows]``
        (mask_probs (N, H, W), rows M indices into it, read in place), class_probs (M,)."""
        areas, prob_sums, _, _ = binary_mask_stats(mask_probs, self.mask_threshold, rows)
        scores = self.instance_scores(class_probs, areas, prob_sums)
        kept = len(self.masks)
        if self.index is not None:  # the kept ones first: equal scores keep the lower query index first
            index, scores = torch.cat([self.index, index]), torch.cat([self.scores, scores.to(self.scores.dtype)])
        order = torch.sort(scores, descending=True, stable=True).indices[: self.k]
        self.index, self.scores = index[order], scores[order]
        self.masks = [self.masks[j] if j < kept else mask_probs[rows[j - kept]] > self.mask_threshold
                      for j in order.tolist()]

    def instances(self, image_size, class_probs, labels, thing_boxes=None) -> Instances:
        """Detectron2 Instances; boxes from ``thing_boxes`` (Boxes of the Q_th thing queries, which come
        first) when given, else the binary masks' tight boxes."""
        instances = Instances(image_size)
        if self.index is None:
            self.index = labels.new_zeros((0,))
            self.scores = class_probs.new_zeros((0,))
        masks = torch.empty((len(self.masks),) + tuple(image_size), dtype=torch.bool, device=labels.device)
        for i in range(len(self.masks)):  # each kept mask is freed once copied: peak k masks + one
            masks[i] = self.masks[i]
            self.masks[i] = None
        self.masks = masks
        instances.pred_masks = self.masks
        if thing_boxes is not None:
            instances.pred_boxes = Boxes(thing_boxes.tensor[self.index])
        else:
            instances.pred_boxes = Boxes(masks_to_boxes(self.masks))
        instances.scores = self.scores.to(class_probs.dtype)
        instances.pred_classes = labels[self.index]
        return instances
