"""The analysis cache: the one interface between ``atlas analyze`` and ``atlas render``.

Layout of a cache folder (``atlas-data/`` by default)::

    atlas-data/
      manifest.json   Manifest       written last; ``complete`` is true once every other file is final
      vocab.json      list[str]      token id → display string, for the models' shared tokenizer
      tokens.npy      int32[N, T]    the corpus sequences the examples point into
      features.npz    FeatureStats   per-feature scalars, histograms, decoder geometry, neighbours
      examples.npz    Examples       top activating examples and interval samples with their windows
      logits.npz      LogitEffects   top/bottom tokens of each feature's direct logit effect per source

Writers: :mod:`atlas.analyze`. Readers: :mod:`atlas.render` (which imports numpy, never torch) and the
tests. Every file is written to a temporary name and renamed into place, so a reader sees either the old
file or the new one. This module imports numpy only.

A window is the ``window_before`` tokens before an example's token, the token itself, and
``window_after`` tokens after it: ``W = window_before + 1 + window_after`` positions. Positions outside
the sequence hold token ``-1`` and activation ``0``.
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _arrays_of(obj) -> dict[str, np.ndarray]:
    return {f.name: np.asarray(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def _load_npz(cls, path: Path):
    with np.load(path, allow_pickle=False) as z:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(z.files)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}")
        return cls(**{n: z[n] for n in names})


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
    complete: bool = False
    created: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Manifest":
        d = dict(d)
        d["sources"] = [SourceInfo(**s) for s in d["sources"]]
        d["settings"] = Settings(**d["settings"])
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


@dataclass
class LogitEffects:
    """``logits.npz``: direct logit effect of each feature's decoder through each source's unembedding.

    Effect of feature f on token t via source s: ``W_dec[f, s] · (γ ⊙ W_U[:, t])`` where γ is the weight
    of the model's final norm and W_U its unembedding (``lm_head``). ``top_ids/top_vals[F, S, L]`` are
    the L largest, ``bot_ids/bot_vals[F, S, L]`` the L smallest (most negative first);
    ``hist_counts[F, S, H]`` is a histogram of the effect over the whole vocabulary between
    ``hist_lo[F, S]`` and ``hist_hi[F, S]`` (H equal bins).
    """

    top_ids: np.ndarray
    top_vals: np.ndarray
    bot_ids: np.ndarray
    bot_vals: np.ndarray
    hist_counts: np.ndarray
    hist_lo: np.ndarray
    hist_hi: np.ndarray


@dataclass
class Cache:
    """A loaded cache folder (everything render needs)."""

    manifest: Manifest
    vocab: list[str]
    tokens: np.ndarray
    features: FeatureStats
    examples: Examples
    logits: LogitEffects


FILES = ("vocab.json", "tokens.npy", "features.npz", "examples.npz", "logits.npz")


def write_cache(folder: Path, cache: Cache) -> None:
    """Write every file of ``cache`` atomically; the manifest (with ``complete`` set) goes last."""
    import io

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "vocab.json", list(cache.vocab))
    buf = io.BytesIO()
    np.save(buf, np.asarray(cache.tokens, dtype=np.int32))
    atomic_write_bytes(folder / "tokens.npy", buf.getvalue())
    _save_npz(folder / "features.npz", _arrays_of(cache.features))
    _save_npz(folder / "examples.npz", _arrays_of(cache.examples))
    _save_npz(folder / "logits.npz", _arrays_of(cache.logits))
    cache.manifest.complete = True
    atomic_write_json(folder / "manifest.json", cache.manifest.to_json())


def read_manifest(folder: Path) -> Manifest:
    return Manifest.from_json(json.loads((Path(folder) / "manifest.json").read_text("utf-8")))


def read_cache(folder: Path) -> Cache:
    """Load a complete cache; raises ``ValueError`` naming what is wrong with an unusable one."""
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
        vocab=json.loads((folder / "vocab.json").read_text("utf-8")),
        tokens=np.load(folder / "tokens.npy", allow_pickle=False),
        features=_load_npz(FeatureStats, folder / "features.npz"),
        examples=_load_npz(Examples, folder / "examples.npz"),
        logits=_load_npz(LogitEffects, folder / "logits.npz"),
    )
