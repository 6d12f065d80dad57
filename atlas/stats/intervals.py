"""Interval samples: per feature and activation interval, k tokens sampled uniformly (a mergeable summary).

The intervals are equal-width bins of ``(0, M]``, where ``M = 2**e`` is the smallest power of two at
least the feature's running maximum, and there are ``G = 2 * n_intervals`` of them: ``M`` is at most
twice the final maximum, so at least ``n_intervals`` bins lie within ``(0, max]``. Bin g holds values in
``(g * w, (g + 1) * w]`` with ``w = M / G``.

Sampling is bottom-k priority sampling: every (token, feature) gets a random key, a deterministic
function of ``(seed, global token index, feature id)`` (:func:`interval_keys`; the id in the whole
dictionary, so a feature slice samples what the whole run samples), and each bin keeps the k
entries with the smallest keys. The kept set is a uniform random k-subset of the tokens in the bin.

It stays exact in one pass although the maximum is only known at the end: when a feature's maximum
passes ``M``, ``M`` doubles and bins ``2j`` and ``2j + 1`` merge into bin ``j`` (the bottom-k of a union
is the bottom-k of the two bottom-k sets); the bins nest exactly because ``M`` is a power of two. Shards
merge the same way. Updates work on the batch's nonzero entries only: drop entries whose key cannot
beat a full bin's largest kept key, group the rest by (feature, bin), sort by key, rank within group,
keep rank < k, and union with the bin's current slots.

Writer: :mod:`atlas.analyze`; ``finalize`` gives the ``iv_*`` fields of ``atlas.cache.Examples``.
"""

from __future__ import annotations

import torch

from .slots import BatchEntries, assign_slots

EMPTY = torch.iinfo(torch.int64).max
UNSET = -(2**20)  # exponent of a feature never seen active
_P = 2147483647  # 2**31 - 1
_MIX = (
    (1103515245, 12345, 48271, 69621, 16807),
    (214013, 2531011, 39373, 630360016, 742938285),
)
_FOLD = ((0x5BD1E995, 0x2C1B3C6D), (0x27D4EB2F, 0x165667B1))  # odd multipliers below 2**31, per half


def _mix31(seed: int, gtok: torch.Tensor, f: torch.Tensor, consts) -> torch.Tensor:
    """A 31-bit hash by rounds of (h xor x) * a + c mod 2**31 - 1 (products stay below 2**62)."""
    a1, a2, a3, a4, a5 = consts
    h = torch.full_like(gtok, (seed * 7919 + consts[1]) % _P)
    h = ((h ^ (gtok % _P)) * a1 + 1) % _P
    h = ((h ^ ((gtok // _P) % _P)) * a2 + 3) % _P
    h = ((h ^ (f % _P)) * a3 + 5) % _P
    h = ((h ^ (h >> 11)) * a4 + 7) % _P
    h = ((h ^ (h >> 7)) * a5 + 11) % _P
    return h


def token_hashes(seed: int, gtok: torch.Tensor) -> torch.Tensor:
    """``[2, N]`` 31-bit hashes of global token indices, one per key half (a batch's tokens: few)."""
    gtok = gtok.to(torch.int64)
    zero = torch.zeros_like(gtok)
    return torch.stack([_mix31(seed, gtok, zero, c) for c in _MIX])


def feature_hashes(seed: int, fid: torch.Tensor) -> torch.Tensor:
    """``[2, F]`` 31-bit hashes of feature ids (in the whole dictionary), one per key half."""
    fid = fid.to(torch.int64)
    zero = torch.zeros_like(fid)
    return torch.stack([_mix31(seed + 1, zero, fid, c) for c in _MIX])


def _fold(h: torch.Tensor, a: int) -> torch.Tensor:
    """One multiply-fold round on 31-bit values: the 62-bit product ``h * a``, its high and low 31
    bits xor-ed (exact in int64 on every device)."""
    m = h * a
    return (m ^ (m >> 31)) & _P


def key_half(t_hash: torch.Tensor, f_hash: torch.Tensor, half: int) -> torch.Tensor:
    """Half ``half`` (0: high 31 bits, 1: low) of the keys of entries whose token and feature hashes
    (that half's rows of :func:`token_hashes` / :func:`feature_hashes`) are given: their xor, mixed
    by two multiply-fold rounds. Per entry this is a handful of integer operations; the expensive
    hashing is per token and per feature."""
    a, b = _FOLD[half]
    return _fold(_fold(t_hash ^ f_hash, a), b)


def interval_keys(seed: int, gtok: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Priority keys in ``[0, 2**62)`` (int64) for entries (global token index, feature)."""
    th, fh = token_hashes(seed, gtok), feature_hashes(seed, f)
    return key_half(th[0], fh[0], 0) * (2**31) + key_half(th[1], fh[1], 1)


def power_of_two_exponent(x: torch.Tensor) -> torch.Tensor:
    """Smallest e with ``2**e >= x`` for ``x > 0`` (int64)."""
    mantissa, exponent = torch.frexp(x)
    return (exponent - (mantissa == 0.5).to(exponent.dtype)).to(torch.int64)


def value_bins(values: torch.Tensor, exponent: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin of each value in ``(0, 2**exponent]`` split into ``n_bins`` (int64, clamped)."""
    x = torch.ldexp(values.float(), -exponent.to(torch.float32)) * n_bins
    return (torch.ceil(x) - 1).clamp(0, n_bins - 1).to(torch.int64)


class IntervalSamples:
    """Slots ``key, seq, pos [F, G, k]`` (int64; key EMPTY = free), ``act [F, G, k]``,
    ``window [F, G, k, W]`` (fp16) and the scale exponent ``exponent[F]``."""

    FIELDS = ("key", "seq", "pos", "act", "window", "exponent")
    HALVE_BLOCK = 2**24  # slot elements (windows included) halved at once

    def __init__(self, n_features: int, n_intervals: int, k: int, before: int, after: int, seed: int,
                 device=None, feature_offset: int = 0):
        self.G, self.k, self.before, self.after, self.seed = 2 * n_intervals, k, before, after, seed
        self.feature_offset = feature_offset  # id of feature 0 here in the whole dictionary (keys use ids)
        shape = (n_features, self.G, k)
        self.key = torch.full(shape, EMPTY, dtype=torch.int64, device=device)
        self.seq = torch.full(shape, -1, dtype=torch.int64, device=device)
        self.pos = torch.full(shape, -1, dtype=torch.int64, device=device)
        self.act = torch.zeros(shape, dtype=torch.float32, device=device)
        self.window = torch.zeros(shape + (before + 1 + after,), dtype=torch.float16, device=device)
        self.exponent = torch.full((n_features,), UNSET, dtype=torch.int64, device=device)

    # ------------------------------------------------------------------ updates

    def update(self, batch: BatchEntries, seq_offset: int) -> None:
        """Fold a batch (:class:`BatchEntries`) of sequences ``seq_offset + b``: its nonzero entries."""
        F, T = self.exponent.shape[0], batch.acts.shape[1]
        nz_b, nz_pos, nz_f, nz_vals = batch.b, batch.pos, batch.f, batch.vals
        batch_max = torch.zeros(F, dtype=torch.float32, device=nz_vals.device)
        batch_max.scatter_reduce_(0, nz_f, nz_vals, reduce="amax")
        new_exp = torch.where(batch_max > 0, power_of_two_exponent(batch_max), UNSET)
        self._rescale(torch.maximum(self.exponent, new_exp))
        bins = value_bins(nz_vals, self.exponent.index_select(0, nz_f), self.G)
        # only keys below a full bin's largest kept key can enter (a bin with a free slot has max EMPTY);
        # the key's high 31 bits decide for almost all entries, so the low half is made for the rest
        bound = self.key.amax(dim=2).view(-1).index_select(0, nz_f * self.G + bins)
        tok = nz_b * T + nz_pos  # the entry's token in the batch
        t_hash = token_hashes(self.seed, seq_offset * T + torch.arange(batch.acts.shape[0] * T, device=tok.device))
        f_hash = self._feature_hashes()
        high = key_half(t_hash[0].index_select(0, tok), f_hash[0].index_select(0, nz_f), 0)
        maybe = (high <= bound >> 31).nonzero(as_tuple=True)[0]
        tok_m, f_m = tok[maybe], nz_f[maybe]
        keys = high[maybe] * (2**31) + key_half(t_hash[1].index_select(0, tok_m), f_hash[1].index_select(0, f_m), 1)
        enters = keys < bound[maybe]
        hope, keys = maybe[enters], keys[enters]
        b, pos, f, vals = nz_b[hope], nz_pos[hope], nz_f[hope], nz_vals[hope]

        def windows(entries):
            return batch.windows(b[entries], pos[entries], f[entries], self.before, self.after)

        self._insert(f, bins[hope], keys, b + seq_offset, pos, vals, windows)

    def _feature_hashes(self) -> torch.Tensor:
        """:func:`feature_hashes` of this summary's features (by their ids in the whole dictionary), made once."""
        cached = getattr(self, "_f_hash", None)
        if cached is None or cached.device != self.key.device:
            ids = torch.arange(self.key.shape[0], device=self.key.device) + self.feature_offset
            cached = self._f_hash = feature_hashes(self.seed, ids)
        return cached

    def merge(self, other: "IntervalSamples") -> "IntervalSamples":
        """``self`` ⊕ ``other`` (in place; returns self). ``other`` is rescaled on a copy."""
        dev = self.key.device
        o = IntervalSamples.__new__(IntervalSamples)
        o.G, o.k, o.before, o.after, o.seed = self.G, self.k, self.before, self.after, self.seed
        o.load_state_dict({name: t.to(dev).clone() for name, t in other.state_dict().items()})
        target = torch.maximum(self.exponent, o.exponent)
        self._rescale(target)
        o._rescale(target)
        f, g, s = (o.key != EMPTY).nonzero(as_tuple=True)
        self._insert(f, g, o.key[f, g, s], o.seq[f, g, s], o.pos[f, g, s], o.act[f, g, s],
                     lambda entries: o.window[f[entries], g[entries], s[entries]])
        return self

    def _rescale(self, target: torch.Tensor) -> None:
        """Raise every exponent to ``target``, merging bin pairs once per doubling."""
        unset = self.exponent == UNSET
        steps = torch.where(unset, 0, target - self.exponent)
        self.exponent = torch.where(unset, target, torch.maximum(self.exponent, target))
        # features in blocks: halving copies their slots (windows included) a few times over
        block = max(1, self.HALVE_BLOCK // max(self.window[0].numel(), 1))
        while bool((steps > 0).any()):
            idx = (steps > 0).nonzero(as_tuple=True)[0]
            for lo in range(0, idx.numel(), block):
                self._halve(idx[lo:lo + block])
            steps[idx] -= 1

    def _halve(self, idx: torch.Tensor) -> None:
        """Bins 2j and 2j+1 of features ``idx`` become bin j (bottom-k of the pair); upper half empties."""
        n, G, k = idx.numel(), self.G, self.k
        keys = self.key[idx].view(n, G // 2, 2 * k)
        order = torch.sort(keys, dim=-1, stable=True).indices[..., :k]

        def pair(t, fill):
            t = t[idx]
            tail = t.shape[3:]
            merged = t.reshape(n, G // 2, 2 * k, *tail)
            merged = merged.gather(2, order.reshape(n, G // 2, k, *([1] * len(tail))).expand(n, G // 2, k, *tail))
            empty = torch.full((n, G // 2, k, *tail), fill, dtype=t.dtype, device=t.device)
            return torch.cat([merged, empty], dim=1)

        self.key[idx] = pair(self.key, EMPTY)
        self.seq[idx] = pair(self.seq, -1)
        self.pos[idx] = pair(self.pos, -1)
        self.act[idx] = pair(self.act, 0)
        self.window[idx] = pair(self.window, 0)

    def _insert(self, f, bins, keys, seq, pos, act, windows) -> None:
        """Offer entries to their (feature, bin) groups; ``windows(entry_indices)`` gives their windows."""
        if f.numel() == 0:
            return
        k, G = self.k, self.G
        group = f * G + bins
        # entries by (group, key): one sort of group and the key's high 31 bits; ties there (chance
        # ~2**-31 per pair) fall back to a stable sort by key, then by group
        composite = group * (2**31) + (keys >> 31)
        c_sorted, order = torch.sort(composite, stable=True)
        if bool((c_sorted[1:] == c_sorted[:-1]).any()):
            by_key = torch.sort(keys, stable=True).indices
            order = by_key[torch.sort(group[by_key], stable=True).indices]
        g_sorted = group[order]
        start = torch.ones_like(g_sorted, dtype=torch.bool)
        start[1:] = g_sorted[1:] != g_sorted[:-1]
        run = torch.cumsum(start, 0) - 1
        starts = start.nonzero(as_tuple=True)[0]
        rank = torch.arange(order.numel(), device=order.device) - starts[run]
        keep = rank < k
        entries, run, rank = order[keep], run[keep], rank[keep]
        touched = g_sorted[starts]  # one row per touched group

        new_key = torch.full((touched.numel(), k), EMPTY, dtype=torch.int64, device=keys.device)
        new_entry = torch.full((touched.numel(), k), -1, dtype=torch.int64, device=keys.device)
        new_key[run, rank] = keys[entries]
        new_entry[run, rank] = entries

        flat_key = self.key.view(-1, k)
        union = torch.cat([flat_key[touched], new_key], dim=1)
        order_u = torch.sort(union, dim=1, stable=True).indices
        rows, cols, slots = assign_slots(order_u, union != EMPTY, k)
        e = new_entry[rows, cols]
        g = touched[rows]
        flat_key[g, slots] = keys[e]
        self.seq.view(-1, k)[g, slots] = seq[e]
        self.pos.view(-1, k)[g, slots] = pos[e]
        self.act.view(-1, k)[g, slots] = act[e].float()
        self.window.view(-1, k, self.window.shape[-1])[g, slots] = windows(e)

    # ------------------------------------------------------------------ output

    def finalize(self) -> dict:
        """numpy ``iv_seq, iv_pos`` (int32, -1 = empty), ``iv_act``, ``iv_window`` (fp16), ``iv_width``.

        Within an interval the samples are ordered by activation, highest first, equal activations by key:
        the order depends on the kept samples only, not on the order batches or shards were folded in.
        """
        empty = self.key == EMPTY
        by_key = torch.sort(self.key, dim=-1, stable=True).indices
        acts = torch.where(empty, -torch.inf, self.act).gather(2, by_key)
        order = by_key.gather(2, torch.sort(acts, dim=-1, descending=True, stable=True).indices)
        empty = empty.gather(2, order)
        seq = torch.where(empty, -1, self.seq.gather(2, order))
        pos = torch.where(empty, -1, self.pos.gather(2, order))
        act = torch.where(empty, 0.0, self.act.gather(2, order))
        window = self.window.gather(2, order[..., None].expand_as(self.window))
        width = torch.where(self.exponent == UNSET, 0.0,
                            torch.ldexp(torch.ones_like(self.exponent, dtype=torch.float32),
                                        self.exponent.clamp_min(-1000).to(torch.float32)) / self.G)
        return {
            "iv_seq": seq.to(torch.int32).cpu().numpy(),
            "iv_pos": pos.to(torch.int32).cpu().numpy(),
            "iv_act": act.cpu().numpy(),
            "iv_window": window.cpu().numpy(),
            "iv_width": width.cpu().numpy(),
        }

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}

    def load_state_dict(self, state: dict) -> None:
        device = state["key"].device if not hasattr(self, "key") else self.key.device
        for name in self.FIELDS:
            setattr(self, name, state[name].to(device))
