"""Direct logit effects: each feature's decoder direction through each source's folded unembedding.

Writer: :mod:`atlas.analyze` (into ``atlas.cache.LogitEffects``). Chunked over features so that at most
about ``max_elements`` effects ``[chunk, V]`` exist at once.
"""

from __future__ import annotations

import numpy as np
import torch


def logit_effects(W_dec: torch.Tensor, unembeddings: list[torch.Tensor], k: int, n_bins: int,
                  max_elements: int = 2**22) -> dict:
    """``W_dec[F, S, d]`` and per source ``U_s[d, V]`` → arrays of ``LogitEffects``.

    Effect of f on token t via s: ``W_dec[f, s] @ U_s[:, t]``. Top/bottom ``k`` tokens (largest first /
    most negative first) and a histogram of all V effects in ``n_bins`` equal bins between the feature's
    min and max (everything in bin 0 when they are equal).
    """
    F, S, _ = W_dec.shape
    V = min(U.shape[1] for U in unembeddings)
    k = min(k, V)
    out = {
        "top_ids": np.zeros((F, S, k), np.int32), "top_vals": np.zeros((F, S, k), np.float32),
        "bot_ids": np.zeros((F, S, k), np.int32), "bot_vals": np.zeros((F, S, k), np.float32),
        "hist_counts": np.zeros((F, S, n_bins), np.int64),
        "hist_lo": np.zeros((F, S), np.float32), "hist_hi": np.zeros((F, S), np.float32),
    }
    chunk = max(1, max_elements // V)
    for s, U in enumerate(unembeddings):
        U = U[:, :V].float()
        for lo in range(0, F, chunk):
            hi = min(lo + chunk, F)
            eff = W_dec[lo:hi, s].to(U.device, torch.float32) @ U  # [c, V]
            top = eff.topk(k, dim=1)
            bot = eff.topk(k, dim=1, largest=False)
            mn, mx = eff.amin(dim=1), eff.amax(dim=1)
            span = (mx - mn)[:, None]
            scaled = torch.where(span > 0, (eff - mn[:, None]) / span.clamp_min(1e-30), 0.0)
            bins = (scaled * n_bins).floor().clamp(0, n_bins - 1).to(torch.int64)
            rows = torch.arange(hi - lo, device=eff.device)[:, None] * n_bins
            counts = torch.bincount((bins + rows).view(-1), minlength=(hi - lo) * n_bins).view(hi - lo, n_bins)
            out["top_ids"][lo:hi, s] = top.indices.cpu().numpy()
            out["top_vals"][lo:hi, s] = top.values.cpu().numpy()
            out["bot_ids"][lo:hi, s] = bot.indices.cpu().numpy()
            out["bot_vals"][lo:hi, s] = bot.values.cpu().numpy()
            out["hist_counts"][lo:hi, s] = counts.cpu().numpy()
            out["hist_lo"][lo:hi, s] = mn.cpu().numpy()
            out["hist_hi"][lo:hi, s] = mx.cpu().numpy()
    return out
