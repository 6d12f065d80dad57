"""All activation summaries of one analysis, folded batch by batch and mergeable across shards.

Writer and reader: :mod:`atlas.analyze` (``update`` per batch, ``state_dict`` for resume files,
``finalize`` for the cache). ``merge(a, b)`` combines two shards of the same corpus analysed
separately (sequence indices must be global, i.e. each shard passes its own ``seq_offset``).
"""

from __future__ import annotations

import torch

from .intervals import IntervalSamples
from .scalars import ScalarStats
from .top import TopExamples


class FeatureSummaries:
    """Scalars and histograms, top examples, and interval samples of ``n_features`` features.

    ``feature_offset`` is the id of the first of them in the whole dictionary (a feature slice)."""

    def __init__(self, n_features: int, settings, seed: int, device=None, feature_offset: int = 0):
        self.settings = settings
        self.seed = seed
        before, after = settings.window_before, settings.window_after
        self.scalars = ScalarStats(n_features, settings.hist_edges(), device=device)
        self.top = TopExamples(n_features, settings.top_k, before, after, device=device)
        self.intervals = IntervalSamples(n_features, settings.n_intervals, settings.interval_k, before, after,
                                         seed, device=device, feature_offset=feature_offset)

    def update(self, acts: torch.Tensor, counted: torch.Tensor, seq_offset: int) -> None:
        """Fold a batch: ``acts[B, T, F]`` (float32) of sequences ``seq_offset + b`` and ``counted[B, T]``
        (the tokens that enter the statistics). ``acts`` is zeroed in place where not counted."""
        acts.mul_(counted[:, :, None].to(acts.dtype))
        B, T, F = acts.shape
        nz_b, nz_pos, nz_f = (acts > 0).nonzero(as_tuple=True)
        nz_vals = acts[nz_b, nz_pos, nz_f]
        self.scalars.update(acts.view(B * T, F), int(counted.sum()), nz_f, nz_vals)
        self.top.update(acts, seq_offset)
        self.intervals.update(acts, seq_offset, nz_b, nz_pos, nz_f, nz_vals)

    def merge(self, other: "FeatureSummaries") -> "FeatureSummaries":
        """``self`` ⊕ ``other`` in place; returns self."""
        self.scalars.merge(other.scalars)
        self.top.merge(other.top)
        self.intervals.merge(other.intervals)
        return self

    def state_dict(self) -> dict:
        return {"scalars": self.scalars.state_dict(), "top": self.top.state_dict(),
                "intervals": self.intervals.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scalars.load_state_dict(state["scalars"])
        self.top.load_state_dict(state["top"])
        self.intervals.load_state_dict(state["intervals"])

    def finalize(self) -> dict:
        """numpy arrays: the activation fields of ``FeatureStats`` and all fields of ``Examples``."""
        return self.scalars.finalize() | self.top.finalize() | self.intervals.finalize()


def merge(a: FeatureSummaries, b: FeatureSummaries) -> FeatureSummaries:
    """``a`` ⊕ ``b`` (modifies and returns ``a``)."""
    return a.merge(b)
