"""Top activating examples: per feature the K sequences with the highest maximum (a mergeable summary).

Each sequence contributes at most one example per feature: its max-activating token. Order: activation
descending, then sequence index ascending (so ties resolve the same way in any merge order). Writer:
:mod:`atlas.analyze`; ``finalize`` gives the ``top_*`` fields of ``atlas.cache.Examples``.
"""

from __future__ import annotations

import torch

from .slots import BatchEntries, assign_slots


class TopExamples:
    """Slots ``value[F, K]`` (-inf = empty), ``seq[F, K]``, ``pos[F, K]`` (int64), ``window[F, K, W]`` (fp16)."""

    FIELDS = ("value", "seq", "pos", "window")

    def __init__(self, n_features: int, k: int, before: int, after: int, device=None):
        self.k, self.before, self.after = k, before, after
        W = before + 1 + after
        self.value = torch.full((n_features, k), -torch.inf, dtype=torch.float32, device=device)
        self.seq = torch.full((n_features, k), -1, dtype=torch.int64, device=device)
        self.pos = torch.full((n_features, k), -1, dtype=torch.int64, device=device)
        self.window = torch.zeros(n_features, k, W, dtype=torch.float16, device=device)

    def update(self, batch: BatchEntries, seq_offset: int) -> None:
        """Fold a batch (:class:`BatchEntries`: activations zero at tokens not counted, and their nonzero
        entries) of sequences ``seq_offset + b``. Each (sequence, feature) offers its maximum, at the
        first position holding it; only features whose best offer can enter are re-sorted."""
        B, T, F = batch.acts.shape
        dev = batch.acts.device
        pair = batch.b * F + batch.f
        best = torch.zeros(B * F, dtype=batch.vals.dtype, device=dev)
        best.scatter_reduce_(0, pair, batch.vals, reduce="amax")
        at_best = batch.vals == best[pair]
        first = torch.full((B * F,), T, dtype=torch.int64, device=dev)
        first.scatter_reduce_(0, pair[at_best], batch.pos[at_best], reduce="amin")
        value = torch.where(best > 0, best, -torch.inf).view(B, F).T  # [F, B]
        # a feature's offers can enter if the best reaches its lowest kept value (-inf: a free slot)
        rows = (value.amax(dim=1) >= self.value.amin(dim=1)).nonzero(as_tuple=True)[0]
        rows = rows[value[rows].amax(dim=1) > -torch.inf]
        if rows.numel() == 0:
            return
        value = value[rows]
        pos = first.view(B, F).T[rows]
        seq = (torch.arange(B, device=dev) + seq_offset)[None, :].expand_as(value)

        def windows(r, cols):
            return batch.windows(cols, pos[r, cols], rows[r], self.before, self.after)

        self._insert(rows, value, seq, pos, windows)

    def merge(self, other: "TopExamples") -> "TopExamples":
        """``self`` ⊕ ``other`` (in place; returns self)."""
        dev = self.value.device
        o_window = other.window.to(dev)
        rows = torch.arange(self.value.shape[0], device=dev)
        self._insert(rows, other.value.to(dev), other.seq.to(dev), other.pos.to(dev),
                     lambda r, cols: o_window[r, cols])
        return self

    def _insert(self, rows, value, seq, pos, windows) -> None:
        """Offer candidates ``value/seq/pos[len(rows), m]`` to the slots of features ``rows``;
        ``windows(r, cols)`` gives the windows of candidates ``(r, cols)`` (r indexes ``rows``)."""
        union_v = torch.cat([self.value[rows], value], dim=1)
        union_s = torch.cat([self.seq[rows], seq], dim=1)
        by_seq = torch.sort(union_s, dim=1, stable=True).indices
        by_value = torch.sort(union_v.gather(1, by_seq), dim=1, descending=True, stable=True).indices
        order = by_seq.gather(1, by_value)
        r, cols, slots = assign_slots(order, union_v > -torch.inf, self.k)
        f = rows[r]
        self.value[f, slots] = value[r, cols]
        self.seq[f, slots] = seq[r, cols]
        self.pos[f, slots] = pos[r, cols]
        self.window[f, slots] = windows(r, cols)

    def finalize(self) -> dict:
        """numpy ``top_seq, top_pos`` (int32, -1 = empty), ``top_act`` (float32), ``top_window`` (float16)."""
        by_seq = torch.sort(torch.where(self.seq < 0, torch.iinfo(torch.int64).max, self.seq), dim=1,
                            stable=True).indices
        by_value = torch.sort(self.value.gather(1, by_seq), dim=1, descending=True, stable=True).indices
        order = by_seq.gather(1, by_value)
        empty = self.value.gather(1, order) == -torch.inf
        seq = torch.where(empty, -1, self.seq.gather(1, order))
        pos = torch.where(empty, -1, self.pos.gather(1, order))
        act = torch.where(empty, 0.0, self.value.gather(1, order))
        window = self.window.gather(1, order[:, :, None].expand_as(self.window))
        return {
            "top_seq": seq.to(torch.int32).cpu().numpy(),
            "top_pos": pos.to(torch.int32).cpu().numpy(),
            "top_act": act.cpu().numpy(),
            "top_window": window.cpu().numpy(),
        }

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}

    def load_state_dict(self, state: dict) -> None:
        for name in self.FIELDS:
            setattr(self, name, state[name].to(self.value.device))
