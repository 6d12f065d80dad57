"""Top activating examples: per feature the K sequences with the highest maximum (a mergeable summary).

Each sequence contributes at most one example per feature: its max-activating token. Order: activation
descending, then sequence index ascending (so ties resolve the same way in any merge order). Writer:
:mod:`atlas.analyze`; ``finalize`` gives the ``top_*`` fields of ``atlas.cache.Examples``.
"""

from __future__ import annotations

import torch

from .slots import assign_slots, gather_windows


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

    def update(self, acts: torch.Tensor, seq_offset: int, nz_b, nz_pos, nz_f, nz_vals) -> None:
        """Fold a batch ``acts[B, T, F]`` (zero at tokens not counted) of sequences ``seq_offset + b``,
        given its nonzero entries (sequence in batch, position, feature, value)."""
        B, T, F = acts.shape
        pair = nz_b * F + nz_f
        best = torch.zeros(B * F, dtype=acts.dtype, device=acts.device)
        best.scatter_reduce_(0, pair, nz_vals, reduce="amax")
        at_best = nz_vals == best[pair]  # the first position holding the sequence's maximum wins
        first = torch.full((B * F,), T, dtype=torch.int64, device=acts.device)
        first.scatter_reduce_(0, pair[at_best], nz_pos[at_best], reduce="amin")
        value = torch.where(best > 0, best, -torch.inf).view(B, F).T
        pos = first.view(B, F).T
        seq = (torch.arange(B, device=acts.device) + seq_offset)[None, :].expand_as(value)

        def windows(rows, cols):
            return gather_windows(acts, cols, pos[rows, cols], rows, self.before, self.after)

        self._insert(value, seq, pos, windows)

    def merge(self, other: "TopExamples") -> "TopExamples":
        """``self`` ⊕ ``other`` (in place; returns self)."""
        dev = self.value.device
        o_window = other.window.to(dev)
        self._insert(other.value.to(dev), other.seq.to(dev), other.pos.to(dev),
                     lambda rows, cols: o_window[rows, cols])
        return self

    def _insert(self, value, seq, pos, windows) -> None:
        union_v = torch.cat([self.value, value], dim=1)
        union_s = torch.cat([self.seq, seq], dim=1)
        by_seq = torch.sort(union_s, dim=1, stable=True).indices
        by_value = torch.sort(union_v.gather(1, by_seq), dim=1, descending=True, stable=True).indices
        order = by_seq.gather(1, by_value)
        rows, cols, slots = assign_slots(order, union_v > -torch.inf, self.k)
        self.value[rows, slots] = value[rows, cols]
        self.seq[rows, slots] = seq[rows, cols]
        self.pos[rows, slots] = pos[rows, cols]
        self.window[rows, slots] = windows(rows, cols)

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
