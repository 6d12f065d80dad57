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

    ``acts[B, T, F]`` are a batch's activations; positions outside the sequence read 0. One flat gather
    (int32 indices where they fit): window position j of entry m reads ``base[m] + (j - before) * F``.
    """
    B, T, F = acts.shape
    W = before + 1 + after
    dtype = torch.int32 if acts.numel() < 2**31 else torch.int64
    offsets = torch.arange(-before, after + 1, device=acts.device)
    base = ((b * T + pos) * F + f).to(dtype)
    flat = base[:, None] + (offsets * F).to(dtype)[None, :]
    flat.clamp_(0, acts.numel() - 1)
    t = pos[:, None] + offsets[None, :]
    inside = (t >= 0) & (t < T)
    values = acts.reshape(-1).index_select(0, flat.view(-1)).view(-1, W).float()
    values.mul_(inside)
    return values.clamp_(-FP16_MAX, FP16_MAX).to(torch.float16)


class BatchEntries:
    """A batch's activations ``acts[B, T, F]`` (zero where not counted) and their nonzero entries
    ``(b, pos, f, vals)``, shared by the summaries of one update.

    :meth:`windows` reads activation windows either densely (:func:`gather_windows`, one random read
    per window position) or, for many windows at once, from the nonzero entries sorted by
    ``(f, b, pos)``: a window's nonzero values are the entries of its (feature, sequence) within its
    positions, found by binary search — the cost then follows the active entries, not ``M × W``.
    """

    def __init__(self, acts: torch.Tensor, b: torch.Tensor, pos: torch.Tensor, f: torch.Tensor,
                 vals: torch.Tensor):
        self.acts, self.b, self.pos, self.f, self.vals = acts, b, pos, f, vals
        self._sorted = None

    def windows(self, b: torch.Tensor, pos: torch.Tensor, f: torch.Tensor, before: int, after: int,
                sparse: bool | None = None) -> torch.Tensor:
        """Windows ``[M, before + 1 + after]`` (float16) of feature ``f`` around ``(b, pos)``, as
        :func:`gather_windows`. ``sparse`` forces a path (default: sparse when ``M × W`` exceeds the
        number of active entries)."""
        W = before + 1 + after
        if sparse is None:
            sparse = b.numel() * W > 4 * max(self.vals.numel(), 1)
        if not sparse:
            return gather_windows(self.acts, b, pos, f, before, after)
        B, T, F = self.acts.shape
        if self._sorted is None:
            keys, order = torch.sort((self.f * B + self.b) * T + self.pos)
            self._sorted = keys, self.vals[order]
        keys, vals = self._sorted
        row = (f * B + b) * T
        start = torch.searchsorted(keys, row + (pos - before).clamp_min(0))
        stop = torch.searchsorted(keys, row + (pos + after).clamp_max(T - 1), right=True)
        counts = stop - start
        entry = torch.repeat_interleave(torch.arange(b.numel(), device=b.device), counts)
        first = torch.cumsum(counts, 0) - counts
        hit = start[entry] + torch.arange(entry.numel(), device=b.device) - first[entry]
        col = keys[hit] - row[entry] - pos[entry] + before
        out = torch.zeros(b.numel(), W, dtype=torch.float32, device=self.acts.device)
        out[entry, col] = vals[hit].float()
        return out.clamp_(-FP16_MAX, FP16_MAX).to(torch.float16)
