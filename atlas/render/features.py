"""Per-feature data: the facts a page shows as HTML and the payload its panels are drawn from.

Features are processed in blocks (vectorised numpy over the block, then a short loop per feature), so
that 100k features render in well under a minute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ..cache import Cache, special_share
from .vocab import SiteVocab

N_TOP_TOKENS = 3

DIFF_NONE, DIFF_A_ONLY, DIFF_SHARED, DIFF_B_ONLY = -1, 0, 1, 2
DIFF_NAMES = {DIFF_A_ONLY: "model-A-only", DIFF_SHARED: "shared", DIFF_B_ONLY: "model-B-only"}


def diff_thresholds(cache: Cache) -> tuple[float, float]:
    """``(lo, hi)``: the relative norms below which a feature is model-A-only and above which it is
    model-B-only (the analysis settings ``diff_shared_lo`` / ``diff_shared_hi``; 0.3 / 0.7 by default and
    for caches written before they existed)."""
    st = cache.manifest.settings
    return float(st.diff_shared_lo), float(st.diff_shared_hi)


def diff_classes_of(cache: Cache, a: int, b: int) -> np.ndarray:
    """Model-diff class (int8, ``DIFF_*``) of the features with cache indices ``a..b``: the cache's
    ``diff_class`` when it has one, else computed from ``rel_norm`` with :func:`diff_thresholds` exactly as
    the analysis does (float32 comparisons); -1 for every feature unless S = 2. The page badges, the index
    filter and the overview counts all use this one value."""
    fs = cache.features
    n = b - a
    if len(cache.manifest.sources) != 2:
        return np.full(n, DIFF_NONE, np.int8)
    if fs.diff_class is not None:
        return np.asarray(fs.diff_class[a:b]).astype(np.int8)
    lo, hi = diff_thresholds(cache)
    r = np.asarray(fs.rel_norm[a:b], dtype=np.float32)
    out = np.full(n, DIFF_NONE, np.int8)
    out[r < np.float32(lo)] = DIFF_A_ONLY
    out[(r >= np.float32(lo)) & (r <= np.float32(hi))] = DIFF_SHARED
    out[r > np.float32(hi)] = DIFF_B_ONLY
    return out


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
    diff_class: int = DIFF_NONE  # DIFF_*: model-diff class (S = 2), see diff_classes_of
    # latent scaling (S = 2 caches that have it, else NaN / None): ν^ε, ν^r and the β fits [m][t]
    nu_err: float = float("nan")
    nu_rec: float = float("nan")
    beta_err: list | None = None
    beta_rec: list | None = None
    # named corpora (Manifest.corpora, in order; empty without them): density and max on each corpus
    corpus_density: list[float] = field(default_factory=list)
    corpus_max: list[float] = field(default_factory=list)
    special_share: float = float("nan")  # share of activations on special tokens (cache.special_share); NaN: none

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
    - ``dc`` (int): model-diff class, -1 none (S ≠ 2), 0 model-A-only, 1 shared, 2 model-B-only
      (:func:`diff_classes_of`; the thresholds are ``meta.rel_thresholds``)
    - ``na`` (int): active tokens (the page hides correlations below ``meta.min_active``)
    - ``tp``: bin uint32 LE the token position in its sequence of each top example's max token;
      ``ip``: the same for the interval examples (position 0 is the sequence's first token)

    Optional keys, present only when the cache has the statistic (see ``atlas.cache``); entries the
    cache marks as missing (-1 / NaN) are dropped, so the arrays can be shorter than the settings say:

    - ``xs``, ``xd``, ``xv``: correlated neurons, strongest |r| first: bin uint16 LE source index,
      bin uint32 LE dimension, bin float16 LE Pearson correlation
    - ``fi``, ``fv``: correlated features, highest first: bin uint32 LE ids and bin float16 LE Pearson
      correlations (an id outside this site is shown without a link); ``fl``: their labels when the site
      has labels (as ``nl`` for ``nb``)
    - ``as``, ``ad``, ``av``, ``af``: neuron alignment, largest |entry| first: bin uint16 LE source,
      bin uint32 LE dimension, bin float32 LE signed decoder entry ``W_dec[f, s, i]``, bin float16 LE
      its share of the decoder's L1 norm
    - ``lg[s].m`` (float): the mean effect over the vocabulary subtracted from every value of ``lg[s]``
      (centred logit effects, ``LogitEffects.mean``); ``lg[s].o`` (float or null; absent for 0): the part of the
      decoder's squared norm via source s in the outlier dimensions (``meta.outlier_dims``), which every
      value of ``lg`` and ``ld`` leaves out (``LogitEffects.outlier_share``)
    - ``ld``: ``{ti, tv, bi, bv}`` the B−A table (S = 2): tokens whose centred effect grows most / shrinks
      most from source A's decoder to source B's, ids and bin float32 LE differences
    - ``tn``: bin float16 LE next-token logit contributions of the top examples' tokens, only at the
      window positions whose ``ta`` is nonzero (elsewhere the activation, and so the contribution, is
      0), example by example, position by position, one value per source (``count(ta > 0) × S``);
      ``in``: the same for the interval examples (against ``ia``)
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


def latent_scaling_of(cache: Cache, a: int, b: int) -> dict[str, list]:
    """``FeatureFacts`` latent-scaling fields of features ``a..b`` (``{}`` when the cache has none)."""
    fs = cache.features
    if fs.ls_nu_err is None or fs.ls_nu_rec is None or len(cache.manifest.sources) != 2:
        return {}
    out = {"nu_err": np.asarray(fs.ls_nu_err[a:b], dtype=np.float32).tolist(),
           "nu_rec": np.asarray(fs.ls_nu_rec[a:b], dtype=np.float32).tolist()}
    if fs.ls_beta_err is not None and fs.ls_beta_rec is not None:
        out["beta_err"] = np.asarray(fs.ls_beta_err[a:b], dtype=np.float32).tolist()
        out["beta_rec"] = np.asarray(fs.ls_beta_rec[a:b], dtype=np.float32).tolist()
    return out


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
    dcls = diff_classes_of(cache, a, b).tolist()
    c_dens, c_max = corpus_columns(cache, a, b)
    sp_share = (special_share(fs.n_active[a:b], fs.special_n_active[a:b], m.settings.exclude_special).tolist()
                if fs.special_n_active is not None else [float("nan")] * n)
    nan = float("nan")
    ls = latent_scaling_of(cache, a, b)
    facts = [
        FeatureFacts(
            id=first_id + a + j, index=a + j, density=dens[j], n_active=int(nact[j]), max_act=mxl[j],
            mean_act=mean[j], rel_norm=rel[j] if two else nan, dec_cos=cos[j] if two else nan,
            dec_norm=dn_list[j], peak=int(peak[j]), n_top=int(n_top[j]), top_tokens=tops[j],
            diff_class=int(dcls[j]), corpus_density=c_dens[j], corpus_max=c_max[j], special_share=sp_share[j],
            **{k: v[j] for k, v in ls.items()},
        )
        for j in range(n)
    ]
    sel = t_valid & (centre > 0)
    feat = (first_id + a + _row_index(centre.shape))[sel].astype(np.int64)
    return FactsBlock(facts, feat, centre[sel].astype(np.int64), weight[sel].astype(np.float64))


def corpus_names(cache: Cache) -> list[str]:
    """Names of the cache's named corpora that have per-corpus statistics (empty otherwise)."""
    fs = cache.features
    if fs.corpus_n_active is None or fs.corpus_max_act is None:
        return []
    return [str(c["name"]) for c in cache.manifest.corpora]


def corpus_meta(cache: Cache) -> dict:
    """The ``data/meta.js`` keys of the corpora, only where the cache has them: ``corpora`` (``[{name,
    n_sequences, n_tokens}]``, the named corpora in order) and ``has_special`` (true: the index has a
    special-token share column)."""
    out: dict = {}
    if corpus_names(cache):
        out["corpora"] = [{"name": str(c["name"]), "n_sequences": int(c.get("n_sequences", 0)),
                           "n_tokens": int(c.get("n_tokens", 0))} for c in cache.manifest.corpora]
    if cache.features.special_n_active is not None:
        out["has_special"] = True
    return out


def corpus_columns(cache: Cache, a: int, b: int) -> tuple[list[list[float]], list[list[float]]]:
    """Per feature with cache index in ``a..b``: its density on each named corpus (active count over that
    corpus's counted tokens) and its max there; empty lists when the cache has no named corpora."""
    fs, corpora = cache.features, cache.manifest.corpora
    if not corpus_names(cache):
        return [[] for _ in range(b - a)], [[] for _ in range(b - a)]
    n_tok = np.array([max(int(c.get("n_tokens", 0)), 1) for c in corpora], dtype=np.float64)
    dens = np.asarray(fs.corpus_n_active[a:b], dtype=np.float64) / n_tok
    return dens.tolist(), np.asarray(fs.corpus_max_act[a:b], dtype=np.float32).tolist()


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
        l_mean = np.asarray(lg.mean[a:b], dtype=np.float32).tolist() if lg.mean is not None else None
        l_out = None
        if lg.outlier_share is not None:
            l_out = [[_float_or_none(v) for v in row] for row in np.asarray(lg.outlier_share[a:b], np.float32)]
        has_ld = two and lg.diff_top_ids is not None and lg.diff_bot_ids is not None
        if has_ld:
            d_top = vocab.to_site(np.asarray(lg.diff_top_ids[a:b]))
            d_bot = vocab.to_site(np.asarray(lg.diff_bot_ids[a:b]))
            d_tv = np.asarray(lg.diff_top_vals[a:b], dtype="<f4")
            d_bv = np.asarray(lg.diff_bot_vals[a:b], dtype="<f4")
        else:
            d_top = d_bot = np.zeros((n, 0), np.int64)
        t_pos_b = t_pos.astype("<u4")
        i_pos_b = i_pos.astype("<u4")
        # histogram and neighbours
        hist = np.asarray(fs.hist_counts[a:b])
        nb_ids = np.asarray(fs.neighbours[a:b]).astype(np.int64)
        nb_cos = np.asarray(fs.neighbour_cos[a:b], dtype=np.float32)
        nb_ok = (nb_ids >= 0) & (nb_ids != (first_id + np.arange(a, b))[:, None]) & np.isfinite(nb_cos)
        nb_ids_b = nb_ids.astype("<u4")
        nb_cos_b = nb_cos.astype("<f2")
        extra = _optional_block(cache, a, b, t_valid, t_q, i_valid, i_q)
        shards = shards_of_block(n, vocab.n_shards, vocab.shard_bits, [
            (t_tok, t_valid[..., None]), (i_tok, i_valid[..., None]), (l_top, True), (l_bot, True),
            (d_top, True), (d_bot, True)])
        t_tok = t_tok.astype(id_dtype, copy=False)
        i_tok = i_tok.astype(id_dtype, copy=False)
        l_top = l_top.astype(id_dtype, copy=False)
        l_bot = l_bot.astype(id_dtype, copy=False)
        d_top = d_top.astype(id_dtype, copy=False)
        d_bot = d_bot.astype(id_dtype, copy=False)

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
                "dc": f.diff_class,
                "na": f.n_active,
                "tp": t_pos_b[j][tv].tobytes(),
                "ip": i_pos_b[j][iv].tobytes(),
            }
            if l_mean is not None:
                for s in range(S):
                    obj["lg"][s]["m"] = l_mean[j][s]
            if l_out is not None:
                for s in range(S):
                    if l_out[j][s] != 0:  # 0 (nothing left out) is not written
                        obj["lg"][s]["o"] = l_out[j][s]
            if has_ld:
                obj["ld"] = {"ti": d_top[j].tobytes(), "tv": d_tv[j].tobytes(), "bi": d_bot[j].tobytes(),
                             "bv": d_bv[j].tobytes()}
            for key, rows in extra.items():
                obj[key] = rows[j]
            yield f, FeaturePayload(obj)


def _valid_rows(valid: np.ndarray, arrays: list[tuple[np.ndarray, str]]) -> list[list[bytes]]:
    """Per row of ``valid[n, k]``: each of ``arrays`` (``[n, k]`` with its little-endian dtype) packed
    over the valid entries."""
    packed = [np.ascontiguousarray(arr, dtype=dt) for arr, dt in arrays]
    return [[arr[j][valid[j]].tobytes() for arr in packed] for j in range(valid.shape[0])]


def _next_logit_rows(nl, valid: np.ndarray, q: np.ndarray, a: int, b: int) -> list[bytes]:
    """Per feature: the float16 next-token logit contributions ``nl[f, ..., W, S]`` of its valid examples
    at the window positions where the quantised activation ``q`` is nonzero (see ``FeaturePayload``)."""
    vals = np.asarray(nl[a:b], dtype="<f2")
    keep = (q > 0) & valid[..., None]
    return [vals[j][keep[j]].tobytes() for j in range(b - a)]


def _optional_block(cache: Cache, a: int, b: int, t_valid, t_q, i_valid, i_q) -> dict[str, list]:
    """The optional payload keys of features ``a..b``: ``{key: [value per feature]}``."""
    fs, ex = cache.features, cache.examples
    out: dict[str, list] = {}
    if fs.ncorr_val is not None and fs.ncorr_source is not None and fs.ncorr_dim is not None:
        src, dim = np.asarray(fs.ncorr_source[a:b]), np.asarray(fs.ncorr_dim[a:b])
        val = np.asarray(fs.ncorr_val[a:b], dtype=np.float32)
        ok = (src >= 0) & (dim >= 0) & np.isfinite(val)
        rows = _valid_rows(ok, [(src, "<u2"), (dim, "<u4"), (val, "<f2")])
        out["xs"], out["xd"], out["xv"] = ([r[k] for r in rows] for k in range(3))
    if fs.fcorr_ids is not None and fs.fcorr_val is not None:
        ids = np.asarray(fs.fcorr_ids[a:b]).astype(np.int64)
        val = np.asarray(fs.fcorr_val[a:b], dtype=np.float32)
        self_ids = cache.manifest.feature_offset + np.arange(a, b)[:, None]
        ok = (ids >= 0) & (ids != self_ids) & np.isfinite(val)
        rows = _valid_rows(ok, [(ids, "<u4"), (val, "<f2")])
        out["fi"], out["fv"] = ([r[k] for r in rows] for k in range(2))
    if all(x is not None for x in (fs.align_source, fs.align_dim, fs.align_val, fs.align_l1_frac)):
        src, dim = np.asarray(fs.align_source[a:b]), np.asarray(fs.align_dim[a:b])
        val = np.asarray(fs.align_val[a:b], dtype=np.float32)
        frac = np.asarray(fs.align_l1_frac[a:b], dtype=np.float32)
        ok = (src >= 0) & (dim >= 0) & np.isfinite(val)
        rows = _valid_rows(ok, [(src, "<u2"), (dim, "<u4"), (val, "<f4"), (frac, "<f2")])
        out["as"], out["ad"], out["av"], out["af"] = ([r[k] for r in rows] for k in range(4))
    if ex.top_next_logit is not None:
        out["tn"] = _next_logit_rows(ex.top_next_logit, t_valid, t_q, a, b)
    if ex.iv_next_logit is not None:
        out["in"] = _next_logit_rows(ex.iv_next_logit, i_valid, i_q, a, b)
    return out
