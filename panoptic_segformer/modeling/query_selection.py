"""Which location-aware thing queries reach the mask decoder (Sec. 3.3.2, Appendix B.2).

The location decoder turns N_th thing queries into location-aware ones; the mask decoder then refines
a subset of them. One small module decides which, in three regimes:

* **training, query filtering** (App. B.2): multi-round Hungarian matching on the last location-decoder
  layer keeps the queries matched to ground truth (round 1 first), topped up by score, so the mask
  decoder sees fewer than 100 queries per image (:func:`~.matcher.select_thing_queries`);
* **inference, top-N** (``TEST.NUM_THING_QUERIES``): the N queries with the highest location-decoder
  class score, in query order;
* **inference, (query, class) pairs** (``TEST.THING_CLASS_SOURCE: "location_decoder"``, the official
  code): the top-k (query, class) pairs of the last location-decoder layer, a query once per class; their
  classes and scores then replace the mask decoder's thing classification (:meth:`use_pair_classes`).

Otherwise every thing query is kept. Shapes: ``N`` batch, ``Q`` location-decoder queries, ``K`` thing
classes, ``C`` channels.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional

import torch
from torch import Tensor

from .matcher import HungarianMatcher, select_thing_queries

__all__ = ["SelectedThingQueries", "ThingQuerySelection"]


class SelectedThingQueries(NamedTuple):
    """queries / query_pos: (N, Q', C) the selected queries; index: (N, Q') their indices in the Q
    location-decoder queries; pair_classes / pair_scores: (N, Q') class and logit of each (query, class)
    pair in the pairs regime, else None."""

    queries: Tensor
    query_pos: Tensor
    index: Tensor
    pair_classes: Optional[Tensor] = None
    pair_scores: Optional[Tensor] = None
    valid: Optional[Tensor] = None  # (N, Q') bool, False at padding (query filtering without top-up)


class ThingQuerySelection:
    """Selects the thing queries fed to the mask decoder (module docstring). Holds no parameters.

    Args:
        matcher: the cost of query filtering's matching (the criterion's matcher).
        filter_rounds / filter_queries: query filtering in training (App. B.2); ``filter_queries`` 0 = off.
        filter_top_up: fill up to ``filter_queries`` by score (this project); False: only the matched queries,
            padded per batch (the official code, :func:`~.matcher.select_thing_queries`).
        test_queries: top-N selection at inference; 0 = off.
        test_pairs: number of (query, class) pairs at inference (official code: 100); 0 = off.
    """

    def __init__(self, matcher: Optional[HungarianMatcher] = None, filter_rounds: int = 3,
                 filter_queries: int = 0, test_queries: int = 0, test_pairs: int = 0, filter_top_up: bool = True):
        for name, value in (("filter_rounds", filter_rounds), ("filter_queries", filter_queries),
                            ("test_queries", test_queries), ("test_pairs", test_pairs)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.matcher = matcher
        self.filter_rounds = filter_rounds
        self.filter_queries = filter_queries
        self.filter_top_up = bool(filter_top_up)
        self.test_queries = test_queries
        self.test_pairs = test_pairs

    def __call__(self, location: Dict[str, object], training: bool,
                 targets: Optional[List[Dict[str, Tensor]]] = None) -> SelectedThingQueries:
        """
        Args:
            location: the location decoder's output ("queries", "query_pos" (N, Q, C), "pred_logits" and
                "pred_boxes", lists over its layers; empty lists with 0 layers).
            training: which regime applies; targets: the criterion's targets (query filtering).
        """
        queries, query_pos = location["queries"], location["query_pos"]
        n, q_all = queries.shape[:2]
        logits = location["pred_logits"][-1] if location["pred_logits"] else None
        pair_classes = pair_scores = index = None
        if logits is None:
            pass  # no location-decoder layer: no scores to select by
        elif training and self.filter_queries and targets is not None:
            index = select_thing_queries(logits, location["pred_boxes"][-1], targets, self.filter_rounds,
                                         min(self.filter_queries, q_all), matcher=self.matcher,
                                         top_up=self.filter_top_up)
            if not self.filter_top_up:
                valid = index >= 0
                gather = index.clamp(min=0)[..., None].expand(-1, -1, queries.shape[-1])
                keep = valid[..., None].to(queries.dtype)
                return SelectedThingQueries(queries.gather(1, gather) * keep, query_pos.gather(1, gather) * keep,
                                            index, valid=valid)
        elif not training and self.test_pairs:
            k = min(self.test_pairs, q_all * logits.shape[2])
            top = logits.flatten(1).topk(k, dim=1)
            index = torch.div(top.indices, logits.shape[2], rounding_mode="floor")
            pair_classes, pair_scores = top.indices % logits.shape[2], top.values
        elif not training and 0 < self.test_queries < q_all:
            scores = logits.sigmoid().amax(-1)
            index = scores.topk(self.test_queries, dim=1).indices.sort(dim=1).values
        if index is None:
            return SelectedThingQueries(queries, query_pos, torch.arange(q_all, device=queries.device).expand(n, q_all))
        gather = index[..., None].expand(-1, -1, queries.shape[-1])
        return SelectedThingQueries(queries.gather(1, gather), query_pos.gather(1, gather), index,
                                    pair_classes, pair_scores)

    @staticmethod
    def use_pair_classes(layers: List[Dict[str, Tensor]], selected: SelectedThingQueries) -> None:
        """In the pairs regime, replace each layer's "thing_logits" (N, Q', K) by the pairs': the pair's
        logit for its class, -inf for every other class (in place; no-op in the other regimes)."""
        if selected.pair_classes is None:
            return
        for layer in layers:
            logits = torch.full_like(layer["thing_logits"], float("-inf"))
            layer["thing_logits"] = logits.scatter(2, selected.pair_classes[..., None],
                                                   selected.pair_scores[..., None].to(logits.dtype))
