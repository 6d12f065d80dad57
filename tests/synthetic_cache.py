"""Deterministic synthetic analysis caches (numpy only) for the render stage's tests and benchmarks.

:func:`make_synthetic_cache` builds an :class:`atlas.cache.Cache` with the shapes and value ranges the
analysis writes, for any number of features and sources, without torch or a model:

- a vocabulary of ``vocab_size`` display strings: pseudo-words with and without a leading space,
  punctuation, newline/tab/whitespace tokens, non-ASCII and emoji tokens, control characters, and (with
  ``hostile_text=True``) HTML/JS payloads such as ``<script>`` and ``<img onerror>``;
- a corpus ``tokens[N, T]`` drawn from a Zipf distribution (frequent tokens have low ids, as in BPE
  vocabularies), sequences starting with a BOS token (id 0);
- per-feature statistics: log-uniform densities with some dead features (density 0, no examples),
  log-normal max activations, log-binned histograms consistent with ``n_active``;
- top examples (at most one per sequence, highest first, ``-1`` slots when a feature has fewer) and
  ``2 * n_intervals`` interval slots (only those below the feature's max filled, the top ones sparsely)
  with sparse activation windows whose centre is the example's activation;
- decoder norms: for S = 2 a trimodal relative norm (model-A-only, shared, model-B-only) and cosines
  near 1 for shared features; for S > 2 a peak layer per feature;
- nearest neighbours by (synthetic) decoder cosine and logit effects per source;
- with ``optional_stats=True`` (the default) the optional fields a current analysis writes: the
  model-diff class (S = 2), neuron alignment (largest decoder entries with their L1 shares), correlated
  neurons and correlated features (among the neighbours), and the next-token logit contribution of every
  window token (``top_next_logit``, and ``iv_next_logit`` when ``next_token_effects == "all"``), equal
  to the window activation times a fixed pseudo-random effect of (feature, source, next token) and 0
  where the activation is 0 or no next token exists. ``optional_stats=False`` gives a cache as an
  older atlas wrote it.
- with ``latent_scaling=True`` (S = 2): latent scaling ratios ``ls_nu_err``/``ls_nu_rec``, finite for
  alive features outside the shared class (spread over ``[0, 1.4]``, a few beyond) and NaN elsewhere,
  drawn from a third generator.
  older atlas wrote it. Also the subtracted mean logit effect, the B−A table (S = 2) and the special
  token ids (the BOS token, id 0).

The same arguments always give the same arrays (``numpy.random.Generator`` seeded from ``seed``; the
optional fields draw from a second generator, so the other arrays do not depend on ``optional_stats``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from atlas.cache import Cache, Examples, FeatureStats, LogitEffects, Manifest, Settings, SourceInfo, write_cache

HOSTILE_TOKENS = (
    "<script>window.__atlas_xss=1</script>",
    '<img src=x onerror="window.__atlas_xss=2">',
    "\"'><svg onload=window.__atlas_xss=3>",
    "&amp;&lt;b&gt;",
)

_SPECIAL_TOKENS = ("<|endoftext|>", "\n", "\n\n", "\t", " ", "  ", "\r\n", "\x00", "\u200b", " 🙂", "é", " naïve",
                   " 東京", " Ω", "\ufffd")
_SYLLABLES = ("ka", "ri", "to", "an", "el", "mo", "su", "ne", "the", "ing", "er", "ou", "st", "pl", "qu", "ax",
              "or", "is", "at", "en", "un", "re", "co", "li", "ve", "da", "mi", "on", "ex", "ze")
_PUNCT = (".", ",", ";", ":", "!", "?", "(", ")", "-", "'", '"', "/", "[", "]", "{", "}", "=", "+", "*", "%",
          "$", "#", "@", "&", "<", ">")

N_LOGIT_BINS = 32
D_MODEL = 64


def make_vocab(vocab_size: int, rng: np.random.Generator, hostile_text: bool = False) -> list[str]:
    """``vocab_size`` token display strings; id 0 is the BOS token ``<|endoftext|>``."""
    vocab: list[str] = list(_SPECIAL_TOKENS)
    vocab.extend(_PUNCT)
    seen = set(vocab)
    n_syl = len(_SYLLABLES)
    while len(vocab) < vocab_size:
        n = int(rng.integers(1, 4))
        word = "".join(_SYLLABLES[int(i)] for i in rng.integers(0, n_syl, n))
        r = rng.random()
        if r < 0.55:
            word = " " + word
        elif r < 0.65:
            word = " " + word.capitalize()
        elif r < 0.7:
            word = word.upper()
        if word in seen:
            word = f"{word}{len(vocab)}"
        seen.add(word)
        vocab.append(word)
    vocab = vocab[:vocab_size]
    # spread the special and punctuation tokens over the ids (id 0 stays the BOS token)
    rest = vocab[1:]
    perm = rng.permutation(len(rest))
    vocab = vocab[:1] + [rest[i] for i in perm]
    if hostile_text:  # rare ids at the end of the vocabulary
        vocab[-len(HOSTILE_TOKENS):] = HOSTILE_TOKENS
    return vocab


def hostile_ids(vocab_size: int) -> list[int]:
    """Token ids of :data:`HOSTILE_TOKENS` in a vocabulary made with ``hostile_text=True``."""
    return list(range(vocab_size - len(HOSTILE_TOKENS), vocab_size))


def _zipf_ids(rng: np.random.Generator, n: int, vocab_size: int) -> np.ndarray:
    """``n`` token ids with a Zipf(1.1)-like rank distribution over ids 1..vocab_size-1."""
    ranks = np.arange(1, vocab_size, dtype=np.float64)
    p = ranks ** -1.1
    p /= p.sum()
    return (rng.choice(vocab_size - 1, size=n, p=p) + 1).astype(np.int32)


def _sparse_windows(rng, centre: np.ndarray, wb: int, wa: int, block: int = 4096) -> np.ndarray:
    """Activation windows ``[..., W]`` (float16): ``centre`` at position ``wb``, a few smaller values around.

    Built ``block`` features at a time so that 100k features stay within a few hundred MB.
    """
    w = wb + 1 + wa
    out = np.zeros(centre.shape + (w,), dtype=np.float16)
    for a in range(0, centre.shape[0], block):
        c = centre[a:a + block]
        win = np.zeros(c.shape + (w,), dtype=np.float32)
        # about 3 other active positions per window, below the centre value
        others = (rng.random(c.shape + (w,), dtype=np.float32) < (3.0 / w)) & (c > 0)[..., None]
        vals = rng.random(c.shape + (w,), dtype=np.float32) * c[..., None] * 0.9
        win[others] = vals[others]
        win[..., wb] = c
        out[a:a + block] = win
    return out


def make_synthetic_cache(
    n_features: int = 40,
    *,
    n_sources: int = 2,
    vocab_size: int = 500,
    n_sequences: int = 64,
    seq_len: int = 64,
    settings: Settings | None = None,
    seed: int = 0,
    feature_offset: int = 0,
    hostile_text: bool = False,
    title: str = "Synthetic crosscoder",
    dead_fraction: float = 0.05,
    optional_stats: bool = True,
    next_token_effects: str | None = None,
    corpora: tuple[str, ...] | None = None,
    latent_scaling: bool = False,
) -> Cache:
    """Build a complete synthetic :class:`~atlas.cache.Cache` (see the module docstring).

    Feature 0 (if ``n_features`` > 1) is always alive with a full set of top examples and, with
    ``hostile_text``, its top example contains the HTML/JS payload tokens (nowhere else in the corpus); feature 1 (if
    ``n_features`` > 2 and ``dead_fraction`` > 0) is always dead. ``next_token_effects`` overrides
    ``settings.next_token_effects`` ("top", "all" or "none"). ``corpora`` (names) adds named corpora: the
    sequences split among them in nearly equal consecutive parts (``corpus_ids``), each feature's active
    tokens split among them at random (``corpus_n_active`` sums to ``n_active``; ``corpus_max_act`` reaches
    ``max_act`` on the corpus with the most), and ``special_n_active`` (at most ``n_active``), all drawn from
    a third generator.
    """
    rng = np.random.default_rng(seed)
    st = settings or Settings(seq_len=seq_len, n_sequences=n_sequences)
    st.seq_len, st.n_sequences = seq_len, n_sequences
    if next_token_effects is not None:
        st.next_token_effects = next_token_effects
    F, S, K = n_features, n_sources, st.top_k
    G, k = 2 * st.n_intervals, st.interval_k
    wb, wa = st.window_before, st.window_after

    vocab = make_vocab(vocab_size, rng, hostile_text)
    n_plain = vocab_size - (len(HOSTILE_TOKENS) if hostile_text else 0)
    tokens = _zipf_ids(rng, n_sequences * seq_len, n_plain).reshape(n_sequences, seq_len)
    tokens[:, 0] = 0  # BOS
    n_tokens = n_sequences * (seq_len - 1)

    # --- scalars
    density = 10 ** rng.uniform(-4.5, -0.7, F)
    dead = rng.random(F) < dead_fraction
    if F > 1:
        dead[0] = False
        density[0] = max(density[0], 0.02)
    if F > 2 and dead_fraction > 0:
        dead[1] = True
    density[dead] = 0.0
    n_active = np.round(density * n_tokens).astype(np.int64)
    n_active[~dead] = np.maximum(n_active[~dead], 1)
    density = n_active / n_tokens
    max_act = np.where(dead, 0.0, rng.lognormal(1.0, 0.6, F)).astype(np.float32)
    mean_act = np.where(dead, 0.0, max_act * rng.uniform(0.15, 0.45, F)).astype(np.float32)

    # --- activation histogram consistent with n_active (log-normal around the mean)
    edges = st.hist_edges()
    centres = np.sqrt(edges[:-1] * edges[1:])
    B = st.hist_bins
    hist = np.zeros((F, B), dtype=np.int64)
    for f in np.flatnonzero(~dead):
        logc = np.log(centres)
        w = np.exp(-0.5 * ((logc - np.log(mean_act[f])) / 0.8) ** 2)
        w[centres > max_act[f]] = 0
        if w.sum() == 0:
            w[np.searchsorted(edges, max_act[f]) - 1] = 1
        hist[f] = rng.multinomial(int(n_active[f]), w / w.sum())

    # --- top examples
    n_top = np.where(dead, 0, np.minimum(min(K, n_sequences), np.maximum(n_active, 1))).astype(np.int64)
    top_seq = np.full((F, K), -1, np.int32)
    top_pos = np.full((F, K), -1, np.int32)
    top_act = np.zeros((F, K), np.float32)
    # distinct sequences per feature: one from each of K equal strides of the corpus, rotated
    kk = min(K, n_sequences)
    stride = n_sequences // kk
    seq_choice = np.zeros((F, K), np.int32)
    seq_choice[:, :kk] = (rng.integers(0, n_sequences, (F, 1)) + np.arange(kk)[None, :] * stride
                          + rng.integers(0, stride, (F, kk))) % n_sequences
    pos_choice = rng.integers(1, seq_len, (F, K)).astype(np.int32)
    decay = np.sort(rng.uniform(0.3, 1.0, (F, K)), axis=1)[:, ::-1]
    decay[:, 0] = 1.0
    slot = np.arange(K)[None, :] < n_top[:, None]
    top_seq[slot] = seq_choice[slot]
    top_pos[slot] = pos_choice[slot]
    top_act[slot] = (decay * max_act[:, None])[slot]
    top_window = _sparse_windows(rng, top_act, wb, wa)

    # --- interval samples: 2 * n_intervals slots; width from a running max estimate
    iv_width = np.where(dead, 0.0, max_act / st.n_intervals * rng.uniform(0.55, 1.0, F)).astype(np.float32)
    g = np.arange(G)
    lo = g[None, :] * iv_width[:, None]
    in_range = (lo < max_act[:, None]) & ~dead[:, None]
    # fewer samples in the upper intervals
    counts = np.minimum(k, rng.poisson(k * 3.0 * 0.75 ** g[None, :], (F, G)))
    counts = np.where(in_range, np.maximum(counts, (g[None, :] == 0).astype(int)), 0)
    counts = np.minimum(counts, np.maximum(n_active[:, None] - (np.cumsum(counts, axis=1) - counts), 0))
    iv_slot = np.arange(k)[None, None, :] < counts[:, :, None]
    iv_seq = np.where(iv_slot, rng.integers(0, n_sequences, (F, G, k)), -1).astype(np.int32)
    iv_pos = np.where(iv_slot, rng.integers(1, seq_len, (F, G, k)), -1).astype(np.int32)
    hi = np.minimum(lo + iv_width[:, None], max_act[:, None])
    frac = rng.uniform(0.02, 1.0, (F, G, k))
    iv_act = np.where(iv_slot, lo[:, :, None] + frac * (hi - lo)[:, :, None], 0).astype(np.float32)
    iv_window = _sparse_windows(rng, iv_act, wb, wa)

    if hostile_text and F > 0 and n_top[0] > 0:
        s, p = int(top_seq[0, 0]), int(top_pos[0, 0])
        for j, tid in enumerate(hostile_ids(vocab_size)):
            q = p - 1 - j
            if q >= 1:
                tokens[s, q] = tid

    # --- decoder geometry
    if S == 2:
        kind = rng.choice(3, F, p=[0.15, 0.7, 0.15])
        rel = np.where(kind == 0, rng.uniform(0.0, 0.2, F),
                       np.where(kind == 2, rng.uniform(0.8, 1.0, F), rng.normal(0.5, 0.08, F)))
        rel = np.clip(rel, 0.0, 1.0)
        total = rng.uniform(0.5, 1.5, F)
        dec_norm = np.stack([total * (1 - rel), total * rel], axis=1).astype(np.float32)
        cos = np.where(kind == 1, 1 - rng.exponential(0.08, F), rng.uniform(-0.3, 0.6, F))
        dec_cos = np.clip(cos, -1, 1).astype(np.float32)
        rel_norm = (dec_norm[:, 1] / (dec_norm[:, 0] + dec_norm[:, 1])).astype(np.float32)
    else:
        peak = rng.integers(0, S, F)
        d = np.abs(np.arange(S)[None, :] - peak[:, None])
        dec_norm = (rng.uniform(0.5, 1.5, F)[:, None] * np.exp(-d / 1.5)).astype(np.float32)
        rel_norm = np.full(F, np.nan, np.float32)
        dec_cos = np.full(F, np.nan, np.float32)

    n_nb = min(st.n_neighbours, max(F - 1, 0))
    neighbours = np.zeros((F, n_nb), np.int32)
    if n_nb:
        step = max(1, (F - 1) // n_nb)
        offs = 1 + (rng.integers(0, F - 1, (F, 1)) + np.arange(n_nb)[None, :] * step) % (F - 1)
        neighbours = ((np.arange(F)[:, None] + offs) % F + feature_offset).astype(np.int32)
    neighbour_cos = np.sort(rng.uniform(0.05, 0.95, (F, n_nb)), axis=1)[:, ::-1].astype(np.float32)

    # --- logit effects
    L = st.logit_k
    top_ids = rng.integers(0, vocab_size, (F, S, L)).astype(np.int32)
    bot_ids = rng.integers(0, vocab_size, (F, S, L)).astype(np.int32)
    top_vals = np.sort(rng.uniform(0.05, 1.0, (F, S, L)), axis=2)[:, :, ::-1].astype(np.float32)
    bot_vals = np.sort(rng.uniform(-1.0, -0.05, (F, S, L)), axis=2).astype(np.float32)
    hist_lo = bot_vals[:, :, 0].copy()
    hist_hi = top_vals[:, :, 0].copy()
    x = np.linspace(-3, 3, N_LOGIT_BINS)
    bell = np.exp(-0.5 * x**2)
    scale = rng.uniform(0.5, 1.0, (F, S, 1)) * vocab_size / bell.sum()
    lg_hist = np.maximum(np.round(bell[None, None, :] * scale), 0).astype(np.int64)

    features = FeatureStats(
        density=density.astype(np.float32), max_act=max_act, mean_act=mean_act, n_active=n_active,
        hist_counts=hist, dec_norm=dec_norm, rel_norm=rel_norm, dec_cos=dec_cos,
        neighbours=neighbours, neighbour_cos=neighbour_cos,
    )
    examples = Examples(
        top_seq=top_seq, top_pos=top_pos, top_act=top_act, top_window=top_window,
        iv_seq=iv_seq, iv_pos=iv_pos, iv_act=iv_act, iv_window=iv_window, iv_width=iv_width,
    )
    if optional_stats:
        _add_optional_stats(np.random.default_rng([seed, 1]), st, features, examples, tokens, dead, D_MODEL,
                            feature_offset, latent_scaling=latent_scaling)
    if latent_scaling and S == 2:
        _add_latent_scaling(np.random.default_rng([seed, 2]), st, features, dead)

    corpus_list, corpus_ids = [], None
    if corpora:
        crng = np.random.default_rng([seed, 2])
        C = len(corpora)
        sizes = [n_sequences // C + (1 if c < n_sequences % C else 0) for c in range(C)]
        corpus_ids = np.repeat(np.arange(C, dtype=np.int16), sizes)
        corpus_list = [{"name": name, "path": f"{name}.jsonl", "n_sequences": int(k), "n_tokens": int(k * (seq_len - 1))}
                       for name, k in zip(corpora, sizes)]
        split = np.stack([crng.multinomial(int(n), crng.dirichlet(np.ones(C))) for n in n_active]).astype(np.int64)
        top = np.argmax(split, axis=1)
        cmax = (max_act[:, None] * crng.uniform(0.2, 0.9, (F, C))).astype(np.float32)
        cmax[np.arange(F), top] = max_act
        features.corpus_n_active = split
        features.corpus_max_act = np.where(split > 0, cmax, 0).astype(np.float32)
        features.special_n_active = np.floor(n_active * crng.uniform(0, 0.5, F)).astype(np.int64)

    sources = [SourceInfo(model=f"synthetic/model-{'AB'[s] if S == 2 else s}", site=(
        "blocks.6.hook_resid_post" if S <= 2 else f"blocks.{s}.hook_resid_post"), d_model=D_MODEL) for s in range(S)]
    manifest = Manifest(
        sources=sources,
        n_features=F,
        n_tokens=int(n_tokens),
        n_sequences=n_sequences,
        settings=st,
        checkpoint={"path": "synthetic.pt", "format": "synthetic", "activation": "relu"},
        dataset="synthetic corpus",
        title=title,
        feature_offset=feature_offset,
        corpora=corpus_list,
        complete=True,
        created="2026-01-01T00:00:00Z",
    )
    logits = LogitEffects(
        top_ids=top_ids, top_vals=top_vals, bot_ids=bot_ids, bot_vals=bot_vals,
        hist_counts=lg_hist, hist_lo=hist_lo, hist_hi=hist_hi,
    )
    if optional_stats:
        _add_centring(np.random.default_rng([seed, 2]), logits, vocab_size=len(vocab))
        manifest.special_ids = [0]  # the BOS token every sequence starts with
        # one flagged outlier dimension: the first correlated neuron of the first feature
        first = int(features.ncorr_source[0, 0])
        manifest.outlier_dims = [[int(features.ncorr_dim[0, 0])] if s == first else [] for s in range(S)]
        # the part of each decoder in it, left out of the logit tables (0 via the other sources)
        share = np.zeros((F, S), np.float32)
        share[:, first] = np.random.default_rng([seed, 3]).uniform(0.01, 0.6, F)
        logits.outlier_share = share
    return Cache(
        manifest=manifest,
        vocab=vocab,
        tokens=tokens,
        features=features,
        examples=examples,
        logits=logits,
        corpus_ids=corpus_ids,
    )


def _add_centring(rng, lg: LogitEffects, vocab_size: int) -> None:
    """The optional logit fields: the subtracted mean effect per feature and source, and for S = 2 a B−A
    table (distinct token ids, differences sorted as the analysis writes them)."""
    F, S, L = lg.top_ids.shape
    lg.mean = rng.normal(0, 0.05, (F, S)).astype(np.float32)
    if S != 2:
        return
    ids = np.stack([rng.choice(vocab_size, 2 * L, replace=False) for _ in range(F)]).astype(np.int32)
    vals = np.sort(rng.exponential(0.3, (F, 2 * L)), axis=1)[:, ::-1].astype(np.float32)
    lg.diff_top_ids, lg.diff_top_vals = ids[:, :L], vals[:, :L].copy()
    lg.diff_bot_ids, lg.diff_bot_vals = ids[:, L:], -vals[:, L:][:, ::-1].copy()


def _next_logits(seq, pos, window, tokens, f_ids, dec_norm, wb: int, block: int = 4096) -> np.ndarray:
    """``[..., W, S]`` float16: window activation × a fixed pseudo-random effect of (feature, source, next
    token), 0 for empty slots and where the window position or its successor is outside the sequence."""
    N, T = tokens.shape
    S = dec_norm.shape[1]
    W = window.shape[-1]
    out = np.zeros(window.shape + (S,), dtype=np.float16)
    offsets = np.arange(-wb, W - wb)
    for a in range(0, window.shape[0], block):
        b = min(window.shape[0], a + block)
        q, p = seq[a:b], pos[a:b]
        t = p[..., None] + offsets
        ok = (q[..., None] >= 0) & (t >= 0) & (t + 1 < T)
        nxt = tokens[np.clip(q, 0, N - 1)[..., None], np.clip(t + 1, 0, T - 1)].astype(np.int64)
        f = f_ids[a:b].reshape((-1,) + (1,) * (nxt.ndim - 1)).astype(np.int64)
        act = window[a:b].astype(np.float32)
        for s in range(S):
            h = (f * 2654435761 + nxt * 40503 + s * 977 + 12345) % 10007 / 10007.0  # uniform in [0, 1)
            effect = (2 * h - 1) ** 3 * 1.5 * dec_norm[a:b, s].reshape(f.shape)
            out[a:b, ..., s] = np.where(ok, act * effect, 0).astype(np.float16)
    return out


def _add_optional_stats(rng, st: Settings, fs: FeatureStats, ex: Examples, tokens: np.ndarray, dead: np.ndarray,
                        d_model: int, feature_offset: int, latent_scaling: bool = False) -> None:
    """Fill the optional fields of ``fs`` and ``ex`` (see the module docstring) in place."""
    F, S = fs.dec_norm.shape
    rel = fs.rel_norm
    # model-diff class from the relative norm, as atlas.stats.geometry.diff_classes
    dc = np.full(F, -1, np.int8)
    if S == 2:
        r = rel.astype(np.float32)
        dc[r < st.diff_shared_lo] = 0
        dc[(r >= st.diff_shared_lo) & (r <= st.diff_shared_hi)] = 1
        dc[r > st.diff_shared_hi] = 2
    fs.diff_class = dc
    # neuron alignment: A largest entries, sources weighted by the decoder norms, distinct dimensions
    A = st.n_align
    p_src = fs.dec_norm / np.maximum(fs.dec_norm.sum(axis=1, keepdims=True), 1e-30)
    u = rng.random((F, A))
    src = (u[..., None] > np.cumsum(p_src, axis=1)[:, None, :]).sum(axis=2).clip(0, S - 1).astype(np.int32)
    dim = np.argsort(rng.random((F, d_model)), axis=1)[:, :A].astype(np.int32)
    mag = np.sort(rng.uniform(0.02, 0.6, (F, A)), axis=1)[:, ::-1] * fs.dec_norm.max(axis=1, keepdims=True)
    sign = np.where(rng.random((F, A)) < 0.3, -1.0, 1.0)
    share = rng.uniform(0.08, 0.6, F)  # the A entries' share of the decoder's L1 norm
    l1 = mag.sum(axis=1) / share
    fs.align_source, fs.align_dim = src, dim
    fs.align_val = (sign * mag).astype(np.float32)
    fs.align_l1_frac = (mag / l1[:, None]).astype(np.float32)
    # correlated neurons: strongest |r| first; none for dead features
    M = st.n_corr_neurons
    ncs = rng.integers(0, S, (F, M)).astype(np.int32)
    ncd = rng.integers(0, d_model, (F, M)).astype(np.int32)
    ncv = (np.sort(rng.uniform(0.03, 0.8, (F, M)), axis=1)[:, ::-1]
           * np.where(rng.random((F, M)) < 0.35, -1.0, 1.0)).astype(np.float32)
    ncs[dead], ncd[dead], ncv[dead] = -1, -1, np.nan
    fs.ncorr_source, fs.ncorr_dim, fs.ncorr_val = ncs, ncd, ncv
    # correlated features: a subset of the neighbours (the candidates), highest correlation first
    C = st.n_corr_features
    nb = fs.neighbours
    ids = np.full((F, C), -1, np.int32)
    val = np.full((F, C), np.nan, np.float32)
    n_nb = nb.shape[1]
    if n_nb:
        order = np.argsort(rng.random((F, n_nb)), axis=1)
        m = min(C, n_nb)
        keep = rng.integers(max(m - 3, 0), m + 1, F)
        ok = (np.arange(m)[None, :] < keep[:, None]) & ~dead[:, None]
        cand = np.take_along_axis(nb, order[:, :m], axis=1)
        ok &= ~dead[np.clip(cand - feature_offset, 0, F - 1)]  # a dead candidate has no correlation
        v = np.sort(rng.uniform(-0.15, 0.9, (F, m)), axis=1)[:, ::-1]
        # the kept candidates first, highest correlation first
        rank = np.argsort(~ok, axis=1, kind="stable")
        ok_sorted = np.take_along_axis(ok, rank, axis=1)
        ids[:, :m] = np.where(ok_sorted, np.take_along_axis(cand, rank, axis=1), -1)
        val[:, :m] = np.where(ok_sorted, v, np.nan)
    fs.fcorr_ids, fs.fcorr_val = ids, val
    # next-token logit contributions of every window token
    if st.next_token_effects in ("top", "all"):
        f_ids = np.arange(F) + feature_offset
        wb = st.window_before
        ex.top_next_logit = _next_logits(ex.top_seq, ex.top_pos, ex.top_window, tokens, f_ids, fs.dec_norm, wb)
        if st.next_token_effects == "all":
            ex.iv_next_logit = _next_logits(ex.iv_seq, ex.iv_pos, ex.iv_window, tokens, f_ids, fs.dec_norm, wb)
    # latent scaling (two sources): β fits near 1 for the own model, smaller for the other as the decoder
    # leans to one side; ν = β(other)/β(own) along the own decoder; NaN for dead features
    if S == 2 and latent_scaling:
        st.latent_scaling = True
        own = fs.dec_norm.argmax(axis=1)
        beta = {}
        for name in ("err", "rec"):
            b = rng.uniform(0.6, 1.2, (F, 2, 2)).astype(np.float32)
            lean = np.abs(rel - 0.5)[:, None] * 2  # 0 shared … 1 one-sided
            other = rng.uniform(0.0, 1.0, F).astype(np.float32) * (1 - lean[:, 0]) + rng.uniform(0, 0.3, F) * lean[:, 0]
            b[np.arange(F), own, 1 - own] = other * b[np.arange(F), own, own]
            b[dead] = np.nan
            beta[name] = b
            nu = b[np.arange(F), own, 1 - own] / b[np.arange(F), own, own]
            setattr(fs, f"ls_nu_{name}", nu.astype(np.float32))
        fs.ls_beta_err, fs.ls_beta_rec = beta["err"], beta["rec"]


def _add_latent_scaling(rng, st: Settings, fs: FeatureStats, dead: np.ndarray) -> None:
    """Synthetic ``ls_nu_err``/``ls_nu_rec`` (S = 2): finite for alive features whose relative norm is
    outside the shared range, NaN elsewhere."""
    F = fs.rel_norm.shape[0]
    r = fs.rel_norm.astype(np.float32)
    specific = ~dead & ((r < np.float32(st.diff_shared_lo)) | (r > np.float32(st.diff_shared_hi)))
    ne = rng.uniform(0.0, 1.4, F) ** 1.5
    nr = rng.uniform(0.0, 1.4, F)
    ne[rng.random(F) < 0.05] = 4.0  # beyond the plot's range
    fs.ls_nu_err = np.where(specific, ne, np.nan).astype(np.float32)
    fs.ls_nu_rec = np.where(specific, nr, np.nan).astype(np.float32)


def write_synthetic_cache(folder: Path, **kwargs) -> Path:
    """Build a synthetic cache (arguments of :func:`make_synthetic_cache`) and write it to ``folder``."""
    write_cache(Path(folder), make_synthetic_cache(**kwargs))
    return Path(folder)
