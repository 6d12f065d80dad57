"""Decoder geometry: norms per source, relative norm and cosine for two sources, nearest neighbours.

Writer: :mod:`atlas.analyze` (into ``atlas.cache.FeatureStats``). Computed from the weights alone.
"""

from __future__ import annotations

import numpy as np
import torch


def decoder_norms(W_dec: torch.Tensor) -> dict:
    """``dec_norm[F, S]``; ``rel_norm[F]`` = ‖d_1‖/(‖d_0‖+‖d_1‖) and ``dec_cos[F]`` for S = 2, else NaN."""
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
    return {"dec_norm": norms.cpu().numpy(), "rel_norm": rel.float().cpu().numpy(),
            "dec_cos": cos.float().cpu().numpy()}


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
