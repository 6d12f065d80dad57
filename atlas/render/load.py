"""Loading an analysis cache for rendering, with problems turned into :class:`AtlasError` messages.

The renderer reads only the cache (``atlas.cache.read_cache``): numpy and json, never torch.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..cache import Cache, read_cache
from ..errors import AtlasError

_FIX = "run `atlas analyze CHECKPOINT -o {folder}` (or `atlas build`) to write a complete cache"


def load_cache(cache_dir: Path) -> Cache:
    """Read ``cache_dir`` and check its arrays agree with each other; raises AtlasError naming the fix."""
    folder = Path(cache_dir)
    fix = _FIX.format(folder=folder)
    if not folder.exists():
        raise AtlasError(f"no analysis cache at {folder}: {fix} first")
    if not folder.is_dir():
        raise AtlasError(f"{folder} is a file, not an analysis cache folder: {fix}")
    try:
        cache = read_cache(folder)
    except ValueError as exc:
        raise AtlasError(f"cannot render {folder}: {exc}; {fix}") from None
    except (OSError, KeyError, zipfile.BadZipFile, TypeError, EOFError) as exc:
        raise AtlasError(f"cannot read the analysis cache {folder} ({type(exc).__name__}: {exc}); {fix}") from None
    problems = check_shapes(cache)
    if problems:
        raise AtlasError(f"the analysis cache {folder} is inconsistent ({'; '.join(problems[:3])}); {fix}")
    return cache


def check_shapes(cache: Cache) -> list[str]:
    """Problems with the array shapes of ``cache`` (empty when they agree with the manifest)."""
    m = cache.manifest
    st = m.settings
    F, S, W = m.n_features, len(m.sources), st.window
    fs, ex, lg = cache.features, cache.examples, cache.logits
    want = {
        "features.density": (fs.density, (F,)),
        "features.max_act": (fs.max_act, (F,)),
        "features.mean_act": (fs.mean_act, (F,)),
        "features.n_active": (fs.n_active, (F,)),
        "features.hist_counts": (fs.hist_counts, (F, st.hist_bins)),
        "features.dec_norm": (fs.dec_norm, (F, S)),
        "features.rel_norm": (fs.rel_norm, (F,)),
        "features.dec_cos": (fs.dec_cos, (F,)),
        "examples.top_seq": (ex.top_seq, (F, None)),
        "examples.iv_seq": (ex.iv_seq, (F, None, None)),
        "examples.iv_width": (ex.iv_width, (F,)),
        "logits.top_ids": (lg.top_ids, (F, S, None)),
    }
    problems = []
    for name, (arr, shape) in want.items():
        arr = np.asarray(arr)
        if arr.ndim != len(shape) or any(w is not None and a != w for a, w in zip(arr.shape, shape)):
            problems.append(f"{name} has shape {arr.shape}, expected {tuple('*' if w is None else w for w in shape)}")
    if problems:
        return problems
    K = ex.top_seq.shape[1]
    G, k = ex.iv_seq.shape[1:]
    for name, arr, shape in (
        ("examples.top_pos", ex.top_pos, (F, K)),
        ("examples.top_act", ex.top_act, (F, K)),
        ("examples.top_window", ex.top_window, (F, K, W)),
        ("examples.iv_pos", ex.iv_pos, (F, G, k)),
        ("examples.iv_act", ex.iv_act, (F, G, k)),
        ("examples.iv_window", ex.iv_window, (F, G, k, W)),
        ("features.neighbour_cos", fs.neighbour_cos, fs.neighbours.shape),
        ("logits.top_vals", lg.top_vals, lg.top_ids.shape),
        ("logits.bot_ids", lg.bot_ids, lg.top_ids.shape),
        ("logits.bot_vals", lg.bot_vals, lg.top_ids.shape),
        ("logits.hist_lo", lg.hist_lo, (F, S)),
        ("logits.hist_hi", lg.hist_hi, (F, S)),
    ):
        if tuple(np.asarray(arr).shape) != tuple(shape):
            problems.append(f"{name} has shape {np.asarray(arr).shape}, expected {tuple(shape)}")
    C = len(m.corpora)
    for name, arr, shape in (("features.corpus_n_active", fs.corpus_n_active, (F, C)),
                             ("features.corpus_max_act", fs.corpus_max_act, (F, C)),
                             ("features.special_n_active", fs.special_n_active, (F,))):
        if arr is not None and tuple(np.asarray(arr).shape) != shape:
            why = " (one column per corpus of the manifest)" if len(shape) == 2 else ""
            problems.append(f"{name} has shape {np.asarray(arr).shape}, expected {shape}{why}")
    ids = None if cache.corpus_ids is None else np.asarray(cache.corpus_ids)
    if ids is not None and ids.shape != (np.asarray(cache.tokens).shape[0],):
        problems.append(f"corpus_ids.npy has shape {ids.shape}, expected one entry per sequence")
    if np.asarray(lg.hist_counts).shape[:2] != (F, S):
        problems.append(f"logits.hist_counts has shape {np.asarray(lg.hist_counts).shape}, expected ({F}, {S}, *)")
    tokens = np.asarray(cache.tokens)
    if tokens.ndim != 2:
        problems.append(f"tokens.npy has shape {tokens.shape}, expected (n_sequences, seq_len)")
    elif tokens.size and int(tokens.max()) >= len(cache.vocab):
        problems.append(f"tokens.npy holds token id {int(tokens.max())} but vocab.json has {len(cache.vocab)} entries")
    if S < 1:
        problems.append("the manifest lists no sources")
    return problems
