"""Per-feature counts, sums, maxima and log-spaced histograms (a mergeable summary).

Writer: :mod:`atlas.analyze` (``update`` per batch, ``finalize`` into ``FeatureStats`` fields).
"""

from __future__ import annotations

import torch


class ScalarStats:
    """Counted tokens, ``n_active[F]``, ``act_sum[F]`` (float64), ``max_act[F]``, ``hist[F, B]``.

    ``edges`` are the histogram's ``B + 1`` edges; a value in ``[edges[i], edges[i+1])`` counts in bin
    i, values below ``edges[1]`` in bin 0 and values at or above ``edges[B-1]`` in bin B-1.
    """

    FIELDS = ("n_tokens", "n_active", "act_sum", "max_act", "hist")

    def __init__(self, n_features: int, edges, device=None):
        self.edges = torch.as_tensor(edges, dtype=torch.float32, device=device)
        n_bins = self.edges.numel() - 1
        self.n_tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.n_active = torch.zeros(n_features, dtype=torch.int64, device=device)
        self.act_sum = torch.zeros(n_features, dtype=torch.float64, device=device)
        self.max_act = torch.zeros(n_features, dtype=torch.float32, device=device)
        self.hist = torch.zeros(n_features, n_bins, dtype=torch.int64, device=device)

    @property
    def n_bins(self) -> int:
        return self.hist.shape[1]

    def update(self, n_counted, nz_f: torch.Tensor, nz_vals: torch.Tensor) -> None:
        """Fold a batch: its number of counted tokens (int or 0-d tensor) and its nonzero entries at
        counted tokens (feature index, value)."""
        F = self.n_active.shape[0]
        self.n_tokens += n_counted
        self.n_active += torch.bincount(nz_f, minlength=F)
        self.act_sum.index_add_(0, nz_f, nz_vals.to(torch.float64))
        self.max_act.scatter_reduce_(0, nz_f, nz_vals.float(), reduce="amax")
        bins = torch.bucketize(nz_vals, self.edges[1:-1], right=True)
        self.hist += torch.bincount(nz_f * self.n_bins + bins, minlength=F * self.n_bins).view(F, self.n_bins)

    def merge(self, other: "ScalarStats") -> "ScalarStats":
        """``self`` ⊕ ``other`` (in place; returns self)."""
        self.n_tokens += other.n_tokens.to(self.n_tokens.device)
        self.n_active += other.n_active.to(self.n_active.device)
        self.act_sum += other.act_sum.to(self.act_sum.device)
        self.max_act = torch.maximum(self.max_act, other.max_act.to(self.max_act.device))
        self.hist += other.hist.to(self.hist.device)
        return self

    def finalize(self) -> dict:
        """numpy arrays for ``FeatureStats``: density, max_act, mean_act, n_active, hist_counts."""
        n = max(int(self.n_tokens), 1)
        mean = torch.where(self.n_active > 0, self.act_sum / self.n_active.clamp_min(1), 0.0)
        return {
            "density": (self.n_active.double() / n).float().cpu().numpy(),
            "max_act": self.max_act.cpu().numpy(),
            "mean_act": mean.float().cpu().numpy(),
            "n_active": self.n_active.cpu().numpy(),
            "hist_counts": self.hist.cpu().numpy(),
        }

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS} | {"edges": self.edges}

    def load_state_dict(self, state: dict) -> None:
        for name in self.FIELDS + ("edges",):
            setattr(self, name, state[name].to(self.n_active.device))
