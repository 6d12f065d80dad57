"""Per-feature data: the facts a page shows as HTML and the payload its panels are drawn from.

Features are processed in blocks (vectorised numpy over the block, then a short loop per feature), so
that 100k features render in well under a minute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ..cache import Cache
from .chunks import pack
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
    """Gathers example windows' site token ids from the corpus."""

    def __init__(self, cache: Cache, vocab: SiteVocab):
        st = cache.manifest.settings
        self.tokens = np.asarray(cache.tokens)
        self.vocab = vocab
        self.offsets = np.arange(-st.window_before, st.window_after + 1)

    def __call__(self, seq: np.ndarray, pos: np.ndarray) -> np.ndarray:
        N, T = self.tokens.shape
        idx = pos[..., None] + self.offsets
        ok = (idx >= 0) & (idx < T) & (seq[..., None] >= 0) & (seq[..., None] < N)
        t = self.tokens[np.clip(seq, 0, max(N - 1, 0))[..., None], np.clip(idx, 0, max(T - 1, 0))]
        return self.vocab.to_site(np.where(ok, t, -1))


def _histogram_obj(counts: np.ndarray) -> list:
    nz = np.flatnonzero(counts)
    if not len(nz):
        return [0, []]
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    return [lo, [int(c) for c in counts[lo:hi]]]


def _float_or_none(x: float):
    return None if not np.isfinite(x) else float(x)


def iter_features(cache: Cache, vocab: SiteVocab, start: int = 0, stop: int | None = None,
                  block: int = 256) -> Iterator[tuple[FeatureFacts, FeaturePayload, np.ndarray, np.ndarray]]:
    """Yield ``(facts, payload, centre_tokens, centre_weights)`` for features ``start..stop``.

    ``centre_tokens`` are the site ids of the top examples' max tokens and ``centre_weights`` their
    activation relative to the feature's max (what the token search ranks by).
    """
    m = cache.manifest
    st = m.settings
    F = m.n_features
    stop = F if stop is None else min(stop, F)
    fs, ex, lg = cache.features, cache.examples, cache.logits
    gather = WindowTokens(cache, vocab)
    kind = vocab.id_kind
    wb = st.window_before
    shift = vocab.shard_bits
    S = len(m.sources)
    two = S == 2
    for a in range(start, stop, block):
        b = min(stop, a + block)
        mx = np.asarray(fs.max_act[a:b], dtype=np.float32)
        # top examples
        t_seq, t_pos = np.asarray(ex.top_seq[a:b]), np.asarray(ex.top_pos[a:b])
        t_valid = t_seq >= 0
        t_tok = gather(t_seq, t_pos)
        t_q = quantise(ex.top_window[a:b], mx)
        t_act = np.asarray(ex.top_act[a:b], dtype=np.float32)
        # interval samples
        i_seq, i_pos = np.asarray(ex.iv_seq[a:b]), np.asarray(ex.iv_pos[a:b])
        i_valid = i_seq >= 0
        i_tok = gather(i_seq, i_pos)
        i_q = quantise(ex.iv_window[a:b], mx)
        i_act = np.asarray(ex.iv_act[a:b], dtype=np.float16)
        i_count = i_valid.sum(axis=2).astype(np.uint8)
        i_width = np.asarray(ex.iv_width[a:b], dtype=np.float32)
        # logits
        l_top = vocab.to_site(np.asarray(lg.top_ids[a:b]))
        l_bot = vocab.to_site(np.asarray(lg.bot_ids[a:b]))
        l_tv = np.asarray(lg.top_vals[a:b], dtype=np.float32)
        l_bv = np.asarray(lg.bot_vals[a:b], dtype=np.float32)
        l_h = np.asarray(lg.hist_counts[a:b])
        l_lo = np.asarray(lg.hist_lo[a:b], dtype=np.float32)
        l_hi = np.asarray(lg.hist_hi[a:b], dtype=np.float32)
        # scalars
        hist = np.asarray(fs.hist_counts[a:b])
        dn = np.asarray(fs.dec_norm[a:b], dtype=np.float32)
        rel = np.asarray(fs.rel_norm[a:b], dtype=np.float32)
        cos = np.asarray(fs.dec_cos[a:b], dtype=np.float32)
        dens = np.asarray(fs.density[a:b], dtype=np.float64)
        nact = np.asarray(fs.n_active[a:b])
        mean = np.asarray(fs.mean_act[a:b], dtype=np.float32)
        centre = t_tok[:, :, wb]
        weight = np.where(mx[:, None] > 0, t_act / np.maximum(mx[:, None], 1e-30), 0.0)

        for j in range(b - a):
            i = a + j
            tv = t_valid[j]
            iv = i_valid[j]
            tt, it = t_tok[j][tv], i_tok[j][iv]
            ct, cw = centre[j][tv], weight[j][tv]
            if len(ct):
                u, inv = np.unique(ct, return_inverse=True)
                score = np.bincount(inv, weights=cw)
                order = np.lexsort((u, -score))[:N_TOP_TOKENS]
                top_tokens = [int(x) for x in u[order] if x > 0]
            else:
                top_tokens = []
            ids_used = np.concatenate([tt.ravel(), it.ravel(), l_top[j].ravel(), l_bot[j].ravel()])
            shards = np.unique(ids_used[ids_used > 0] >> shift)
            logit_objs = [
                {
                    "ti": pack(l_top[j, s], kind), "tv": pack(l_tv[j, s], "f4"),
                    "bi": pack(l_bot[j, s], kind), "bv": pack(l_bv[j, s], "f4"),
                    "h": [int(c) for c in l_h[j, s]], "lo": float(l_lo[j, s]), "hi": float(l_hi[j, s]),
                }
                for s in range(S)
            ]
            dnj = [float(x) for x in dn[j]]
            relj = _float_or_none(rel[j]) if two else None
            cosj = _float_or_none(cos[j]) if two else None
            obj = {
                "id": m.feature_offset + i,
                "max": float(mx[j]),
                "dn": dnj,
                "rel": relj,
                "cos": cosj,
                "tt": pack(tt, kind),
                "ta": t_q[j][tv].tobytes(),
                "tv": pack(t_act[j][tv], "f4"),
                "ig": i_count[j].tobytes(),
                "iw": float(i_width[j]),
                "it": pack(it, kind),
                "ia": i_q[j][iv].tobytes(),
                "iv": pack(i_act[j][iv], "f2"),
                "h": _histogram_obj(hist[j]),
                "lg": logit_objs,
                "vs": [int(x) for x in shards],
            }
            facts = FeatureFacts(
                id=m.feature_offset + i, index=i, density=float(dens[j]), n_active=int(nact[j]),
                max_act=float(mx[j]), mean_act=float(mean[j]),
                rel_norm=float(rel[j]) if two else float("nan"),
                dec_cos=float(cos[j]) if two else float("nan"),
                dec_norm=dnj, peak=int(np.argmax(dn[j])) if S else 0, n_top=int(tv.sum()),
                top_tokens=top_tokens,
            )
            yield facts, FeaturePayload(obj), ct, cw
