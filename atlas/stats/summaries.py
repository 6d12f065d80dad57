"""All activation summaries of one analysis, folded batch by batch and mergeable across shards.

Writer and reader: :mod:`atlas.analyze` (``update`` per batch, ``state_dict`` for resume files,
``finalize`` for the cache). ``merge(a, b)`` combines two shards of the same corpus analysed
separately (sequence indices must be global, i.e. each shard passes its own ``seq_offset``).

A batch is reduced once to its nonzero entries at counted tokens (token, feature, value); every
summary folds those (the cost grows with the active pairs, not with ``tokens × F``), and reads the
dense activations only at the few positions it needs (example windows, candidate features).
"""

from __future__ import annotations

import torch

from .corpora import CorpusStats
from .correlations import FeatureCorrelations, NeuronCorrelations
from .intervals import IntervalSamples
from .latent_scaling import LatentScaling
from .scalars import ScalarStats
from .slots import BatchEntries
from .top import TopExamples


def positive_entries(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The entries of ``flat[N, F]`` above zero in row-major order: ``(row, column, value as float32)``.

    On a CPU the scan reads the buffer as 64-bit words (two float32 or four 16-bit values each) and
    looks only inside the nonzero words: ``nonzero`` costs per element scanned, so this takes a third
    of the time of ``(flat > 0).nonzero()`` at the density of a sparse dictionary. Negative values and
    -0.0 (a nonzero word) are dropped by the final ``> 0``.
    """
    N, F = flat.shape
    per_word = 8 // flat.element_size()
    if (flat.device.type != "cpu" or per_word < 2 or F % per_word or not flat.is_contiguous()
            or flat.storage_offset() % per_word):
        row, col = (flat > 0).nonzero(as_tuple=True)
        return row, col, flat.view(-1).index_select(0, row * F + col).float()
    words = flat.view(-1).view(torch.int64).nonzero().view(-1)
    elem = (words[:, None] * per_word + torch.arange(per_word, device=flat.device)).view(-1)
    vals = flat.view(-1).index_select(0, elem)
    keep = (vals > 0).nonzero().view(-1)
    elem = elem.index_select(0, keep)
    return elem // F, elem % F, vals.index_select(0, keep).float()


class FeatureSummaries:
    """Scalars and histograms, top examples, interval samples and correlations of ``n_features`` features.

    ``width`` = S·d (the neurons of all sources, concatenated) and ``n_sources`` enable neuron
    correlations when ``settings.n_corr_neurons > 0``; ``candidates[F, C]`` (feature indices, -1 =
    none) enable feature correlations when ``settings.n_corr_features > 0``; ``latent_scaling`` (two
    sources) enables the latent-scaling sums (:mod:`atlas.stats.latent_scaling`). ``feature_offset`` is
    the id of the first of them in the whole dictionary (a feature slice).

    ``n_corpora`` is the number of named corpora (:class:`CorpusStats`; 1 for one unnamed corpus).

    A ``state_dict`` describes itself: loading it into summaries built without ``width``,
    ``candidates`` or ``n_corpora`` (e.g. by a tool that merges shards) creates the parts it holds.
    """

    def __init__(self, n_features: int, settings, seed: int, device=None, feature_offset: int = 0,
                 width: int | None = None, n_sources: int = 1, candidates: torch.Tensor | None = None,
                 latent_scaling: bool = False, n_corpora: int = 1):
        self.settings = settings
        self.seed = seed
        self.n_sources = n_sources
        before, after = settings.window_before, settings.window_after
        self.scalars = ScalarStats(n_features, settings.hist_edges(), device=device)
        self.top = TopExamples(n_features, settings.top_k, before, after, device=device)
        self.intervals = IntervalSamples(n_features, settings.n_intervals, settings.interval_k, before, after,
                                         seed, device=device, feature_offset=feature_offset)
        self.corpora = CorpusStats(n_features, max(1, n_corpora), device=device)
        self.device = device
        self.neurons = None
        if width and getattr(settings, "n_corr_neurons", 0) > 0:
            self.neurons = NeuronCorrelations(n_features, width, n_sources, device=device)
        self.features = None
        if candidates is not None and getattr(settings, "n_corr_features", 0) > 0:
            self.features = FeatureCorrelations(candidates, device=device)
        self.latent = LatentScaling(n_features, n_sources, device=device) if latent_scaling else None

    def parts(self) -> dict:
        return {name: part for name, part in (("scalars", self.scalars), ("top", self.top),
                                               ("intervals", self.intervals), ("corpora", self.corpora),
                                               ("neurons", self.neurons), ("features", self.features),
                                               ("latent", self.latent))
                if part is not None}

    def update(self, acts: torch.Tensor, counted: torch.Tensor, seq_offset: int,
               x: torch.Tensor | None = None, scaling=None, corpus: torch.Tensor | None = None,
               special: torch.Tensor | None = None) -> None:
        """Fold a batch: ``acts[B, T, F]`` (any float dtype; values are widened to float32 where read) of
        sequences ``seq_offset + b``, ``counted[B, T]``
        (the tokens that enter the statistics) and, for neuron correlations, the sources' activations
        ``x[B, T, S, d]`` (any float dtype). ``corpus[B]``: each sequence's corpus (default: all 0);
        ``special[B, T]``: the special tokens whose activations ``special_n_active`` counts, counted or
        not (default: none). ``acts`` is zeroed in place where not counted.

        For latent scaling, ``scaling(nz_tok, nz_f, nz_vals)`` is called with the batch's active entries
        and returns ``(h[B·T, S, d], recon[B·T, S, d], W_dec[F, S, d], coef)``: the crosscoder's inputs
        and reconstructions, the analysed latents' decoder rows and the entries' decoder coefficients."""
        B, T, F = acts.shape
        flat = acts.view(B * T, F)
        if special is not None:
            at = special.reshape(B * T).to(acts.device).nonzero(as_tuple=True)[0]
            if at.numel():
                self.corpora.update_special(flat.index_select(0, at))
        counted2d = counted.reshape(B, T).to(acts.device)
        counted = counted.reshape(B * T).to(acts.device)
        skipped = (~counted).nonzero(as_tuple=True)[0]
        if skipped.numel():
            flat.index_fill_(0, skipped, 0.0)
        nz_tok, nz_f, nz_vals = positive_entries(flat)
        nz_b, nz_pos = nz_tok // T, nz_tok % T
        n_counted = counted.sum()
        self.scalars.update(n_counted, nz_f, nz_vals)
        if corpus is None:
            corpus = torch.zeros(B, dtype=torch.int64, device=acts.device)
        self.corpora.update(corpus.to(acts.device, torch.int64), counted2d, nz_b, nz_f, nz_vals)
        batch = BatchEntries(acts, nz_b, nz_pos, nz_f, nz_vals)
        self.top.update(batch, seq_offset)
        self.intervals.update(batch, seq_offset)
        if self.neurons is not None:
            if x is None:
                raise ValueError("neuron correlations need the sources' activations x")
            self.neurons.update(x.reshape(B * T, -1), counted, nz_tok, nz_f, nz_vals)
        if self.features is not None:
            self.features.update(flat, n_counted, nz_tok, nz_f, nz_vals)
        if self.latent is not None:
            if scaling is None:
                raise ValueError("latent scaling needs the crosscoder's inputs and reconstructions")
            h, recon, W_dec, coef = scaling(nz_tok, nz_f, nz_vals)
            self.latent.update(nz_tok, nz_f, coef, h, recon, W_dec)

    def merge(self, other: "FeatureSummaries") -> "FeatureSummaries":
        """``self`` ⊕ ``other`` in place; returns self. Both must hold the same statistics."""
        mine, theirs = self.parts(), other.parts()
        if mine.keys() != theirs.keys():
            raise ValueError(f"cannot merge summaries of different statistics: {sorted(mine)} and {sorted(theirs)}")
        for name, part in mine.items():
            part.merge(theirs[name])
        return self

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts().items()}

    def load_state_dict(self, state: dict) -> None:
        if "neurons" in state and self.neurons is None:
            self.neurons = NeuronCorrelations.from_state(state["neurons"], device=self.device)
        if "features" in state and self.features is None:
            self.features = FeatureCorrelations.from_state(state["features"], device=self.device)
        if "latent" in state and self.latent is None:
            self.latent = LatentScaling.from_state(state["latent"], device=self.device)
        for name, part in self.parts().items():
            part.load_state_dict(state[name])

    def finalize(self, W_dec: torch.Tensor | None = None) -> dict:
        """numpy arrays: the activation fields of ``FeatureStats`` (with ``ncorr_*`` / ``fcorr_*`` when
        enabled, and ``ls_*`` from the latents' decoder rows ``W_dec[F, S, d]`` with latent scaling) and
        the fields of ``Examples`` except the ``*_next_logit`` ones; ``corpus_n_tokens`` is for the
        manifest."""
        out = (self.scalars.finalize() | self.top.finalize() | self.intervals.finalize()
               | self.corpora.finalize())
        if self.neurons is not None:
            out |= self.neurons.finalize(self.settings.n_corr_neurons)
        if self.features is not None:
            out |= self.features.finalize(self.settings.n_corr_features)
        if self.latent is not None:
            if W_dec is None:
                raise ValueError("latent scaling needs the latents' decoder rows to finish")
            out |= self.latent.finalize(W_dec)
        return out


def merge(a: FeatureSummaries, b: FeatureSummaries) -> FeatureSummaries:
    """``a`` ⊕ ``b`` (modifies and returns ``a``)."""
    return a.merge(b)
