"""Direct logit effects: each feature's decoder direction through each source's folded unembedding.

Writer: :mod:`atlas.analyze` (into ``atlas.cache.LogitEffects``, and the per-token ``*_next_logit``
fields of ``atlas.cache.Examples``). Chunked over features so that at most about ``max_elements``
effects ``[chunk, V]`` exist at once; everything is read off each chunk in one pass.
"""

from __future__ import annotations

import numpy as np
import torch

FP16_MAX = 65504.0


def next_token_ids(tokens, seq, pos, before: int, after: int) -> torch.Tensor:
    """Token id that follows each position of each example window (int64, -1 = none).

    ``tokens[N, T]``; ``seq[F, ...]`` and ``pos[F, ...]`` (an example's sequence and token, -1 = empty
    slot). Window position w of an example at (s, p) is token ``p - before + w``; the result is
    ``tokens[s, p - before + w + 1]``, or -1 where the slot is empty or that position or its successor
    lies outside the sequence. Shape ``[F, ..., before + 1 + after]``.
    """
    tokens = torch.as_tensor(tokens, dtype=torch.int64)
    seq = torch.as_tensor(np.asarray(seq), dtype=torch.int64).to(tokens.device)
    pos = torch.as_tensor(np.asarray(pos), dtype=torch.int64).to(tokens.device)
    N, T = tokens.shape
    offsets = torch.arange(-before, after + 1, device=tokens.device)
    t = pos[..., None] + offsets  # the window position
    ok = (seq[..., None] >= 0) & (t >= 0) & (t + 1 < T)
    flat = seq[..., None].clamp_min(0) * T + (t + 1).clamp(0, T - 1)
    return torch.where(ok, tokens.reshape(-1)[flat.clamp(0, N * T - 1)], -1)


def logit_effects(W_dec: torch.Tensor, unembeddings: list[torch.Tensor], k: int, n_bins: int,
                  max_elements: int | None = None, windows: dict | None = None, tokens=None,
                  window_before: int = 0, exclude: np.ndarray | None = None) -> dict:
    """``W_dec[F, S, d]`` and per source ``U_s[d, V]`` → arrays of ``LogitEffects``.

    ``exclude[S, d]`` (bool, e.g. :func:`atlas.stats.geometry.outlier_dims`): residual dimensions left
    out of the tables, as if those decoder entries were 0. A few massive residual dimensions that every
    decoder writes to would otherwise give every feature the same top tokens.

    Effect of f on token t via s, centred over the vocabulary: ``e[t] = w @ U_s[:, t] - mean`` with
    ``w`` the decoder row ``W_dec[f, s]`` without the excluded dimensions and ``mean[f, s]`` the mean of
    ``w @ U_s`` over the V tokens (a shift every logit gets alike, which the softmax ignores; kept as
    ``mean``). Top/bottom ``k`` tokens of the centred effect (largest
    first / most negative first) and a histogram of all V centred effects in ``n_bins`` equal bins
    between the feature's min and max (everything in bin 0 when they are equal). For S = 2 also the
    B−A table: the ``k`` tokens whose centred effect grows most (``diff_top_*``, largest first) and
    shrinks most (``diff_bot_*``, most negative first) from source 0's decoder to source 1's,
    ``e_1[t] - e_0[t]``.

    ``windows`` maps output names to example windows ``(seq[F, ...], pos[F, ...], acts[F, ..., W])``
    into the corpus ``tokens[N, T]`` (windows start ``window_before`` tokens before ``pos``). The output
    ``name[F, ..., W, S]`` (float16) is each window token's activation × the feature's effect via s on
    the logit of the token that follows it (:func:`next_token_ids`; 0 where there is none), read off
    the same chunks (the raw effect of the whole decoder row, excluded dimensions included and not
    centred: what the token's logit actually received).
    ``max_elements`` bounds the ``[features, V]`` effects held at once (default: 2**22 on a CPU, 2**26
    on a GPU).
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
    out["mean"] = np.zeros((F, S), np.float32)
    two = S == 2
    if two:
        for key in ("diff_top", "diff_bot"):
            out[key + "_ids"] = np.zeros((F, k), np.int32)
            out[key + "_vals"] = np.zeros((F, k), np.float32)
    windows = windows or {}
    for name, (_, _, acts) in windows.items():
        out[name] = np.zeros(tuple(acts.shape) + (S,), np.float16)
    if max_elements is None:  # effects computed at once: cache-sized on a CPU; on a GPU, few launches
        max_elements = 2**22 if unembeddings[0].device.type == "cpu" else 2**26
    chunk = max(1, max_elements // V)
    Us = [U[:, :V].float() for U in unembeddings]
    dev = Us[0].device
    # per source, the excluded dimensions (empty: none)
    left_out = [torch.as_tensor(np.flatnonzero(np.asarray(exclude)[s]) if exclude is not None else [],
                                dtype=torch.int64, device=U.device) for s, U in enumerate(Us)]
    tok = torch.as_tensor(np.asarray(tokens), dtype=torch.int64).to(dev) if windows else None
    for lo in range(0, F, chunk):
        hi = min(lo + chunk, F)
        c = hi - lo
        first = None
        for s, U in enumerate(Us):
            w = W_dec[lo:hi, s].to(U.device, torch.float32)
            raw = w @ U  # [c, V]
            kept = raw
            if len(left_out[s]):  # the excluded dimensions' part, a low-rank update
                kept = raw - w[:, left_out[s]] @ U[left_out[s]]
            mean = kept.mean(dim=1, keepdim=True)
            eff = (kept - mean).to(dev)
            out["mean"][lo:hi, s] = mean[:, 0].cpu().numpy()
            _extremes(out, eff, s, lo, hi, k, n_bins)
            for name, (seq, pos, acts) in windows.items():
                a = torch.as_tensor(np.asarray(acts[lo:hi]), device=dev).float()
                i = next_token_ids(tok, seq[lo:hi], pos[lo:hi], window_before, a.shape[-1] - 1 - window_before)
                e = raw.to(dev).gather(1, i.clamp(0, V - 1).reshape(c, -1)).view(i.shape)
                hover = torch.where(i >= 0, e * a, 0.0).clamp(-FP16_MAX, FP16_MAX)
                out[name][lo:hi, ..., s] = hover.to(torch.float16).cpu().numpy()
            if two and s == 0:
                first = eff
            elif two and k > 0:
                diff = eff - first
                top = diff.topk(k, dim=1, sorted=True)
                bot = diff.topk(k, dim=1, largest=False, sorted=True)
                out["diff_top_ids"][lo:hi] = top.indices.cpu().numpy()
                out["diff_top_vals"][lo:hi] = top.values.cpu().numpy()
                out["diff_bot_ids"][lo:hi] = bot.indices.cpu().numpy()
                out["diff_bot_vals"][lo:hi] = bot.values.cpu().numpy()
    return out


def _extremes(out: dict, eff: torch.Tensor, s: int, lo: int, hi: int, k: int, n_bins: int) -> None:
    """Top/bottom ``k`` tokens and the histogram of the effects ``eff[c, V]`` of features ``lo..hi`` via
    source ``s``, into ``out``."""
    c = hi - lo
    dev = eff.device
    top = eff.topk(max(k, 1), dim=1, sorted=True)
    bot = eff.topk(max(k, 1), dim=1, largest=False, sorted=True)
    mn, mx = bot.values[:, 0], top.values[:, 0]  # sorted: the extremes come first
    span = mx - mn
    inv = torch.where(span > 0, n_bins / span.clamp_min(1e-30), 0.0)
    # int32 bin indices (c · n_bins < 2**31): half the memory traffic of int64
    bins = eff.sub(mn[:, None]).mul_(inv[:, None]).to(torch.int32).clamp_(0, n_bins - 1)
    bins += (torch.arange(c, dtype=torch.int32, device=dev) * n_bins)[:, None]
    counts = torch.bincount(bins.view(-1), minlength=c * n_bins).view(c, n_bins)
    out["top_ids"][lo:hi, s] = top.indices[:, :k].cpu().numpy()
    out["top_vals"][lo:hi, s] = top.values[:, :k].cpu().numpy()
    out["bot_ids"][lo:hi, s] = bot.indices[:, :k].cpu().numpy()
    out["bot_vals"][lo:hi, s] = bot.values[:, :k].cpu().numpy()
    out["hist_counts"][lo:hi, s] = counts.cpu().numpy()
    out["hist_lo"][lo:hi, s] = mn.cpu().numpy()
    out["hist_hi"][lo:hi, s] = mx.cpu().numpy()


def example_windows(arrays: dict, which: str) -> dict:
    """The ``windows`` argument of :func:`logit_effects` for the examples in ``arrays`` (the output of
    :meth:`atlas.stats.FeatureSummaries.finalize`): ``which`` is ``"top"`` (top examples →
    ``top_next_logit``), ``"all"`` (also interval samples → ``iv_next_logit``) or ``"none"``."""
    if which not in ("none", "top", "all"):
        raise ValueError(f"next-token effects must be 'none', 'top' or 'all' (got {which!r})")
    out = {}
    if which in ("top", "all"):
        out["top_next_logit"] = (arrays["top_seq"], arrays["top_pos"], arrays["top_window"])
    if which == "all":
        out["iv_next_logit"] = (arrays["iv_seq"], arrays["iv_pos"], arrays["iv_window"])
    return out
