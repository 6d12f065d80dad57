"""Decoder geometry: norms per source, relative norm, cosine and model-diff class for two sources,
outlier dimensions, neuron alignment, nearest neighbours.

Writer: :mod:`atlas.analyze` (into ``atlas.cache.FeatureStats``). Computed from the weights alone.
"""

from __future__ import annotations

import numpy as np
import torch


DIFF_NONE, DIFF_A_ONLY, DIFF_SHARED, DIFF_B_ONLY = -1, 0, 1, 2


def diff_classes(rel_norm: np.ndarray, shared_lo: float, shared_hi: float) -> np.ndarray:
    """``diff_class[F]`` (int8) from the relative decoder norm r: 0 (model-A-only) where r < ``shared_lo``,
    1 (shared) where ``shared_lo`` ≤ r ≤ ``shared_hi``, 2 (model-B-only) where r > ``shared_hi``, and
    -1 where r is NaN (not two sources, or a zero decoder)."""
    r = np.asarray(rel_norm, dtype=np.float32)
    out = np.full(r.shape, DIFF_NONE, np.int8)
    out[r < shared_lo] = DIFF_A_ONLY
    out[(r >= shared_lo) & (r <= shared_hi)] = DIFF_SHARED
    out[r > shared_hi] = DIFF_B_ONLY
    return out


OUTLIER_FACTOR = 5.0


def outlier_dims(W_dec: torch.Tensor, factor: float = OUTLIER_FACTOR, block: int = 2**24) -> np.ndarray:
    """``mask[S, d]`` (bool): the outlier dimensions of each source's decoder.

    Dimension i of source s is an outlier when the root mean square of its decoder entries over the
    features, ``rms[s, i] = sqrt(mean_f W_dec[f, s, i]²)``, exceeds ``factor`` (5) times the median of
    ``rms[s, :]`` over that source's dimensions. The median makes the rule robust: a handful of
    massive residual-stream dimensions (the kind that is the largest decoder entry of nearly every
    feature) cannot raise the bar they are measured against, while the spread of ordinary dimensions
    stays below five times the typical one (SmolLM2's residual stream: the fifth largest is 4.4×).
    ``factor`` ≤ 0 flags none. The rows are read in blocks of about ``block`` entries (a whole
    dictionary need not fit in float32 at once).
    """
    F, S, d = W_dec.shape
    if factor <= 0 or F == 0:
        return np.zeros((S, d), bool)
    sq = torch.zeros(S, d, dtype=torch.float64, device=W_dec.device)
    rows = max(1, block // max(S * d, 1))
    for lo in range(0, F, rows):
        sq += W_dec[lo:lo + rows].double().pow(2).sum(dim=0)
    rms = (sq / F).sqrt()
    med = rms.median(dim=1, keepdim=True).values
    return (rms > factor * med).cpu().numpy()


def outlier_share(W_dec: torch.Tensor, mask: np.ndarray, block: int = 2**24) -> np.ndarray:
    """``share[F, S]`` (float32): the part of each decoder's squared norm ‖W_dec[f, s]‖² that lies in
    the dimensions ``mask[S, d]`` flags (:func:`outlier_dims`); NaN for a zero decoder."""
    F, S, d = W_dec.shape
    keep = torch.as_tensor(np.asarray(mask, dtype=bool), device=W_dec.device)
    out = np.empty((F, S), np.float32)
    rows = max(1, block // max(S * d, 1))
    for lo in range(0, F, rows):  # float32 squares of a block of rows at a time
        sq = W_dec[lo:lo + rows].float().pow(2)
        total = sq.sum(dim=-1)
        part = torch.where(keep, sq, 0.0).sum(dim=-1)
        out[lo:lo + rows] = torch.where(total > 0, part / total.clamp_min(1e-30), torch.nan).cpu().numpy()
    return out


def neuron_alignment(W_dec: torch.Tensor, k: int, block: int = 2**22, exclude: np.ndarray | None = None) -> dict:
    """The ``k`` decoder entries of largest magnitude per feature, over all sources and dimensions.

    ``exclude[S, d]`` (bool, e.g. :func:`outlier_dims`): dimensions left out of the ranking (their
    entries still count in the L1 norm the shares are taken of).

    ``align_source[F, k]``, ``align_dim[F, k]`` (int32), ``align_val[F, k]`` (the signed entry
    ``W_dec[f, s, i]``) and ``align_l1_frac[F, k]`` = |W_dec[f, s, i]| / Σ_s,i |W_dec[f, s, i]| (its share
    of the decoder's L1 norm; summed over the k entries, the share they carry together). Largest first;
    fewer than k entries (k > S·d) leave -1 / NaN.
    """
    F, S, d = W_dec.shape
    D = S * d
    m = min(k, D)
    src = np.full((F, k), -1, np.int32)
    dim = np.full((F, k), -1, np.int32)
    val = np.full((F, k), np.nan, np.float32)
    frac = np.full((F, k), np.nan, np.float32)
    rows = max(1, block // max(D, 1))
    keep = None
    if exclude is not None and np.asarray(exclude).any():
        keep = torch.as_tensor(~np.asarray(exclude, dtype=bool).reshape(-1), device=W_dec.device)
        m = min(m, int(keep.sum()))
    for lo in range(0, F, rows):
        w = W_dec[lo:lo + rows].reshape(-1, D).float()
        a = w.abs()
        l1 = a.sum(1, keepdim=True)
        top = (a if keep is None else torch.where(keep, a, -1.0)).topk(m, dim=1)  # excluded: never ranked
        hi = lo + w.shape[0]
        src[lo:hi, :m] = (top.indices // d).cpu().numpy()
        dim[lo:hi, :m] = (top.indices % d).cpu().numpy()
        val[lo:hi, :m] = w.gather(1, top.indices).cpu().numpy()
        frac[lo:hi, :m] = torch.where(l1 > 0, a.gather(1, top.indices) / l1.clamp_min(1e-30),
                                      torch.nan).cpu().numpy()
    return {"align_source": src, "align_dim": dim, "align_val": val, "align_l1_frac": frac}


def decoder_norms(W_dec: torch.Tensor, shared_lo: float = 0.3, shared_hi: float = 0.7) -> dict:
    """``dec_norm[F, S]``; ``rel_norm[F]`` = ‖d_1‖/(‖d_0‖+‖d_1‖) and ``dec_cos[F]`` for S = 2, else NaN;
    ``diff_class[F]`` from ``rel_norm`` (:func:`diff_classes`)."""
    W = W_dec.float()
    norms = W.norm(dim=-1)
    F, S = norms.shape
    if S == 2:
        total = norms.sum(dim=1)
        rel = torch.where(total > 0, norms[:, 1] / total.clamp_min(1e-30), torch.nan)
        cos = torch.nn.functional.cosine_similarity(W[:, 0], W[:, 1], dim=-1, eps=1e-30)
        cos = torch.where((norms > 0).all(dim=1), cos, torch.nan)
    else:
        rel = torch.full((F,), torch.nan)
        cos = torch.full((F,), torch.nan)
    rel = rel.float().cpu().numpy()
    return {"dec_norm": norms.cpu().numpy(), "rel_norm": rel, "dec_cos": cos.float().cpu().numpy(),
            "diff_class": diff_classes(rel, shared_lo, shared_hi)}


def nearest_neighbours(W_dec: torch.Tensor, n: int, chunk: int | None = None) -> dict:
    """Per feature, the ``n`` other features with the most similar decoder (all sources concatenated).

    ``neighbours[F, n]`` (int32, -1 where fewer than n others exist) and ``neighbour_cos[F, n]``
    (NaN there), most similar first. Blockwise: ``chunk`` rows × F similarities at a time (by default
    as many rows as keep a block near 2**24 values).
    """
    F = W_dec.shape[0]
    chunk = chunk or max(1, min(F, 2**24 // max(F, 1)))
    flat = W_dec.reshape(F, -1).float()
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
    m = min(n, F - 1)
    ids = np.full((F, n), -1, dtype=np.int32)
    cos = np.full((F, n), np.nan, dtype=np.float32)
    if m <= 0:
        return {"neighbours": ids, "neighbour_cos": cos}
    for lo in range(0, F, chunk):
        hi = min(lo + chunk, F)
        sims = unit[lo:hi] @ unit.T
        rows = torch.arange(hi - lo, device=sims.device)
        sims[rows, rows + lo] = -torch.inf
        vals, idx = sims.topk(m, dim=1)
        ids[lo:hi, :m] = idx.cpu().numpy()
        cos[lo:hi, :m] = vals.cpu().numpy()
    return {"neighbours": ids, "neighbour_cos": cos}
