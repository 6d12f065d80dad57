"""Per-feature data: the facts a page shows as HTML and the payload its panels are drawn from.

Features are processed in blocks (vectorised numpy over the block, then a short loop per feature), so
that 100k features render in well under a minute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ..cache import Cache
from .vocab import SiteVocab

N_TOP_TOKENS = 3


@dataclass
class FeatureFacts:
    """Scalars of one feature, shared by its page, the index, ``features.csv`` and the search index."""

    id: int
    index: int  # position in the cache (0-based)
    density: float
    n_active: int
    max_act: float
    mean_act: float
    rel_norm: float  # NaN unless S = 2
    dec_cos: float  # NaN unless S = 2
    dec_norm: list[float]
    peak: int  # argmax of dec_norm (the source the decoder writes most to)
    n_top: int  # top examples shown
    top_tokens: list[int] = field(default_factory=list)  # site ids, most frequent max-token first

    @property
    def alive(self) -> bool:
        return self.n_active > 0


@dataclass
class FeaturePayload:
    """The data of one feature page, embedded in ``f/<id>/index.html`` as
    ``<script type="application/x-atlas" id="atlas-feature">`` (see :mod:`atlas.render.chunks`) and
    read by ``assets/feature.js``. msgpack map (``W`` = window length, ``n`` = examples kept):

    - ``id`` (int), ``max`` (float): the feature's max activation; ``dn``: decoder norm per source;
      ``rel``, ``cos``: relative decoder norm and cosine (``null`` unless S = 2)
    - ``tt``: bin, site token ids of the top examples' windows (``n × W``, uint16 or uint32 LE as
      ``meta.vocab.id_bytes``; 0 = outside the sequence); ``ta``: bin uint8 ``n × W``: activation ×
      255 / max, rounded, nonzero activations at least 1; ``tv``: bin float32 ``n``: exact activation
      of each example's max token (window position ``meta.window_before``)
    - ``ig``: bin uint8 ``G``: examples per interval ``(g·iw, (g+1)·iw]``; ``iw`` (float): interval
      width; ``it``/``ia``: like ``tt``/``ta`` for the interval examples, interval 0 first;
      ``iv``: bin float16 LE: their centre activations
    - ``h``: ``[first_bin, [counts…]]``: the activation histogram over ``meta.hist`` log-spaced bins,
      from the first to the last nonzero bin
    - ``lg``: per source ``{ti, tv, bi, bv, h, lo, hi}``: top and bottom logit-effect tokens (site
      ids, as ``tt``) and values (bin float32), and the histogram of the effect over the vocabulary
      (counts between ``lo`` and ``hi`` in equal bins)
    - ``nb``: bin uint32 LE ids of the nearest features by decoder cosine, most similar first;
      ``nc``: bin float16 LE their cosines (a neighbour outside this site is shown without a link)
    - ``vs``: the vocab shards (``data/vocab/<k>.js``) holding every token above
    """

    obj: dict


def quantise(window: np.ndarray, max_act: np.ndarray) -> np.ndarray:
    """Activations ``[n, ..., W]`` → uint8 relative to each feature's ``max_act[n]`` (0 only for ≤ 0)."""
    w = np.asarray(window, dtype=np.float32)
    scale = np.where(max_act > 0, 255.0 / np.maximum(max_act, 1e-30), 0.0).astype(np.float32)
    q = np.rint(w * scale.reshape((-1,) + (1,) * (w.ndim - 1)))
    q = np.clip(q, 1, 255)
    return np.where(w > 0, q, 0).astype(np.uint8)


class WindowTokens:
    """Gathers example windows' site token ids from the corpus.

    The corpus is converted to site ids once and padded with "no token" (0) on both sides, plus one
    all-zero row that empty slots (sequence -1) point at, so a window is one fancy-indexing gather.
    """

    def __init__(self, cache: Cache, vocab: SiteVocab):
        st = cache.manifest.settings
        tokens = np.asarray(cache.tokens)
        N, T = tokens.shape
        dtype = np.uint16 if vocab.id_kind == "u2" else np.uint32
        self.before = st.window_before
        self.width = st.window
        self.N, self.T = N, T
        padded = np.zeros((N + 1, T + st.window_before + st.window_after), dtype=dtype)
        padded[:N, st.window_before:st.window_before + T] = vocab.to_site(tokens)
        self.padded = padded
        self.offsets = np.arange(self.width)

    def _rows_starts(self, seq: np.ndarray, pos: np.ndarray):
        ok = (seq >= 0) & (seq < self.N) & (pos >= 0) & (pos < self.T)
        return np.where(ok, seq, -1), np.where(ok, pos, 0)

    def __call__(self, seq: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Site ids ``[..., W]`` of the windows around ``(seq, pos)``; 0 outside sequences and for empty slots."""
        rows, start = self._rows_starts(seq, pos)
        return self.padded[rows[..., None], start[..., None] + self.offsets]

    def centre(self, seq: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Site ids of the example tokens themselves (window position ``window_before``)."""
        rows, start = self._rows_starts(seq, pos)
        return self.padded[rows, start + self.before]


def _histogram_obj(counts: np.ndarray) -> list:
    nz = np.flatnonzero(counts)
    if not len(nz):
        return [0, []]
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    return [lo, counts[lo:hi].tolist()]


def _float_or_none(x: float):
    return None if not np.isfinite(x) else float(x)


def _row_index(shape: tuple) -> np.ndarray:
    return np.broadcast_to(np.arange(shape[0]).reshape((-1,) + (1,) * (len(shape) - 1)), shape)


def top_tokens_of_block(centre: np.ndarray, weight: np.ndarray, valid: np.ndarray, k: int = N_TOP_TOKENS) -> list[list[int]]:
    """Per row: the ``k`` site ids with the largest summed weight among its valid centre tokens
    (ties: lower id first)."""
    n = centre.shape[0]
    sel = valid & (centre > 0)
    rows, toks, w = _row_index(centre.shape)[sel], centre[sel].astype(np.int64), weight[sel]
    out: list[list[int]] = [[] for _ in range(n)]
    if not len(rows):
        return out
    base = int(toks.max()) + 1
    uk, inv = np.unique(rows * base + toks, return_inverse=True)
    score = np.bincount(inv.ravel(), weights=w)
    ur, ut = uk // base, uk % base
    order = np.lexsort((ut, -score, ur))
    ur, ut = ur[order], ut[order]
    idx = np.arange(len(ur))
    first = np.maximum.accumulate(np.where(np.r_[True, ur[1:] != ur[:-1]], idx, 0))
    keep = (idx - first) < k
    for r, t in zip(ur[keep].tolist(), ut[keep].tolist()):
        out[r].append(t)
    return out


def shards_of_block(n: int, n_shards: int, shift: int, arrays: list[tuple[np.ndarray, np.ndarray]]) -> list[list[int]]:
    """Per row: the sorted vocab shards of the site ids in ``arrays`` (pairs of ids ``[n, ...]`` and a
    validity mask broadcastable to them)."""
    mask = np.zeros((n, max(n_shards, 1)), dtype=bool)
    for ids, valid in arrays:
        v = np.broadcast_to(valid, ids.shape) & (ids > 0)
        mask[_row_index(ids.shape)[v], ids[v] >> shift] = True
    return [np.flatnonzero(row).tolist() for row in mask]


@dataclass
class FactsBlock:
    """The facts of a block of features and the (feature, max token, weight) triples of their top
    examples, which the token search ranks by (weight: activation relative to the feature's max)."""

    facts: list[FeatureFacts]
    centre_feat: np.ndarray
    centre_tok: np.ndarray
    centre_w: np.ndarray


def feature_facts(cache: Cache, gather: WindowTokens, a: int, b: int) -> FactsBlock:
    """Facts of the features with cache indices ``a..b`` (vectorised; no example windows gathered)."""
    m = cache.manifest
    fs, ex = cache.features, cache.examples
    S = len(m.sources)
    two = S == 2
    first_id = m.feature_offset
    n = b - a
    mx = np.asarray(fs.max_act[a:b], dtype=np.float32)
    t_seq, t_pos = np.asarray(ex.top_seq[a:b]), np.asarray(ex.top_pos[a:b])
    t_valid = t_seq >= 0
    centre = gather.centre(t_seq, t_pos)
    t_act = np.asarray(ex.top_act[a:b], dtype=np.float32)
    weight = np.where(mx[:, None] > 0, t_act / np.maximum(mx[:, None], 1e-30), 0.0)
    tops = top_tokens_of_block(centre, weight, t_valid)
    dn = np.asarray(fs.dec_norm[a:b], dtype=np.float32)
    dn_list = dn.tolist()
    peak = np.argmax(dn, axis=1).tolist() if S else [0] * n
    rel = np.asarray(fs.rel_norm[a:b], dtype=np.float32).tolist()
    cos = np.asarray(fs.dec_cos[a:b], dtype=np.float32).tolist()
    dens = np.asarray(fs.density[a:b], dtype=np.float64).tolist()
    nact = np.asarray(fs.n_active[a:b]).tolist()
    mean = np.asarray(fs.mean_act[a:b], dtype=np.float32).tolist()
    mxl = mx.tolist()
    n_top = t_valid.sum(axis=1).tolist()
    nan = float("nan")
    facts = [
        FeatureFacts(
            id=first_id + a + j, index=a + j, density=dens[j], n_active=int(nact[j]), max_act=mxl[j],
            mean_act=mean[j], rel_norm=rel[j] if two else nan, dec_cos=cos[j] if two else nan,
            dec_norm=dn_list[j], peak=int(peak[j]), n_top=int(n_top[j]), top_tokens=tops[j],
        )
        for j in range(n)
    ]
    sel = t_valid & (centre > 0)
    feat = (first_id + a + _row_index(centre.shape))[sel].astype(np.int64)
    return FactsBlock(facts, feat, centre[sel].astype(np.int64), weight[sel].astype(np.float64))


def iter_features(cache: Cache, vocab: SiteVocab, start: int = 0, stop: int | None = None, block: int = 256,
                  gather: WindowTokens | None = None) -> Iterator[tuple[FeatureFacts, FeaturePayload]]:
    """Yield ``(facts, payload)`` for the features with cache indices ``start..stop``."""
    m = cache.manifest
    F = m.n_features
    stop = F if stop is None else min(stop, F)
    fs, ex, lg = cache.features, cache.examples, cache.logits
    gather = gather or WindowTokens(cache, vocab)
    id_dtype = "<u2" if vocab.id_kind == "u2" else "<u4"
    S = len(m.sources)
    two = S == 2
    first_id = m.feature_offset
    for a in range(start, stop, block):
        b = min(stop, a + block)
        n = b - a
        facts = feature_facts(cache, gather, a, b).facts
        mx = np.asarray(fs.max_act[a:b], dtype=np.float32)
        # top examples
        t_seq, t_pos = np.asarray(ex.top_seq[a:b]), np.asarray(ex.top_pos[a:b])
        t_valid = t_seq >= 0
        t_tok = gather(t_seq, t_pos)
        t_q = quantise(ex.top_window[a:b], mx)
        t_act = np.asarray(ex.top_act[a:b], dtype="<f4")
        # interval samples
        i_seq, i_pos = np.asarray(ex.iv_seq[a:b]), np.asarray(ex.iv_pos[a:b])
        i_valid = i_seq >= 0
        i_tok = gather(i_seq, i_pos)
        i_q = quantise(ex.iv_window[a:b], mx)
        i_act = np.asarray(ex.iv_act[a:b], dtype="<f2")
        i_count = i_valid.sum(axis=2).astype(np.uint8)
        i_width = np.asarray(ex.iv_width[a:b], dtype=np.float32).tolist()
        # logits
        l_top = vocab.to_site(np.asarray(lg.top_ids[a:b]))
        l_bot = vocab.to_site(np.asarray(lg.bot_ids[a:b]))
        l_tv = np.asarray(lg.top_vals[a:b], dtype="<f4")
        l_bv = np.asarray(lg.bot_vals[a:b], dtype="<f4")
        l_h = np.asarray(lg.hist_counts[a:b]).tolist()
        l_lo = np.asarray(lg.hist_lo[a:b], dtype=np.float32).tolist()
        l_hi = np.asarray(lg.hist_hi[a:b], dtype=np.float32).tolist()
        # histogram and neighbours
        hist = np.asarray(fs.hist_counts[a:b])
        nb_ids = np.asarray(fs.neighbours[a:b]).astype(np.int64)
        nb_cos = np.asarray(fs.neighbour_cos[a:b], dtype=np.float32)
        nb_ok = (nb_ids >= 0) & (nb_ids != (first_id + np.arange(a, b))[:, None]) & np.isfinite(nb_cos)
        nb_ids_b = nb_ids.astype("<u4")
        nb_cos_b = nb_cos.astype("<f2")
        shards = shards_of_block(n, vocab.n_shards, vocab.shard_bits, [
            (t_tok, t_valid[..., None]), (i_tok, i_valid[..., None]), (l_top, True), (l_bot, True)])
        t_tok = t_tok.astype(id_dtype, copy=False)
        i_tok = i_tok.astype(id_dtype, copy=False)
        l_top = l_top.astype(id_dtype, copy=False)
        l_bot = l_bot.astype(id_dtype, copy=False)

        for j in range(n):
            f = facts[j]
            tv = t_valid[j]
            iv = i_valid[j]
            nv = nb_ok[j]
            obj = {
                "id": f.id,
                "max": f.max_act,
                "dn": f.dec_norm,
                "rel": _float_or_none(f.rel_norm) if two else None,
                "cos": _float_or_none(f.dec_cos) if two else None,
                "tt": t_tok[j][tv].tobytes(),
                "ta": t_q[j][tv].tobytes(),
                "tv": t_act[j][tv].tobytes(),
                "ig": i_count[j].tobytes(),
                "iw": i_width[j],
                "it": i_tok[j][iv].tobytes(),
                "ia": i_q[j][iv].tobytes(),
                "iv": i_act[j][iv].tobytes(),
                "h": _histogram_obj(hist[j]),
                "lg": [
                    {"ti": l_top[j, s].tobytes(), "tv": l_tv[j, s].tobytes(), "bi": l_bot[j, s].tobytes(),
                     "bv": l_bv[j, s].tobytes(), "h": l_h[j][s], "lo": l_lo[j][s], "hi": l_hi[j][s]}
                    for s in range(S)
                ],
                "nb": nb_ids_b[j][nv].tobytes(),
                "nc": nb_cos_b[j][nv].tobytes(),
                "vs": shards[j],
            }
            yield f, FeaturePayload(obj)
