"""Per-corpus counts and maxima, and activations at special tokens (a mergeable summary).

Writer: :mod:`atlas.analyze` through :class:`atlas.stats.FeatureSummaries` (``update`` per batch,
``finalize`` into the ``FeatureStats`` fields ``corpus_n_active``, ``corpus_max_act`` and
``special_n_active``, and the counted tokens of each corpus into ``Manifest.corpora``).
"""

from __future__ import annotations

import torch


class CorpusStats:
    """Per corpus c (of C): counted tokens ``n_tokens[C]``, ``n_active[F, C]`` (tokens of corpus c where
    the feature is > 0) and ``max_act[F, C]``; and ``special_n_active[F]``, the tokens where the feature
    is > 0 among the special tokens given to :meth:`update` (counted even when they are left out of
    every other statistic).
    """

    FIELDS = ("n_tokens", "n_active", "max_act", "special_n_active")

    def __init__(self, n_features: int, n_corpora: int = 1, device=None):
        self.n_tokens = torch.zeros(n_corpora, dtype=torch.int64, device=device)
        self.n_active = torch.zeros(n_features, n_corpora, dtype=torch.int64, device=device)
        self.max_act = torch.zeros(n_features, n_corpora, dtype=torch.float32, device=device)
        self.special_n_active = torch.zeros(n_features, dtype=torch.int64, device=device)

    @property
    def n_corpora(self) -> int:
        return self.n_tokens.shape[0]

    def update(self, corpus: torch.Tensor, counted: torch.Tensor, nz_b: torch.Tensor, nz_f: torch.Tensor,
               nz_vals: torch.Tensor) -> None:
        """Fold a batch: ``corpus[B]`` (int64, each sequence's corpus), ``counted[B, T]`` and the nonzero
        entries at counted tokens (sequence in the batch, feature, value)."""
        F, C = self.n_active.shape
        corpus = corpus.to(self.n_tokens.device)
        self.n_tokens.index_add_(0, corpus, counted.sum(1).to(torch.int64))
        cell = nz_f * C + corpus.index_select(0, nz_b)
        self.n_active += torch.bincount(cell, minlength=F * C).view(F, C)
        self.max_act.view(-1).scatter_reduce_(0, cell, nz_vals.float(), reduce="amax")

    def update_special(self, special_rows: torch.Tensor) -> None:
        """Fold the feature activations ``[n, F]`` at a batch's special tokens."""
        self.special_n_active += (special_rows > 0).sum(0)

    def merge(self, other: "CorpusStats") -> "CorpusStats":
        """``self`` ⊕ ``other`` (in place; returns self)."""
        self.n_tokens += other.n_tokens.to(self.n_tokens.device)
        self.n_active += other.n_active.to(self.n_active.device)
        self.max_act = torch.maximum(self.max_act, other.max_act.to(self.max_act.device))
        self.special_n_active += other.special_n_active.to(self.special_n_active.device)
        return self

    def finalize(self) -> dict:
        """numpy arrays: ``corpus_n_tokens[C]`` (for the manifest), ``corpus_n_active[F, C]``,
        ``corpus_max_act[F, C]``, ``special_n_active[F]``."""
        return {
            "corpus_n_tokens": self.n_tokens.cpu().numpy(),
            "corpus_n_active": self.n_active.cpu().numpy(),
            "corpus_max_act": self.max_act.cpu().numpy(),
            "special_n_active": self.special_n_active.cpu().numpy(),
        }

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}

    def load_state_dict(self, state: dict) -> None:
        device = self.n_tokens.device
        for name in self.FIELDS:  # the shapes follow the state (a merge tool need not know C)
            setattr(self, name, state[name].to(device))
