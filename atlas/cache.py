"""The analysis cache: the one interface between ``atlas analyze`` and ``atlas render``.

Layout of a cache folder (``atlas-data/`` by default)::

    atlas-data/
      manifest.json   Manifest       written last; ``complete`` is true once every other file is final
      vocab.json      list[str]      token id → display string, for the models' shared tokenizer
      tokens.npy      int32[N, T]    the corpus sequences the examples point into
      features.npz    FeatureStats   per-feature scalars, histograms, decoder geometry, neighbours,
                                     neuron alignment, correlated neurons and features
      examples.npz    Examples       top activating examples and interval samples with their windows
                                     (and each window token's effect on the next token's logit)
      logits.npz      LogitEffects   top/bottom tokens of each feature's direct logit effect per source
      corpus_ids.npy  int16[N]       optional: per sequence of tokens.npy the index of its corpus in
                                     ``Manifest.corpora`` (written when the corpora are named)

Writers: :mod:`atlas.analyze`. Readers: :mod:`atlas.render` (which imports numpy, never torch) and the
tests. Every file is written to a temporary name and renamed into place, so a reader sees either the old
file or the new one. This module imports numpy only.

A window is the ``window_before`` tokens before an example's token, the token itself, and
``window_after`` tokens after it: ``W = window_before + 1 + window_after`` positions. Positions outside
the sequence hold token ``-1`` and activation ``0``.

Optional fields. Fields of ``FeatureStats`` and ``Examples`` that default to ``None`` were added after
the first release of the format: a cache written without them (an older atlas, or an analysis that
switched them off) reads back with ``None`` there, and a reader must treat ``None`` as "not computed".
Readers also ignore arrays they do not know, so a newer cache stays readable by this module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1


def atomic_write(path: Path, write) -> None:
    """Create ``path`` atomically: ``write(fh)`` fills a temporary file in the same folder (binary mode),
    which is flushed to disk and renamed into place; on any error the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda fh: np.savez(fh, **arrays))  # streamed to the file: no copy in memory


def _arrays_of(obj) -> dict[str, np.ndarray]:
    """The dataclass's arrays by field name; optional fields left at ``None`` are not written."""
    return {f.name: np.asarray(getattr(obj, f.name)) for f in dataclasses.fields(obj)
            if getattr(obj, f.name) is not None}


def _optional(f: dataclasses.Field) -> bool:
    return f.default is None


def _load_npz(cls, path: Path):
    with np.load(path, allow_pickle=False) as z:
        fields = dataclasses.fields(cls)
        missing = {f.name for f in fields if not _optional(f)} - set(z.files)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}")
        arrays = {f.name: z[f.name] for f in fields if f.name in z.files}
    for name, arr in arrays.items():
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"{path}: {name} holds {arr.dtype} values, not numbers")
    return cls(**arrays)


@dataclass
class SourceInfo:
    model: str
    site: str
    d_model: int


@dataclass
class Settings:
    """The analysis settings that shape the cache's arrays."""

    top_k: int = 20
    n_intervals: int = 10  # interval groups shown (equal-width intervals of (0, max])
    interval_k: int = 5  # examples per interval
    window_before: int = 23
    window_after: int = 8
    logit_k: int = 10
    hist_bins: int = 64  # log-spaced bins of activation
    hist_log10_min: float = -4.0
    hist_log10_max: float = 4.0
    n_neighbours: int = 10
    seq_len: int = 128
    n_sequences: int = 100
    exclude_bos: bool = True
    exclude_special: bool = False  # every special token of the tokenizer left out of the statistics
    n_align: int = 10  # neuron alignment: largest decoder entries per feature
    n_corr_neurons: int = 10  # correlated neurons per feature (0: not computed)
    n_corr_candidates: int = 16  # decoder-cosine neighbours whose correlation is computed
    n_corr_features: int = 10  # correlated features kept per feature (0: not computed)
    diff_shared_lo: float = 0.3  # diff_class: relative norm below → model-A-only
    diff_shared_hi: float = 0.7  # diff_class: relative norm above → model-B-only
    next_token_effects: str = "top"  # *_next_logit for "top" examples, "all" (top and intervals), "none"
    latent_scaling: bool = False  # FeatureStats.ls_* computed (two-source crosscoders; --latent-scaling)
    # decoder dimensions with an RMS over the dictionary above this many times the median dimension's are
    # outliers (Manifest.outlier_dims), left out of the logit tables and the alignment ranking; 0: none.
    # An analysis always sets it (``--outlier-factor``, 5 by default); 10 is the rule of caches before it
    outlier_factor: float = 10.0

    @property
    def window(self) -> int:
        return self.window_before + 1 + self.window_after

    def hist_edges(self) -> np.ndarray:
        """Bin edges of the activation histograms (``hist_bins + 1`` values, log-spaced)."""
        return np.logspace(self.hist_log10_min, self.hist_log10_max, self.hist_bins + 1)


@dataclass
class Manifest:
    """``manifest.json``: what the cache describes. Read by render (titles, source names, settings).

    ``complete`` is false while an analysis is running; render refuses an incomplete cache.
    ``created`` is the only timestamp in the cache and is not copied into the site.
    """

    sources: list[SourceInfo]
    n_features: int
    n_tokens: int  # tokens counted in the statistics (padding/BOS excluded)
    n_sequences: int
    settings: Settings
    checkpoint: dict = field(default_factory=dict)  # {"path", "format", "activation", ...}
    dataset: str = ""
    title: str = ""
    feature_offset: int = 0  # id of the first feature in this cache (feature slices)
    # Named corpora (``--dataset NAME=PATH``), in the order their sequences follow each other in
    # tokens.npy: ``{"name", "path", "n_sequences", "n_tokens"}`` each, n_tokens counting the corpus's
    # tokens that enter the statistics. Empty for one unnamed corpus (and in older caches).
    corpora: list = field(default_factory=list)
    # the tokenizer's special token ids (BOS, EOS — the separator between documents —, pad, chat-template
    # markers), marked in the pages' example windows; None in caches written before it existed
    special_ids: list[int] | None = None
    # per source, the outlier dimensions of the decoder (``atlas.stats.geometry.outlier_dims``: RMS over all
    # the dictionary's features above ``Settings.outlier_factor`` × the median dimension's), left out of the
    # logit tables and the neuron alignment ranking and flagged on the pages; None in older caches
    outlier_dims: list[list[int]] | None = None
    complete: bool = False
    created: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Manifest":
        d = dict(d)
        d["sources"] = [SourceInfo(**s) for s in d["sources"]]
        known = {f.name for f in dataclasses.fields(Settings)}  # settings of a newer atlas are ignored
        d["settings"] = Settings(**{k: v for k, v in d["settings"].items() if k in known})
        return cls(**d)


@dataclass
class FeatureStats:
    """``features.npz``: per-feature statistics over all counted tokens. F features, S sources.

    - ``density[F]``: fraction of counted tokens where the feature is > 0
    - ``max_act[F]``, ``mean_act[F]`` (mean over tokens where it is > 0; 0 if never active)
    - ``n_active[F]`` (int64): number of tokens where it is > 0
    - ``hist_counts[F, B]`` (int64): active tokens per log-spaced bin (``Settings.hist_edges``);
      values below the first edge count in bin 0, above the last in bin B-1
    - ``dec_norm[F, S]``: ‖W_dec[f, s]‖
    - ``rel_norm[F]``: ‖d_1‖ / (‖d_0‖ + ‖d_1‖) for S = 2, NaN otherwise
    - ``dec_cos[F]``: cosine(W_dec[f, 0], W_dec[f, 1]) for S = 2, NaN otherwise
    - ``neighbours[F, n]`` (int32) and ``neighbour_cos[F, n]``: nearest other features by decoder cosine
      (decoders of all sources concatenated), most similar first

    Optional (``None`` when not computed; see the module docstring):

    - ``diff_class[F]`` (int8): model-diff class from ``rel_norm`` r with the thresholds
      ``Settings.diff_shared_lo`` / ``diff_shared_hi`` (default 0.3 / 0.7): 0 = model-A-only
      (r < lo), 1 = shared (lo ≤ r ≤ hi), 2 = model-B-only (r > hi), -1 = no class (S ≠ 2, or a
      zero decoder)
    - neuron alignment, the ``Settings.n_align`` = A decoder entries of largest magnitude over all
      sources and dimensions but the outlier dimensions (``Manifest.outlier_dims``), largest first: ``align_source[F, A]``, ``align_dim[F, A]`` (int32),
      ``align_val[F, A]`` (float32, the signed entry ``W_dec[f, s, i]``) and ``align_l1_frac[F, A]``
      (float32, |W_dec[f, s, i]| / Σ|W_dec[f]|, the entry's share of the decoder's L1 norm; the sum over
      the A entries is the share they carry together). -1 / NaN where S·d < A.
    - correlated neurons, the ``Settings.n_corr_neurons`` = M neurons (source s, dimension i of that
      source's activation, as read from the model, before any input scale) with the largest
      |Pearson correlation| between the feature's activation and x[s, i] over all counted tokens,
      strongest first: ``ncorr_source[F, M]``, ``ncorr_dim[F, M]`` (int32, -1 = none) and
      ``ncorr_val[F, M]`` (float32, the signed correlation; NaN = none, e.g. a dead feature)
    - correlated features, among each feature's ``Settings.n_corr_candidates`` nearest decoder-cosine
      neighbours, the ``Settings.n_corr_features`` = C with the highest Pearson correlation of
      activations over all counted tokens, highest first: ``fcorr_ids[F, C]`` (int32 feature ids,
      -1 = none) and ``fcorr_val[F, C]`` (float32, NaN = none). The candidates are searched among the
      analysed features only (their activations are the ones at hand): for a ``--features A:B``
      slice, among A..B-1
    - named corpora (``Manifest.corpora``, C of them; absent otherwise): ``corpus_n_active[F, C]``
      (int64, tokens of corpus c where the feature is > 0, among that corpus's counted tokens) and
      ``corpus_max_act[F, C]`` (float32, 0 if never active there); the density on corpus c is
      ``corpus_n_active[f, c] / Manifest.corpora[c]["n_tokens"]``
    - ``special_n_active[F]`` (int64): tokens where the feature is > 0 among the special tokens of the
      tokenizer (BOS, EOS, padding, chat-template markers), counted whether or not ``--exclude-special``
      leaves them out of the other statistics; a BOS left out of the statistics (the default) is left
      out here too. The share of the feature's activations on special tokens is
      ``special_n_active / (n_active + special_n_active)`` when ``Settings.exclude_special`` (n_active then
      counts no special token), else ``special_n_active / n_active`` (:func:`special_share`)
    - latent scaling (``Settings.latent_scaling``; two sources, S = 2; :mod:`atlas.stats.latent_scaling`
      defines it): ``ls_beta_err[F, 2, 2]`` and ``ls_beta_rec[F, 2, 2]`` (float32), the β fitted along
      the decoder of source m (axis 1) to model t's reconstruction error with the latent's own
      contribution added back (``err``) or to its reconstruction (``rec``), t on axis 2; ``ls_nu_err[F]``
      and ``ls_nu_rec[F]`` (float32), ν = β(other model) / β(own model) along the own decoder (own = the
      source with the larger decoder norm). NaN where undefined (never active, zero decoder or β(own) = 0)
    """

    density: np.ndarray
    max_act: np.ndarray
    mean_act: np.ndarray
    n_active: np.ndarray
    hist_counts: np.ndarray
    dec_norm: np.ndarray
    rel_norm: np.ndarray
    dec_cos: np.ndarray
    neighbours: np.ndarray
    neighbour_cos: np.ndarray
    diff_class: np.ndarray | None = None
    align_source: np.ndarray | None = None
    align_dim: np.ndarray | None = None
    align_val: np.ndarray | None = None
    align_l1_frac: np.ndarray | None = None
    ncorr_source: np.ndarray | None = None
    ncorr_dim: np.ndarray | None = None
    ncorr_val: np.ndarray | None = None
    fcorr_ids: np.ndarray | None = None
    fcorr_val: np.ndarray | None = None
    ls_beta_err: np.ndarray | None = None
    ls_beta_rec: np.ndarray | None = None
    ls_nu_err: np.ndarray | None = None
    ls_nu_rec: np.ndarray | None = None
    corpus_n_active: np.ndarray | None = None
    corpus_max_act: np.ndarray | None = None
    special_n_active: np.ndarray | None = None


def special_share(n_active, special_n_active, exclude_special: bool) -> np.ndarray:
    """Share of a feature's activations (act > 0, at the tokens the statistics could count: all but an
    excluded BOS) that fall on special tokens, per feature; NaN where it was never active."""
    n = np.asarray(n_active, dtype=np.float64)
    sp = np.asarray(special_n_active, dtype=np.float64)
    total = n + sp if exclude_special else n
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, sp / np.where(total > 0, total, 1), np.nan)


@dataclass
class Examples:
    """``examples.npz``: example windows, pointing into ``tokens.npy``. W = ``Settings.window``.

    Top examples, at most one per sequence, highest first (``top_seq == -1`` marks an empty slot):
    ``top_seq[F, K]`` int32, ``top_pos[F, K]`` int32 (the max-activating token in the sequence),
    ``top_act[F, K]`` float32, ``top_window[F, K, W]`` float16 (the feature's activation at each window
    position).

    Interval samples: intervals are ``(g * iv_width, (g + 1) * iv_width]`` for g in 0..G-1, and each
    holds up to k tokens sampled uniformly at random among the tokens whose activation lies in it:
    ``iv_seq[F, G, k]`` (-1 = empty), ``iv_pos``, ``iv_act`` and ``iv_window[F, G, k, W]``;
    ``iv_width[F]``.

    Optional (``None`` when not computed; ``Settings.next_token_effects``): each window token's
    direct effect on the logit of the token that follows it, per source (S sources):
    ``top_next_logit[F, K, W, S]`` and ``iv_next_logit[F, G, k, W, S]`` (float16). For the window
    position w of an example at (sequence q, token p), with t = p - window_before + w:

        top_next_logit[f, j, w, s] = top_window[f, j, w] × (W_dec[f, s] · U_s[:, tokens[q, t + 1]])

    where ``top_window`` is the stored (float16) activation and ``W_dec[f, s] · U_s[:, v]`` the
    feature's direct logit effect on token v via source s as in ``LogitEffects`` (U_s the model's final
    norm weight folded into its unembedding). It is 0 where the slot is empty, t is outside the
    sequence, or t is its last token (no next token). The feature's effect on every logit is the same
    at every position; this is its contribution to the logit of the token that actually came next.
    """

    top_seq: np.ndarray
    top_pos: np.ndarray
    top_act: np.ndarray
    top_window: np.ndarray
    iv_seq: np.ndarray
    iv_pos: np.ndarray
    iv_act: np.ndarray
    iv_window: np.ndarray
    iv_width: np.ndarray
    top_next_logit: np.ndarray | None = None
    iv_next_logit: np.ndarray | None = None


@dataclass
class LogitEffects:
    """``logits.npz``: direct logit effect of each feature's decoder through each source's unembedding.

    Effect of feature f on token t via source s: ``W_dec[f, s] · (γ ⊙ W_U[:, t])`` where γ is the weight
    of the model's final norm and W_U its unembedding (``lm_head``); for a ``hook_z`` or ``mlp.hook_post``
    source, ``W_dec[f, s] · W_out (γ ⊙ W_U[:, t])`` with W_out the attention's or MLP's output projection. ``top_ids/top_vals[F, S, L]`` are
    the L largest, ``bot_ids/bot_vals[F, S, L]`` the L smallest (most negative first);
    ``hist_counts[F, S, H]`` is a histogram of the effect over the whole vocabulary between
    ``hist_lo[F, S]`` and ``hist_hi[F, S]`` (H equal bins).

    Outlier dimensions: the decoder entries of ``Manifest.outlier_dims`` are left out of every value
    here (taken as 0 in ``W_dec[f, s]``; a cache whose manifest has ``outlier_dims`` None keeps them).
    Through the unembedding, the few massive residual dimensions every decoder writes to push the same
    tokens for nearly every feature; the tables show what is particular to the feature.

    Centring: an analysis that writes ``mean`` reports every value above centred over the vocabulary,
    ``effect[t] - mean[f, s]`` with ``mean[f, s]`` the mean effect over all V tokens (a shift every
    logit gets alike: it moves no probability). Optional (``None`` in older caches, whose values are raw):

    - ``mean[F, S]`` (float32): the subtracted mean effect
    - ``outlier_share[F, S]`` (float32): the part of ‖W_dec[f, s]‖² in the outlier dimensions, the
      part left out (:func:`atlas.stats.geometry.outlier_share`; NaN for a zero decoder)
    - for S = 2, the B−A table of the centred effects, ``diff[t] = e_1[t] - e_0[t]``: ``diff_top_ids`` /
      ``diff_top_vals[F, L]`` the L tokens whose effect grows most from source A's decoder to source B's
      (largest first), ``diff_bot_ids`` / ``diff_bot_vals[F, L]`` those it shrinks most (most negative
      first)
    """

    top_ids: np.ndarray
    top_vals: np.ndarray
    bot_ids: np.ndarray
    bot_vals: np.ndarray
    hist_counts: np.ndarray
    hist_lo: np.ndarray
    hist_hi: np.ndarray
    mean: np.ndarray | None = None
    outlier_share: np.ndarray | None = None
    diff_top_ids: np.ndarray | None = None
    diff_top_vals: np.ndarray | None = None
    diff_bot_ids: np.ndarray | None = None
    diff_bot_vals: np.ndarray | None = None


@dataclass
class Cache:
    """A loaded cache folder (everything render needs)."""

    manifest: Manifest
    vocab: list[str]
    tokens: np.ndarray
    features: FeatureStats
    examples: Examples
    logits: LogitEffects
    corpus_ids: np.ndarray | None = None  # corpus_ids.npy (named corpora only)


FILES = ("vocab.json", "tokens.npy", "features.npz", "examples.npz", "logits.npz")


def write_cache(folder: Path, cache: Cache) -> None:
    """Write every file of ``cache`` atomically; the manifest (with ``complete`` set) goes last."""
    import io

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("manifest.json", "corpus_ids.npy") + FILES:  # temporary files of a writer that was killed
        for stale in folder.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    atomic_write_json(folder / "vocab.json", list(cache.vocab))
    buf = io.BytesIO()
    np.save(buf, np.asarray(cache.tokens, dtype=np.int32))
    atomic_write_bytes(folder / "tokens.npy", buf.getvalue())
    _save_npz(folder / "features.npz", _arrays_of(cache.features))
    _save_npz(folder / "examples.npz", _arrays_of(cache.examples))
    _save_npz(folder / "logits.npz", _arrays_of(cache.logits))
    if cache.corpus_ids is not None:
        buf = io.BytesIO()
        np.save(buf, np.asarray(cache.corpus_ids, dtype=np.int16))
        atomic_write_bytes(folder / "corpus_ids.npy", buf.getvalue())
    else:
        (folder / "corpus_ids.npy").unlink(missing_ok=True)
    cache.manifest.complete = True
    atomic_write_json(folder / "manifest.json", cache.manifest.to_json())


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,),
          "list": (list,)}


def _check_fields(obj, where: str) -> None:
    """Raise ValueError when a field of the dataclass ``obj`` does not hold its annotated JSON type."""
    for f in dataclasses.fields(obj):
        want = _TYPES.get(str(f.type))
        value = getattr(obj, f.name)
        if want and (not isinstance(value, want) or (isinstance(value, bool) and bool not in want)):
            raise ValueError(f"{where}: {f.name} is {value!r}, not {f.type}")


def _parse_manifest(text: str) -> Manifest:
    manifest = Manifest.from_json(json.loads(text))
    if not isinstance(manifest.sources, list):
        raise ValueError("sources is not a list")
    for part in (manifest, manifest.settings, *manifest.sources):
        _check_fields(part, "manifest.json")
    if manifest.special_ids is not None and not _int_list(manifest.special_ids):
        raise ValueError(f"manifest.json: special_ids is {manifest.special_ids!r}, not a list of token ids")
    dims = manifest.outlier_dims
    if dims is not None and not (isinstance(dims, list) and all(_int_list(d) for d in dims)):
        raise ValueError(f"manifest.json: outlier_dims is {dims!r}, not one list of dimensions per source")
    for c in manifest.corpora:
        if not (isinstance(c, dict) and isinstance(c.get("name"), str) and _is_int(c.get("n_sequences"))
                and _is_int(c.get("n_tokens", 0))):
            raise ValueError(f"manifest.json: corpora holds {c!r}, not {{name, n_sequences, n_tokens}} of a named "
                             "corpus")
    return manifest


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int_list(x) -> bool:
    return isinstance(x, list) and all(_is_int(i) for i in x)


def _parse_vocab(text: str) -> list[str]:
    vocab = json.loads(text)
    if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
        raise ValueError("not a list of token strings")
    return vocab


def _load_tokens(path: Path) -> np.ndarray:
    tokens = np.load(path, allow_pickle=False)
    if tokens.dtype.kind not in "iu":
        raise ValueError(f"token ids of type {tokens.dtype}")
    return tokens


def _read(path: Path, read):
    """``read(path)``, with every way a damaged or missing file fails turned into a ValueError naming it."""
    try:
        return read(path)
    except FileNotFoundError:
        raise ValueError(f"{path.parent} lacks {path.name}") from None
    except PermissionError:
        raise
    except Exception as exc:  # noqa: BLE001 - json, numpy and zipfile fail in many ways on damaged bytes
        raise ValueError(f"{path} is damaged or truncated ({type(exc).__name__}: {exc})") from None


def read_manifest(folder: Path) -> Manifest:
    path = Path(folder) / "manifest.json"
    return _read(path, lambda p: _parse_manifest(p.read_text("utf-8")))


def read_cache(folder: Path) -> Cache:
    """Load a complete cache; raises ``ValueError`` naming what is wrong with an unusable one (a missing,
    truncated or damaged file, a field of the wrong type, an unfinished analysis)."""
    folder = Path(folder)
    if not (folder / "manifest.json").exists():
        raise ValueError(f"{folder} is not an atlas cache (no manifest.json)")
    manifest = read_manifest(folder)
    if manifest.format_version != FORMAT_VERSION:
        raise ValueError(
            f"{folder} has cache format {manifest.format_version}; this atlas reads {FORMAT_VERSION}"
        )
    if not manifest.complete:
        raise ValueError(f"{folder} holds an unfinished analysis")
    return Cache(
        manifest=manifest,
        vocab=_read(folder / "vocab.json", lambda p: _parse_vocab(p.read_text("utf-8"))),
        tokens=_read(folder / "tokens.npy", _load_tokens),
        features=_read(folder / "features.npz", lambda p: _load_npz(FeatureStats, p)),
        examples=_read(folder / "examples.npz", lambda p: _load_npz(Examples, p)),
        logits=_read(folder / "logits.npz", lambda p: _load_npz(LogitEffects, p)),
        corpus_ids=_read(folder / "corpus_ids.npy", _load_tokens) if (folder / "corpus_ids.npy").exists() else None,
    )
