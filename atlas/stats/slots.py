"""Shared machinery of the bounded summaries: fixed slots per group, and activation windows.

A bounded summary (top examples, interval samples) keeps, per group (a feature, or a feature's
interval), ``k`` slots that hold the best ``k`` entries seen so far under some order. The slots are
unordered: entries stay where they are until evicted, so only entrants need their (large) payload,
such as an activation window, written. Readers: :mod:`atlas.stats.top`, :mod:`atlas.stats.intervals`.
"""

from __future__ import annotations

import torch

FP16_MAX = 65504.0


def assign_slots(order: torch.Tensor, valid: torch.Tensor, k: int):
    """Which new candidates enter which slots.

    ``order[G, k + m]``: per group, the union's columns best first (columns ``0..k-1`` are the current
    slots, ``k..k+m-1`` the candidates); ``valid[G, k + m]``: which columns hold a real entry. The best
    ``k`` valid entries of each union are kept. Returns ``(rows, cols, slots)``: candidate ``cols`` (in
    ``0..m-1``) of group ``rows`` is written into slot ``slots``. Every current slot that loses its
    entry receives one, so no stale entry is left behind.
    """
    G, n = order.shape
    first_k = torch.zeros(G, n, dtype=torch.bool, device=order.device)
    first_k.scatter_(1, order[:, :k], True)
    kept = first_k & valid
    old_kept, new_kept = kept[:, :k], kept[:, k:]
    # free slots of each group in ascending slot order: stable sort puts False (not kept) first
    free_order = torch.sort(old_kept.to(torch.int8), dim=1, stable=True).indices
    new_rank = torch.cumsum(new_kept, dim=1) - 1
    rows, cols = new_kept.nonzero(as_tuple=True)
    slots = free_order[rows, new_rank[rows, cols]]
    return rows, cols, slots


def gather_windows(acts: torch.Tensor, b: torch.Tensor, pos: torch.Tensor, f: torch.Tensor,
                   before: int, after: int) -> torch.Tensor:
    """Activation windows ``[M, before + 1 + after]`` (float16) of feature ``f`` around ``(b, pos)``.

    ``acts[B, T, F]`` are a batch's activations; positions outside the sequence read 0.
    """
    B, T, F = acts.shape
    offsets = torch.arange(-before, after + 1, device=acts.device)
    t = pos[:, None] + offsets[None, :]
    inside = (t >= 0) & (t < T)
    flat = (b[:, None] * T + t.clamp(0, T - 1)) * F + f[:, None]
    values = acts.reshape(-1)[flat] * inside
    return values.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
