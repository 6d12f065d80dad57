"""Pearson correlations over tokens from streaming sums (mergeable summaries).

- :class:`NeuronCorrelations`: each feature against each dimension of each source's activation
  (``D = S * d`` "neurons"), from ``n``, ``Σf``, ``Σf²``, ``Σx``, ``Σx²`` and ``Σf·x`` (``[F, D]``).
- :class:`FeatureCorrelations`: each feature against each of its candidate features (its nearest
  decoder-cosine neighbours, fixed before the pass), from ``Σf·g`` over the candidate pairs only
  (``[F, C]``): a full ``F × F`` matrix does not fit at 100k features.

All sums run over the counted tokens (BOS and padding excluded) and are folded on the device from a
batch's nonzero feature entries, so the cost grows with the number of active (token, feature) pairs,
not with ``tokens × F``.

Numerics. Neuron activations can have means much larger than their spread (outlier dimensions of the
residual stream), so ``Σx``, ``Σx²`` and ``Σf·x`` are accumulated for ``x - c``, where the shift
``c[D]`` is the mean of the first batch's counted tokens; a shard merged into another is re-based onto
the other's shift exactly. ``Σf·(x - c)`` is a float32 ``[F, D]`` accumulator on the device, 4 bytes ×
F × S × d: 1.8 GB at 100k features × 2 sources × d = 2304, 37 MB at 16k × 576
(``AnalysisOptions.neuron_correlations = False`` skips it). It is fed in place by a float32 sparse
product per batch (cost ∝ active entries × S·d); the ``[F]`` and ``[D]`` sums are float64. The
correlation's rounding error grows like (number of batches) × 6e-8, far below the 3 digits a page
shows (a test checks 1e-5 against float64 over 60 batches with means 1e4 × the spread).

Writer: :mod:`atlas.analyze` through :class:`atlas.stats.FeatureSummaries`; ``finalize`` gives the
``ncorr_*`` and ``fcorr_*`` fields of ``atlas.cache.FeatureStats``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


def _nan_to_minus_one(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(t), -1.0, t)


class NeuronCorrelations:
    """Sums for the Pearson correlation of ``F`` features with ``D`` neurons (see the module docstring)."""

    FIELDS = ("n", "shifted", "shift", "sum_f", "sum_f2", "sum_x", "sum_x2", "sum_fx")

    def __init__(self, n_features: int, width: int, n_sources: int = 1, device=None):
        if width % n_sources:
            raise ValueError(f"{width} neurons do not split into {n_sources} sources")
        self.n_sources = n_sources
        self.n = torch.zeros((), dtype=torch.int64, device=device)
        self.shifted = torch.zeros((), dtype=torch.int64, device=device)  # 1 once ``shift`` is fixed
        self.shift = torch.zeros(width, dtype=torch.float32, device=device)
        self.sum_f = torch.zeros(n_features, dtype=torch.float64, device=device)
        self.sum_f2 = torch.zeros(n_features, dtype=torch.float64, device=device)
        self.sum_x = torch.zeros(width, dtype=torch.float64, device=device)
        self.sum_x2 = torch.zeros(width, dtype=torch.float64, device=device)
        self.sum_fx = torch.zeros(n_features, width, dtype=torch.float32, device=device)
        self._shift_known = False  # host-side copy of ``shifted`` (no device sync per batch)

    def update(self, x: torch.Tensor, counted: torch.Tensor, nz_tok: torch.Tensor, nz_f: torch.Tensor,
               nz_vals: torch.Tensor) -> None:
        """Fold a batch: neurons ``x[N, D]`` (any float dtype), ``counted[N]`` (bool), and the feature
        activations' nonzero entries at counted tokens (token index, feature index, value)."""
        F, D = self.sum_fx.shape
        mask = counted.to(torch.float32)[:, None]
        n_b = counted.sum()
        if not self._shift_known:  # the first batch fixes the shift (0 where it has no counted token)
            self.shift = (x.float() * mask).sum(0) / n_b.clamp_min(1)
            self.shifted = torch.ones_like(self.shifted)
            self._shift_known = True
        xs = (x.float() - self.shift) * mask  # [N, D], zero at tokens not counted
        self.n += n_b
        self.sum_x += xs.sum(0, dtype=torch.float64)
        self.sum_x2 += (xs * xs).sum(0, dtype=torch.float64)
        v = nz_vals.to(torch.float64)
        self.sum_f.index_add_(0, nz_f, v)
        self.sum_f2.index_add_(0, nz_f, v * v)
        sparse_t_matmul(nz_f, nz_tok, nz_vals.float(), F, xs, out=self.sum_fx)

    def merge(self, other: "NeuronCorrelations") -> "NeuronCorrelations":
        """``self`` ⊕ ``other`` (in place; returns self): ``other``'s sums re-based onto ``self``'s shift."""
        dev = self.sum_fx.device
        o = {name: getattr(other, name).to(dev) for name in self.FIELDS}
        if not bool(self.shifted > 0):
            self.shift, self.shifted = o["shift"].clone(), o["shifted"].clone()
            self._shift_known = bool(self.shifted > 0)
        delta = (o["shift"] - self.shift).double()  # x - c_self = (x - c_other) + delta
        n_o = o["n"].double()
        self.n += o["n"]
        self.sum_f += o["sum_f"]
        self.sum_f2 += o["sum_f2"]
        self.sum_x2 += o["sum_x2"] + 2 * delta * o["sum_x"] + n_o * delta * delta
        self.sum_x += o["sum_x"] + n_o * delta
        self.sum_fx += o["sum_fx"]
        self.sum_fx.addr_(o["sum_f"].float(), delta.float())
        return self

    def correlation(self, lo: int, hi: int) -> torch.Tensor:
        """Pearson correlations ``[hi - lo, D]`` (float64) of features ``lo..hi-1``; NaN where a side is constant."""
        n = self.n.double().clamp_min(1)
        mf = self.sum_f[lo:hi] / n
        mx = self.sum_x / n
        vf = (self.sum_f2[lo:hi] / n - mf * mf).clamp_min(0)
        vx = (self.sum_x2 / n - mx * mx).clamp_min(0)
        cov = self.sum_fx[lo:hi].double() / n - mf[:, None] * mx[None, :]
        denom = (vf[:, None] * vx[None, :]).sqrt()
        corr = torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.nan)
        return corr.clamp(-1, 1)

    @classmethod
    def from_state(cls, state: dict, device=None) -> "NeuronCorrelations":
        F, D = state["sum_fx"].shape
        out = cls(F, D, int(state["n_sources"]), device=device)
        out.load_state_dict(state)
        return out

    def finalize(self, k: int, block: int = 2**22) -> dict:
        """Top ``k`` neurons per feature by |correlation|: ``ncorr_source, ncorr_dim`` (int32, -1 = none)
        and ``ncorr_val`` (float32, NaN = none), strongest first."""
        F, D = self.sum_fx.shape
        d = D // self.n_sources
        k_eff = min(k, D)
        src = np.full((F, k), -1, np.int32)
        dim = np.full((F, k), -1, np.int32)
        val = np.full((F, k), np.nan, np.float32)
        rows = max(1, block // max(D, 1))
        for lo in range(0, F, rows):
            hi = min(F, lo + rows)
            corr = self.correlation(lo, hi)
            top = _nan_to_minus_one(corr.abs()).topk(k_eff, dim=1)
            picked = corr.gather(1, top.indices)
            valid = top.values >= 0
            idx = top.indices
            src[lo:hi, :k_eff] = torch.where(valid, idx // d, -1).cpu().numpy()
            dim[lo:hi, :k_eff] = torch.where(valid, idx % d, -1).cpu().numpy()
            val[lo:hi, :k_eff] = torch.where(valid, picked, torch.nan).float().cpu().numpy()
        return {"ncorr_source": src, "ncorr_dim": dim, "ncorr_val": val}

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS} | {"n_sources": torch.tensor(self.n_sources)}

    def load_state_dict(self, state: dict) -> None:
        dev = self.sum_fx.device
        for name in self.FIELDS:
            setattr(self, name, state[name].to(dev))
        self._shift_known = bool(self.shifted > 0)


class FeatureCorrelations:
    """Sums for the Pearson correlation of each feature with its ``C`` candidates ``cand[F, C]`` (-1 = none)."""

    FIELDS = ("n", "sum_f", "sum_f2", "sum_fg")

    def __init__(self, candidates: torch.Tensor, device=None):
        self.cand = torch.as_tensor(candidates, dtype=torch.int64, device=device)
        F, C = self.cand.shape
        self.n = torch.zeros((), dtype=torch.int64, device=device)
        self.sum_f = torch.zeros(F, dtype=torch.float64, device=device)
        self.sum_f2 = torch.zeros(F, dtype=torch.float64, device=device)
        self.sum_fg = torch.zeros(F, C, dtype=torch.float64, device=device)

    def update(self, acts: torch.Tensor, n_counted: torch.Tensor, nz_tok: torch.Tensor, nz_f: torch.Tensor,
               nz_vals: torch.Tensor, block: int = 2**22) -> None:
        """Fold a batch: ``acts[N, F]`` (zero at tokens not counted), its counted-token count, and its
        nonzero entries. ``Σf·g`` only needs the entries where f is active: ``acts[t, cand[f]]`` there,
        read with one flat gather per block of entries (entries come in token order, so each block reads
        a few rows of ``acts``)."""
        F, C = self.cand.shape
        N = acts.shape[0]
        self.n += n_counted
        v = nz_vals.to(torch.float64)
        self.sum_f.index_add_(0, nz_f, v)
        self.sum_f2.index_add_(0, nz_f, v * v)
        if C == 0 or nz_f.numel() == 0:
            return
        # missing candidates (-1) read column 0: their sums are never used (see ``correlation``)
        index_dtype = torch.int32 if N * F < 2**31 else torch.int64
        cand = self._cand_index(index_dtype)
        flat = acts.reshape(-1)
        batch = torch.zeros(F, C, dtype=torch.float32, device=acts.device)
        step = max(1, block // C)
        for lo in range(0, nz_f.numel(), step):
            f, t, val = nz_f[lo:lo + step], nz_tok[lo:lo + step], nz_vals[lo:lo + step]
            idx = cand.index_select(0, f)
            idx += (t * F).to(index_dtype)[:, None]
            g = flat.index_select(0, idx.view(-1)).view(-1, C).float()
            g *= val[:, None].float()
            batch.index_add_(0, f, g)
        self.sum_fg += batch

    def _cand_index(self, dtype) -> torch.Tensor:
        cached = getattr(self, "_cand_cache", None)
        if cached is None or cached.dtype != dtype or cached.device != self.cand.device:
            cached = self._cand_cache = self.cand.clamp_min(0).to(dtype)
        return cached

    def merge(self, other: "FeatureCorrelations") -> "FeatureCorrelations":
        """``self`` ⊕ ``other`` (in place; returns self). Both must have the same candidates."""
        dev = self.sum_fg.device
        if not torch.equal(self.cand, other.cand.to(dev)):
            raise ValueError("feature correlation shards have different candidate sets")
        for name in self.FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name).to(dev))
        return self

    def correlation(self) -> torch.Tensor:
        """Pearson correlations ``[F, C]`` (float64); NaN for a missing candidate or a constant side."""
        n = self.n.double().clamp_min(1)
        mean = self.sum_f / n
        var = (self.sum_f2 / n - mean * mean).clamp_min(0)
        cand = self.cand.clamp_min(0)
        cov = self.sum_fg / n - mean[:, None] * mean[cand]
        denom = (var[:, None] * var[cand]).sqrt()
        corr = torch.where((denom > 0) & (self.cand >= 0), cov / denom.clamp_min(1e-300), torch.nan)
        return corr.clamp(-1, 1)

    def finalize(self, k: int) -> dict:
        """The ``k`` most correlated candidates per feature, highest correlation first:
        ``fcorr_ids`` (int32, -1 = none) and ``fcorr_val`` (float32, NaN = none)."""
        F, C = self.cand.shape
        ids = np.full((F, k), -1, np.int32)
        val = np.full((F, k), np.nan, np.float32)
        m = min(k, C)
        if m:
            corr = self.correlation()
            top = torch.where(torch.isnan(corr), -torch.inf, corr).topk(m, dim=1)
            valid = top.values > -torch.inf
            ids[:, :m] = torch.where(valid, self.cand.gather(1, top.indices), -1).cpu().numpy()
            val[:, :m] = torch.where(valid, top.values, torch.nan).float().cpu().numpy()
        return {"fcorr_ids": ids, "fcorr_val": val}

    @classmethod
    def from_state(cls, state: dict, device=None) -> "FeatureCorrelations":
        out = cls(state["cand"], device=device)
        out.load_state_dict(state)
        return out

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS} | {"cand": self.cand}

    def load_state_dict(self, state: dict) -> None:
        dev = self.sum_fg.device
        for name in self.FIELDS + ("cand",):
            setattr(self, name, state[name].to(dev))
        self._cand_cache = None


def sparse_t_matmul(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, n_rows: int,
                    dense: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out += A @ dense`` (``out`` float32 ``[n_rows, dense.shape[1]]``, zeros when not given) for the
    sparse ``A[n_rows, N]`` with entries ``A[rows[i], cols[i]] = vals[i]``. A CSR product accumulated in
    place: the cost grows with the number of entries, and no second ``[n_rows, D]`` buffer is made."""
    if out is None:
        out = torch.zeros(n_rows, dense.shape[1], dtype=torch.float32, device=dense.device)
    if rows.numel() == 0:
        return out
    order = torch.argsort(rows.to(torch.int32) if n_rows < 2**31 else rows, stable=True)  # int32 sorts faster
    counts = torch.bincount(rows, minlength=n_rows)
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(counts, 0, out=crow[1:])
    with warnings.catch_warnings():  # "sparse CSR support is in beta": this product is long stable
        warnings.simplefilter("ignore", UserWarning)
        a = torch.sparse_csr_tensor(crow, cols[order], vals[order].to(dense.dtype),
                                    size=(n_rows, dense.shape[0]), check_invariants=False)
    return out.addmm_(a, dense)
