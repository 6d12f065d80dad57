"""The analysis stage: stream the corpus through the models and the crosscoder, write the cache.

``run_analysis`` (called by :mod:`atlas.build`) reads batches of sequences, extracts every source's
activations (:meth:`atlas.models.ModelSet.extract`), encodes them, and folds each batch into mergeable
summaries on the device (:mod:`atlas.stats`); the batch is then dropped, so memory does not grow with
the corpus. At the end it adds the weight-derived statistics (decoder geometry, logit effects) and
writes the cache folder (:mod:`atlas.cache`).

The steps, in :func:`run_analysis`: :func:`prepare` (check options, fingerprint the inputs, choose the
features and this process's batches: a :class:`Plan`) → :func:`_resume` → :func:`_estimates` →
:func:`_fold` (stream a range of batches into the summaries) → combine ranks (torchrun) → finish:
:func:`assemble` + :func:`write_analysis_cache`, or :func:`atlas.merge.write_shard` for ``--shard``.
The same code runs one process, each rank of a torchrun job (:mod:`atlas.distributed`: ranks take
contiguous ranges of batches, rank 0 merges and writes) and each job of a scheduler array
(``--shard K/N``: a shard that ``atlas merge`` completes). Batches are always the same global batches
(``batch_size`` sequences each), so every arrangement folds the same numbers and gives the same cache.

Features: ``--n-features N`` analyses features ``0..N-1`` with neighbours searched among them;
``--features A:B`` (wins) analyses ``A..B-1`` (``Manifest.feature_offset = A``) with neighbours searched
among the whole dictionary, so slices concatenated by ``atlas merge`` equal one whole run.

Resume files (read and written here only): ``<cache>/state/summaries.pt`` (under torchrun one per rank,
``summaries.rank<r>-of-<n>.pt``), a ``torch.save`` dict with ``fingerprint`` (hash of every input that
shapes the result), ``batches_done`` (the global index of the next batch), ``batches`` (this process's
range), ``input_scale``, ``threshold`` (an estimated BatchTopK threshold, else None) and the summaries'
``state_dict``. It is replaced atomically every ``save_every``
batches; a rerun with the same inputs (and the same number of ranks) continues after the last saved batch
and ends with the same cache as an uninterrupted run. The folder is removed once the cache is complete.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import cache as cache_format
from .errors import AtlasError

STATE_DIR = "state"
STATE_FILE = "summaries.pt"


@dataclass
class AnalysisOptions:
    """What to compute. ``n_features`` 0 means all features; the first ``n_features`` are analysed.
    ``features = (A, B)`` analyses features A..B-1 instead (a slice of the dictionary; wins)."""

    n_features: int = 50
    features: tuple[int, int] | None = None
    batch_size: int = 16
    top_k: int = 20
    exclude_bos: bool = True
    exclude_special: bool = False  # also leave out every special token (EOS, pad, chat-template markers)
    seed: int = 0
    dataset: str = ""
    # named corpora, in the order of their sequences: {"name", "path", "n_sequences"} each (see
    # atlas.corpus.CorpusSplit); empty for one unnamed corpus
    corpora: tuple = ()
    n_intervals: int = 10
    interval_k: int = 5
    window_before: int = 23
    window_after: int = 8
    logit_k: int = 10
    logit_hist_bins: int = 40
    n_neighbours: int = 10
    n_align: int = 10  # neuron alignment: largest decoder entries per feature
    outlier_factor: float = 5.0  # outlier dimensions: decoder RMS above this × the median one's (0: none)
    neuron_correlations: bool = True  # correlated neurons: a float32 [F, S·d] sum on the device
    n_corr_neurons: int = 10  # correlated neurons kept per feature
    corr_candidates: int = 16  # nearest decoder neighbours each feature's correlation is computed with
    n_corr_features: int = 10  # correlated features kept per feature (0: none computed)
    diff_shared: tuple[float, float] = (0.3, 0.7)  # relative-norm range of "shared" (two sources)
    next_token_effects: str = "top"  # per window token effect on the next token's logit: top, all, none
    latent_scaling: str = "auto"  # two-source latent scaling: auto (when every feature is analysed), on, off
    save_every: int = 50  # batches between resume files
    scale_batches: int = 4  # batches used to estimate a missing input scale
    progress: bool = True
    reuse: bool = True  # keep a complete cache made from the same inputs


def slice_features(crosscoder, n: int, first: int = 0):
    """A copy of ``crosscoder`` restricted to features ``first .. first+n-1`` (per-feature tensors sliced)."""
    def cut(t, axis):
        if t is None or t.ndim == 0:
            return t
        return t.narrow(axis, first, n)

    return dataclasses.replace(
        crosscoder,
        W_enc=crosscoder.W_enc[..., first:first + n], W_dec=crosscoder.W_dec[first:first + n],
        b_enc=crosscoder.b_enc[first:first + n],
        threshold=cut(crosscoder.threshold, 0), act_scale=cut(crosscoder.act_scale, 0),
        extra=dict(crosscoder.extra),
    )


class FeatureEncoder:
    """Encodes ``x[B, T, S, d]`` into the activations ``[B, T, n]`` of features ``first..stop-1``, in the
    dtype of the encode (bfloat16 on a GPU by default: the summaries read values from it and widen them to
    float32, which is exact, so no float32 copy of the ``[tokens, n]`` buffer is made).

    TopK crosscoders choose among all features, so they are encoded whole and sliced after.
    """

    def __init__(self, crosscoder, first: int, stop: int, device, dtype):
        self.first, self.stop, self.n = first, stop, stop - first
        self.whole = crosscoder.activation == "topk"
        cc = dataclasses.replace(crosscoder) if self.whole else slice_features(crosscoder, self.n, first)
        # relu / jumprelu / topk: Crosscoder.encode's numbers with one [tokens, F] buffer (bias and
        # activation applied in place)
        self.fused = cc.activation in ("relu", "jumprelu", "topk") and cc.input_norm is None
        self.crosscoder = cc.to(device=device, dtype=dtype)
        if self.fused:  # a feature slice is a strided view: copy it once, not at every batch
            self.crosscoder.W_enc = self.crosscoder.W_enc.contiguous()

    @property
    def W_dec(self) -> torch.Tensor:
        """The analysed features' decoder rows ``[n, S, d]`` (device and dtype of the encode)."""
        return self.crosscoder.W_dec[self.first:self.stop] if self.whole else self.crosscoder.W_dec

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        B, T, S, d = x.shape
        with torch.inference_mode():
            if self.fused:
                cc = self.crosscoder
                xs = x.reshape(B * T, S, d)
                if cc.input_scale is not None:
                    xs = xs * cc.input_scale.to(xs.dtype)[None, :, None]
                f = torch.einsum("bsd,sdf->bf", xs.to(cc.W_enc.dtype), cc.W_enc)  # as Crosscoder.encode
                f += cc.b_enc
                if cc.activation == "topk":  # the k largest of each row, the rest 0: in the same buffer
                    vals, idx = f.topk(min(cc.k, f.shape[-1]), dim=-1, sorted=False)
                    f.zero_().scatter_(-1, idx, vals)
                elif cc.activation == "jumprelu":
                    f.masked_fill_(f <= cc.threshold, 0.0)
                f.relu_()
                if cc.act_scale is not None:
                    f.mul_(cc.act_scale)
            else:
                f = self.crosscoder.encode(x.reshape(B * T, S, d))
            if self.whole:
                f = f[:, self.first:self.stop].contiguous()  # the summaries read it as one buffer
        return f.reshape(B, T, self.n)


GPU_BATCH_TOKENS = 32768  # tokens per batch on a GPU by default: enough to keep one busy (bench/README.md)
GPU_BATCH_BYTES = 4 * 2**30  # at most this much [tokens × features] activations per batch by default


def default_batch_size(device, seq_len: int, n_features: int, dtype) -> int:
    """Sequences per batch when ``--batch-size`` is not given: 16 on a CPU; on a GPU about
    :data:`GPU_BATCH_TOKENS` tokens, fewer where the batch's activations (``tokens × n_features`` in
    ``dtype``) would pass :data:`GPU_BATCH_BYTES`. The same on every rank of a run (no memory query)."""
    if torch.device(device).type != "cuda":
        return 16
    per_token = max(1, n_features) * torch.finfo(dtype).bits // 8
    tokens = min(GPU_BATCH_TOKENS, GPU_BATCH_BYTES // per_token)
    return max(1, tokens // max(1, seq_len))


def parse_feature_range(spec: str) -> tuple[int, int]:
    """``"A:B"`` → ``(A, B)`` (``--features``)."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(spec))
    if not m:
        raise AtlasError(f"--features {spec!r} is not a range A:B: pass e.g. --features 0:4096 (features 0..4095)")
    first, stop = int(m.group(1)), int(m.group(2))
    if stop <= first:
        raise AtlasError(f"--features {spec} is empty: pass A:B with A < B (features A..B-1)")
    return first, stop


def check_counts(top_k: int, n_corr_features: int, corr_candidates: int) -> None:
    """Raise :class:`AtlasError` for counts out of range (``--top-k``, ``--corr-features``, ``--corr-candidates``)."""
    if top_k < 1:
        raise AtlasError(f"--top-k must be at least 1 (got {top_k})")
    for flag, value in (("--corr-features", n_corr_features), ("--corr-candidates", corr_candidates)):
        if value < 0:
            raise AtlasError(f"{flag} must be 0 or more (got {value}): pass --corr-features and "
                             "--corr-candidates as 0 (off) or more")


def parse_shared_range(spec: str) -> tuple[float, float]:
    """``"LO:HI"`` → ``(LO, HI)`` with 0 ≤ LO ≤ HI ≤ 1 (``--shared-range``)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*:\s*([0-9.]+)\s*", str(spec))
    try:
        lo, hi = (float(m.group(1)), float(m.group(2))) if m else (math.nan, math.nan)
    except ValueError:
        lo = hi = math.nan
    if not (0.0 <= lo <= hi <= 1.0):
        raise AtlasError(f"--shared-range {spec!r} is not a range LO:HI with 0 <= LO <= HI <= 1: pass e.g. "
                         "--shared-range 0.3:0.7")
    return lo, hi


def parse_shard(spec: str) -> tuple[int, int]:
    """``"K/N"`` → ``(K, N)`` (``--shard``; K counts from 0)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if not m:
        raise AtlasError(f"--shard {spec!r} is not K/N: pass e.g. --shard 0/8 (the first of 8 shards; K counts "
                         "from 0, e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array=0-7)")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or k >= n:
        raise AtlasError(f"--shard {spec}: K must be 0..N-1 (shards count from 0): pass --shard 0/{max(n, 1)} "
                         f"to --shard {max(n, 1) - 1}/{max(n, 1)}")
    return k, n


def _sample_bytes(t: torch.Tensor | None, n: int = 65536) -> bytes:
    if t is None:
        return b"none"
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // n)
    return repr(tuple(t.shape)).encode() + flat[::step].float().cpu().numpy().tobytes()


def inputs_fingerprint(crosscoder, sources, tokens: torch.Tensor, options: AnalysisOptions, settings, dtype) -> str:
    """Hash of every input that shapes the analysis (weights sampled, tokens whole) except which features are
    analysed: feature slices of one analysis share it (:func:`fingerprint` adds the features)."""
    from . import __version__

    h = hashlib.blake2b(digest_size=16)
    for t in (crosscoder.W_enc, crosscoder.W_dec, crosscoder.b_enc, crosscoder.b_dec, crosscoder.threshold,
              crosscoder.input_scale, crosscoder.act_scale):
        h.update(_sample_bytes(t))
    h.update(tokens.to(torch.int64).cpu().numpy().tobytes())
    meta = {
        "version": __version__, "format": cache_format.FORMAT_VERSION, "activation": crosscoder.activation,
        "k": crosscoder.k, "sources": [[s.model, s.site] for s in sources],
        "options": {k: v for k, v in dataclasses.asdict(options).items()
                    if k not in ("progress", "reuse", "save_every", "dataset", "n_features", "features",
                                 "latent_scaling", "corpora")},  # latent scaling: as resolved, in the settings
        # which corpus each sequence came from (not where its file lies)
        "corpora": [[c["name"], int(c["n_sequences"])] for c in options.corpora],
        "settings": dataclasses.asdict(settings), "dtype": str(dtype),
    }
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


def check_outlier_factor(factor: float) -> None:
    """Refuse an ``--outlier-factor`` below 0 (or NaN)."""
    if not factor >= 0:
        raise AtlasError(f"--outlier-factor must be 0 (no outlier dimensions) or more (got {factor})")


def fingerprint(inputs_fp: str, first: int, stop: int, among: int) -> str:
    """Hash of the inputs and the features: ``first..stop-1``, neighbours searched among ``0..among-1``."""
    return hashlib.blake2b(f"{inputs_fp}:{first}:{stop}:{among}".encode(), digest_size=16).hexdigest()


def special_mask(tokens: torch.Tensor, bos_token_id: int | None, exclude_bos: bool,
                 special_ids: set[int] | frozenset) -> torch.Tensor:
    """``[N, T]`` bool: the special tokens whose activations ``special_n_active`` counts: those with an id in
    ``special_ids``, but a BOS that the statistics leave out (``exclude_bos``)."""
    if not special_ids:
        return torch.zeros_like(tokens, dtype=torch.bool)
    special = torch.isin(tokens, torch.tensor(sorted(special_ids), dtype=tokens.dtype))
    return special & counted_mask(tokens, bos_token_id, exclude_bos)


def counted_mask(tokens: torch.Tensor, bos_token_id: int | None, exclude_bos: bool,
                 special_ids: set[int] | frozenset = frozenset()) -> torch.Tensor:
    """``[N, T]`` bool: the tokens that enter the statistics: all but BOS when it is excluded, and but the
    ``special_ids`` given (``--exclude-special``)."""
    excluded = set(special_ids)
    if exclude_bos and bos_token_id is not None:
        excluded.add(int(bos_token_id))
    if not excluded:
        return torch.ones_like(tokens, dtype=torch.bool)
    return ~torch.isin(tokens, torch.tensor(sorted(excluded), dtype=tokens.dtype))


def _check_finite(x: torch.Tensor, what: str, lo: int, hi: int, fix: str) -> None:
    # one reduction first: NaN and inf propagate into a sum, so a finite sum proves every value finite
    if bool(torch.isfinite(x.sum(dtype=torch.float32))) or bool(torch.isfinite(x).all()):
        return
    raise AtlasError(f"{what} hold NaN or inf values in sequences {lo}..{hi - 1}: {fix}")


def scale_contribution(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """One batch's share of the input-scale estimate: (sum of ‖x‖ per source over the masked tokens, count)."""
    norms = x.float().norm(dim=-1)[mask.to(x.device)]  # [n, S]
    return norms.sum(0).cpu(), int(norms.shape[0])


def combine_scale(contributions: list[tuple[torch.Tensor, int]], d: int) -> tuple[torch.Tensor, int]:
    """Per source ``sqrt(d) / mean ‖x‖`` from batches' contributions, added in batch order."""
    total, count = None, 0
    for s, c in contributions:
        total = s if total is None else total + s
        count += c
    if not count:
        raise AtlasError("no tokens to estimate the input scale from: pass --scale, or a larger --n-samples")
    return math.sqrt(d) / (total / count), count


def estimate_input_scale(batches: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Per source ``sqrt(d) / mean ‖x‖`` over the masked tokens of activation batches ``x[B, T, S, d]``."""
    return combine_scale([scale_contribution(x, m) for x, m in zip(batches, masks)], batches[0].shape[-1])


def save_torch_atomic(path: Path, obj) -> None:
    """``torch.save`` through a temporary file in the same folder and a rename (resume files, shards)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # through a Python file object: a full disk then raises OSError(ENOSPC), not an opaque RuntimeError
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load_state(path: Path, fp: str, device) -> dict | None:
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable resume file is ignored, the run starts over
        return None
    return state if state.get("fingerprint") == fp else None


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _cached_manifest(cache_dir: Path, fp: str):
    try:
        manifest = cache_format.read_manifest(cache_dir)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if manifest.complete and manifest.checkpoint.get("fingerprint") == fp and all(
            (cache_dir / name).exists() for name in cache_format.FILES):
        return manifest
    return None


@dataclass
class Plan:
    """Everything fixed before the first batch: inputs, the analysed features, the batches of this process.

    The corpus is cut into batches of ``options.batch_size`` sequences (batch b holds sequences
    ``b·B .. (b+1)·B - 1``); ``job`` is the range of batches of this analysis (all, or one ``--shard``),
    ``mine`` the part of it this process folds (all of it, or one torchrun rank's contiguous share).
    Features ``first .. stop-1`` are analysed; their nearest neighbours are searched among features
    ``0 .. among-1`` (the analysed ones for ``--n-features``, the whole dictionary for ``--features``).
    """

    crosscoder: object
    models: object
    tokens: torch.Tensor
    options: AnalysisOptions
    settings: object
    device: torch.device
    dtype: torch.dtype
    first: int
    stop: int
    among: int
    inputs_fingerprint: str
    fingerprint: str
    job: tuple[int, int]
    mine: tuple[int, int]
    comm: object = None  # atlas.distributed.Comm under torchrun
    shard: tuple[int, int] | None = None  # (K, N) for --shard K/N
    _local_neighbours: dict | None = None

    @property
    def corpus_ids(self) -> torch.Tensor:
        """``int64[N]``: each sequence's corpus (index into ``options.corpora``; all 0 without names)."""
        from .corpus import corpus_ids

        return torch.from_numpy(corpus_ids(list(self.options.corpora), self.tokens.shape[0]).astype("int64"))

    @property
    def n_features(self) -> int:
        return self.stop - self.first

    @property
    def n_batches(self) -> int:
        return -(-self.tokens.shape[0] // self.options.batch_size)

    @property
    def lead(self) -> bool:
        """Whether this process writes (rank 0 under torchrun; the only process otherwise)."""
        return self.comm is None or self.comm.rank == 0

    def sequences(self, b: int) -> tuple[int, int]:
        lo = b * self.options.batch_size
        return lo, min(lo + self.options.batch_size, self.tokens.shape[0])

    def local_neighbours(self) -> dict:
        """Nearest neighbours by decoder cosine among the analysed features (ids ``0..n-1`` of them),
        as many as the pages and the feature-correlation candidates need; computed once, before the pass."""
        if self._local_neighbours is None:
            from .stats import nearest_neighbours

            st = self.settings
            n = max(st.n_neighbours, st.n_corr_candidates if st.n_corr_features else 0)
            W = self.crosscoder.W_dec[self.first:self.stop].to(device=self.device, dtype=torch.float32)
            self._local_neighbours = nearest_neighbours(W, n)
        return self._local_neighbours

    def new_summaries(self):
        from .stats import FeatureSummaries

        st, cc = self.settings, self.crosscoder
        candidates = None
        if st.n_corr_features > 0 and st.n_corr_candidates > 0:
            candidates = torch.as_tensor(self.local_neighbours()["neighbours"][:, :st.n_corr_candidates],
                                         dtype=torch.int64)
        return FeatureSummaries(self.n_features, self.settings, self.options.seed, device=self.device,
                                feature_offset=self.first, width=cc.n_sources * cc.d_model,
                                n_sources=cc.n_sources, candidates=candidates,
                                latent_scaling=bool(getattr(st, "latent_scaling", False)),
                                n_corpora=max(1, len(self.options.corpora)))

    def state_path(self, cache_dir: Path) -> Path:
        name = STATE_FILE if self.comm is None else f"summaries.rank{self.comm.rank}-of-{self.comm.world}.pt"
        return Path(cache_dir) / STATE_DIR / name

    def say(self, message: str) -> None:
        if self.lead:
            print(message)


def split_range(lo: int, hi: int, index: int, count: int) -> tuple[int, int]:
    """Part ``index`` of ``count`` contiguous, nearly equal parts of ``lo .. hi-1``."""
    n = hi - lo
    return lo + n * index // count, lo + n * (index + 1) // count


def feature_range(crosscoder, options: AnalysisOptions) -> tuple[int, int, int]:
    """``(first, stop, among)``: the analysed features and the features their neighbours are searched in."""
    F_total = crosscoder.n_features
    if options.features is not None:
        first, stop = options.features
        if not 0 <= first < stop:
            raise AtlasError(f"--features {first}:{stop} is empty: pass A:B with 0 <= A < B")
        if stop > F_total:
            raise AtlasError(f"--features {first}:{stop} goes past the dictionary's {F_total} features: "
                             f"pass B at most {F_total}")
        return first, stop, F_total
    if options.n_features < 0:
        raise AtlasError(f"--n-features must be 0 (all) or positive (got {options.n_features})")
    n = min(options.n_features or F_total, F_total)
    return 0, n, n


def latent_scaling_enabled(crosscoder, options: AnalysisOptions, first: int, stop: int) -> bool:
    """Whether the analysis computes latent scaling (``--latent-scaling``): ``auto`` for a two-source
    crosscoder whose every feature is analysed (a slice of features would need the whole dictionary
    encoded again at every batch, for the reconstructions), ``on`` for any two-source analysis."""
    mode = options.latent_scaling
    if mode not in ("auto", "on", "off"):
        raise AtlasError(f"--latent-scaling {mode!r} is not one of auto, on, off: pass e.g. --latent-scaling on")
    if mode == "off":
        return False
    if crosscoder.n_sources != 2:
        if mode == "on":
            raise AtlasError(f"--latent-scaling on needs a crosscoder over two models (this one has "
                             f"{crosscoder.n_sources} source(s)): pass --latent-scaling off or auto")
        return False
    return mode == "on" or (first == 0 and stop == crosscoder.n_features)


def prepare(crosscoder, models, tokens: torch.Tensor, options: AnalysisOptions, device, dtype, comm=None,
            shard: tuple[int, int] | None = None) -> Plan:
    """Check the options and fix what this process analyses (see :class:`Plan`)."""
    first, stop, among = feature_range(crosscoder, options)
    if options.batch_size < 1:
        raise AtlasError(f"--batch-size must be at least 1 (got {options.batch_size})")
    check_counts(options.top_k, options.n_corr_features, options.corr_candidates)
    check_outlier_factor(options.outlier_factor)
    tokens = torch.as_tensor(tokens, dtype=torch.long).cpu()
    N, T = tokens.shape
    in_corpora = sum(int(c["n_sequences"]) for c in options.corpora)
    if options.corpora and in_corpora != N:
        raise AtlasError(f"the named corpora hold {in_corpora} sequences but {N} were given: load the sequences "
                         "with atlas.corpus.load_corpora and pass its corpora")
    settings = cache_format.Settings(
        top_k=options.top_k, n_intervals=options.n_intervals, interval_k=options.interval_k,
        window_before=options.window_before, window_after=options.window_after, logit_k=options.logit_k,
        n_neighbours=options.n_neighbours, seq_len=T, n_sequences=N, exclude_bos=options.exclude_bos,
        exclude_special=options.exclude_special,
        n_align=options.n_align, n_corr_neurons=options.n_corr_neurons if options.neuron_correlations else 0,
        n_corr_candidates=options.corr_candidates, n_corr_features=options.n_corr_features,
        diff_shared_lo=float(options.diff_shared[0]), diff_shared_hi=float(options.diff_shared[1]),
        next_token_effects=options.next_token_effects,
        latent_scaling=latent_scaling_enabled(crosscoder, options, first, stop),
        outlier_factor=float(options.outlier_factor),
    )
    inputs_fp = inputs_fingerprint(crosscoder, models.sources, tokens, options, settings, dtype)
    fp = fingerprint(inputs_fp, first, stop, among)
    if comm is not None and len(set(comm.all_gather(fp))) > 1:
        raise AtlasError("the torchrun ranks were given different inputs (checkpoint, corpus or options): "
                         "start every rank with the same atlas command and files")
    n_batches = -(-N // options.batch_size)
    job = split_range(0, n_batches, *shard) if shard is not None else (0, n_batches)
    mine = split_range(*job, comm.rank, comm.world) if comm is not None else job
    return Plan(crosscoder=crosscoder, models=models, tokens=tokens, options=options, settings=settings,
                device=device, dtype=dtype, first=first, stop=stop, among=among, inputs_fingerprint=inputs_fp,
                fingerprint=fp, job=job, mine=mine, comm=comm, shard=shard)


def _reusable(plan: Plan, cache_dir: Path):
    """The manifest of a finished result of the same inputs in ``cache_dir`` (cache or shard), else None."""
    found = None
    if plan.lead:
        if plan.shard is not None:
            from .merge import finished_shard

            found = finished_shard(cache_dir, plan.fingerprint, plan.shard)
        else:
            found = _cached_manifest(cache_dir, plan.fingerprint)
    if plan.comm is not None:
        found = plan.comm.broadcast(found)
    if found is not None:
        what = f"shard {plan.shard[0]}/{plan.shard[1]}" if plan.shard else "analysis cache"
        plan.say(f"atlas: the {what} in {cache_dir} was made from the same inputs; reusing it")
        if plan.lead:
            shutil.rmtree(Path(cache_dir) / STATE_DIR, ignore_errors=True)
    return found


def _resume(plan: Plan, cache_dir: Path):
    """``(summaries, next batch, stored (input scale, threshold) or None)``: from this process's resume file,
    or fresh."""
    summaries = plan.new_summaries()
    path = plan.state_path(cache_dir)
    state = _load_state(path, plan.fingerprint, plan.device)
    cc = plan.crosscoder
    if state is not None and cc.activation == "batchtopk" and cc.threshold is None and state.get("threshold") is None:
        state = None  # written without the estimated threshold this run needs: start over
    if state is not None and state.get("batches", list(plan.mine)) == list(plan.mine) \
            and plan.mine[0] <= int(state["batches_done"]) <= plan.mine[1]:
        summaries.load_state_dict(state["summaries"])
        done = int(state["batches_done"])
        who = f" on rank {plan.comm.rank}" if plan.comm is not None else ""
        print(f"atlas: resuming the analysis{who} after batch {done} (from {path})")
        return summaries, done, (state["input_scale"], state.get("threshold"))
    return summaries, plan.mine[0], None


def _extracted(plan: Plan, batches):
    """``(b, lo, hi, x)`` for each batch index ``b`` in ``batches``: the sources' activations of its sequences."""
    for b in batches:
        lo, hi = plan.sequences(b)
        ids = plan.tokens[lo:hi]
        x = plan.models.extract(ids, torch.ones_like(ids))
        # a trace leaves reference cycles (NNsight's tracer objects) that hold the batch's tensors: free
        # them now, so that peak memory does not depend on when Python's cycle collector next runs
        gc.collect(0)
        _check_finite(x, "the models' activations", lo, hi, "try --dtype float32")
        yield b, lo, hi, x


def _estimates(plan: Plan, stored, stream):
    """``(input scale [S], BatchTopK threshold or None, stream)``: the checkpoint's values, the resume
    file's (``stored`` = ``(scale, threshold)``), or estimated over the corpus's first ``scale_batches``
    batches, whoever analyses them: this process's own batches among them are held and analysed right
    after (no extra forward); batches of another shard are extracted for the estimate only; torchrun
    ranks exchange their per-batch values. Every process thus uses the values a single run would.

    The input scale is ``sqrt(d) / mean‖x‖`` per source over the counted non-BOS tokens. A BatchTopK
    crosscoder saved without its inference threshold (crosscode) gets the one its trainers estimate: per
    batch of n such tokens, the (k·n)-th largest activation among all features (what batch-level top-k
    keeps at least), averaged over the batches (:func:`batch_topk_thresholds`).
    """
    cc, models = plan.crosscoder, plan.models
    scale = cc.input_scale if cc.input_scale is not None else (
        torch.ones(cc.n_sources) if cc.input_norm is not None else None)  # normalised per token already
    want_threshold = cc.activation == "batchtopk" and cc.threshold is None
    if scale is not None and not want_threshold:
        return scale, cc.threshold, stream
    n_est = min(plan.options.scale_batches, plan.n_batches)
    stored_scale, stored_threshold = stored if stored is not None else (None, None)
    held, batches = [], []
    if stored is None:  # a fresh start: this process's stream begins at its first batch
        held = list(itertools.islice(stream, max(0, min(plan.mine[1], n_est) - plan.mine[0])))
        outside = [b for b in range(n_est) if not plan.job[0] <= b < plan.job[1]] if plan.lead else []
        batches = [(b, x, counted_mask(plan.tokens[lo:hi], models.bos_token_id, True))
                   for b, lo, hi, x in held + list(_extracted(plan, outside))]
    if scale is None:
        contributions = {b: scale_contribution(x, mask) for b, x, mask in batches}
        stored_scale, contributions = _agree(plan, stored_scale, contributions)
        if stored_scale is not None:
            scale = stored_scale
        else:
            scale, n_tok = combine_scale([contributions[b] for b in range(n_est)], cc.d_model)
            shown = ", ".join(f"{v:.4g}" for v in scale.tolist())
            plan.say(f"atlas: the checkpoint has no input scale; estimated sqrt(d)/mean‖x‖ = [{shown}] per "
                     f"source over {n_tok:,} tokens (pass --scale to set it)")
    threshold = cc.threshold
    if want_threshold:
        weights = dataclasses.replace(cc, input_scale=torch.as_tensor(scale, dtype=torch.float32))
        values = batch_topk_thresholds(weights, [(x, mask) for _, x, mask in batches], plan.device, plan.dtype)
        contributions = {b: v for (b, _, _), v in zip(batches, values)}
        stored_threshold, contributions = _agree(plan, stored_threshold, contributions)
        if stored_threshold is not None:
            threshold = torch.as_tensor(stored_threshold, dtype=torch.float32)
        else:
            values = [contributions[b] for b in range(n_est)]
            threshold = torch.tensor(sum(values) / len(values), dtype=torch.float32)
            plan.say(f"atlas: the BatchTopK checkpoint has no inference threshold; estimated {float(threshold):.4g} "
                     f"(k = {cc.k} per token on average) over the first {n_est} batches")
    return scale, threshold, itertools.chain(held, stream)


def _agree(plan: Plan, stored, contributions: dict):
    """Under torchrun, every rank's ``(stored value, per-batch contributions)`` gathered: the first stored
    value any rank has, and the union of the contributions. Otherwise the arguments unchanged."""
    if plan.comm is None:
        return stored, contributions
    gathered = plan.comm.all_gather((stored, contributions))
    stored = next((s for s, _ in gathered if s is not None), None)
    return stored, {b: c for _, part in gathered for b, c in part.items()}


def batch_topk_thresholds(crosscoder, batches: list, device, dtype, block: int = 4096) -> list[float]:
    """Per batch ``(x, mask)``, the activation batch-level top-k keeps at least: with ``n`` tokens in
    ``mask`` and ``k = crosscoder.k``, the (k·n)-th largest of the activations (relu of the
    pre-activation, times ``act_scale`` where set) of every feature at those tokens, 0 when fewer are
    positive. Computed over blocks of features (each moved to the device once for all batches) with a
    running top-(k·n) per batch, in the encode's device and dtype."""
    xs = [x.reshape(-1, *x.shape[2:])[mask.reshape(-1).to(x.device)].to(device) for x, mask in batches]
    wants = [int(crosscoder.k) * x.shape[0] for x in xs]
    best = [torch.empty(0, dtype=dtype, device=device) for _ in xs]
    F = crosscoder.n_features
    for lo in range(0, F, block):
        part = slice_features(crosscoder, min(block, F - lo), lo)
        part = dataclasses.replace(part, activation="relu", threshold=None).to(device=device, dtype=dtype)
        for i, (x, want) in enumerate(zip(xs, wants)):
            if want == 0:
                continue
            acts = part.encode(x).reshape(-1)  # relu(pre) × act_scale
            merged = torch.cat([best[i], acts.topk(min(want, acts.numel())).values])
            best[i] = merged.topk(min(want, merged.numel())).values
    return [float(b[want - 1]) if want and b.numel() >= want else 0.0 for b, want in zip(best, wants)]


class ReconstructionInputs:
    """For latent scaling: a batch's crosscoder inputs ``h`` and reconstructions ``ĥ`` (float32
    ``[B·T, S, d]``, as the crosscoder sees them) and the decoder coefficients of the analysed latents'
    active entries (:meth:`atlas.stats.FeatureSummaries.update`'s ``scaling``).

    The reconstruction needs every latent's activation: when only a slice of the dictionary is analysed,
    the whole dictionary is encoded again (``whole``), at about the cost of a second encode."""

    def __init__(self, encode: FeatureEncoder, crosscoder, device, dtype):
        self.encode = encode
        full = encode.first == 0 and encode.stop == crosscoder.n_features
        self.whole = encode if full else FeatureEncoder(crosscoder, 0, crosscoder.n_features, device, dtype)
        cc = self.whole.crosscoder
        self.W_all, self.b_dec = cc.W_dec, cc.b_dec
        self.act_scale = None if cc.act_scale is None else cc.act_scale.float()
        self.first = encode.first

    def _coef(self, feat: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        return vals if self.act_scale is None else vals / self.act_scale.index_select(0, feat).clamp_min(1e-12)

    def for_batch(self, x: torch.Tensor, counted: torch.Tensor):
        """The ``scaling`` callback for the batch ``x[B, T, S, d]`` with counted tokens ``counted[B, T]``."""
        from .stats.latent_scaling import reconstruct
        from .stats.summaries import positive_entries

        B, T, S, d = x.shape
        cc = self.whole.crosscoder
        h = cc.model_input(x.reshape(B * T, S, d)).float()

        def scaling(nz_tok, nz_f, nz_vals):
            if self.whole is self.encode:
                tok, feat, vals = nz_tok, nz_f, nz_vals
            else:
                acts = self.whole(x).reshape(B * T, -1)
                acts[~counted.reshape(-1).to(acts.device)] = 0
                tok, feat, vals = positive_entries(acts)
                del acts
            recon = reconstruct(h, tok, feat, self._coef(feat, vals), self.W_all, self.b_dec)
            coef = self._coef(nz_f + self.first, nz_vals)
            return h, recon, self.encode.W_dec, coef

        return scaling


def _fold(plan: Plan, summaries, stream, encode, state_path: Path, estimates: tuple, first_batch: int) -> None:
    """Encode each extracted batch and fold it into ``summaries``; save the resume file on the way."""
    from tqdm.auto import tqdm

    T, B, N = plan.tokens.shape[1], plan.options.batch_size, plan.tokens.shape[0]
    lo_seq = min(plan.mine[0] * B, N)
    hi_seq = max(lo_seq, min(plan.mine[1] * B, N))
    bar = tqdm(total=(hi_seq - lo_seq) * T, initial=(min(first_batch * B, hi_seq) - lo_seq) * T, unit="tok",
               unit_scale=True, desc="analysing", disable=not (plan.options.progress and plan.lead),
               file=sys.stderr, dynamic_ncols=True)
    since_save, done = 0, first_batch
    corpus_of = plan.corpus_ids
    special_ids = plan.models.special_ids
    recon = None
    if summaries.latent is not None:
        recon = ReconstructionInputs(encode, dataclasses.replace(plan.crosscoder, input_scale=estimates[0],
                                                                 threshold=estimates[1]), plan.device, plan.dtype)

    def save(batches: int) -> None:
        save_torch_atomic(state_path, {"fingerprint": plan.fingerprint, "batches_done": batches,
                                 "batches": list(plan.mine), "input_scale": estimates[0], "threshold": estimates[1],
                                 "summaries": summaries.state_dict()})

    try:
        for b_idx, lo, hi, x in stream:
            acts = encode(x)
            _check_finite(acts, "the crosscoder's feature activations", lo, hi,
                          "check the checkpoint's weights and the input scale (--scale)")
            counted = counted_mask(plan.tokens[lo:hi], plan.models.bos_token_id, plan.options.exclude_bos,
                                   plan.models.special_ids if plan.options.exclude_special else ()
                                   ).to(acts.device)
            special = special_mask(plan.tokens[lo:hi], plan.models.bos_token_id, plan.options.exclude_bos,
                                   special_ids)
            done = None  # the summaries are mid-update until the batch is folded in
            scaling = recon.for_batch(x, counted) if recon is not None else None
            summaries.update(acts, counted, seq_offset=lo, x=x, scaling=scaling,
                             corpus=corpus_of[lo:hi].to(acts.device), special=special)
            done = b_idx + 1
            del acts, x, scaling
            bar.update((hi - lo) * T)
            since_save += 1
            if since_save >= plan.options.save_every and done < plan.mine[1]:
                save(done)
                since_save = 0
    except KeyboardInterrupt:
        if done is not None and since_save:  # interrupted between batches: keep every finished batch
            save(done)
        raise
    finally:
        bar.close()


@dataclass
class FinishInputs:
    """What finishing needs besides the summaries, taken from the weights and the models.

    ``W_dec[n, S, d]`` (float32) are the analysed features' decoder rows, ``unembeddings`` the sources'
    folded unembeddings (:meth:`atlas.models.ModelSet.unembeddings`), ``neighbours`` precomputed
    nearest neighbours (feature slices, searched among the whole dictionary) or None (searched among
    the analysed features when finishing), ``outliers[S, d]`` the outlier dimensions of the whole
    dictionary's decoder (:func:`atlas.stats.outlier_dims`; None: found among the analysed features).
    A ``--shard`` writes them (shard 0) so that ``atlas merge`` finishes exactly as an analysis does,
    without the models.
    """

    W_dec: torch.Tensor
    unembeddings: list
    neighbours: dict | None
    vocab: list
    outliers: np.ndarray | None = None


def finish_inputs(plan: Plan, encode: "FeatureEncoder") -> FinishInputs:
    W_dec = encode.W_dec.float()
    neighbours = None
    if plan.first != 0 or plan.among != plan.stop:
        neighbours = neighbours_in_dictionary(plan.crosscoder.W_dec[: plan.among], plan.first, plan.stop,
                                              plan.settings.n_neighbours, plan.device, plan.dtype)
    else:  # computed before the pass (feature-correlation candidates)
        neighbours = {k: v[:, :plan.settings.n_neighbours] for k, v in plan.local_neighbours().items()}
    from .stats import outlier_dims

    # over the whole dictionary, so that every feature slice leaves out the same dimensions
    outliers = outlier_dims(plan.crosscoder.W_dec, plan.settings.outlier_factor)
    return FinishInputs(W_dec=W_dec, unembeddings=plan.models.unembeddings(), neighbours=neighbours,
                        vocab=plan.models.vocab(), outliers=outliers)


def neighbours_in_dictionary(W_all: torch.Tensor, first: int, stop: int, n: int, device, dtype,
                             max_elements: int = 2**24) -> dict:
    """Nearest neighbours by decoder cosine of features ``first .. stop-1`` among all rows of ``W_all``.

    Like :func:`atlas.stats.nearest_neighbours` (ids are those of ``W_all``, -1 / NaN where fewer than
    ``n`` others exist), but for a slice of rows, with the candidates streamed in column blocks (a
    running top-n), so neither the whole decoder nor a ``[rows, F]`` block need be on the device at once.
    """
    F = W_all.shape[0]
    R = stop - first
    m = min(n, F - 1)
    ids = np.full((R, n), -1, dtype=np.int32)
    cos = np.full((R, n), np.nan, dtype=np.float32)
    if m <= 0 or R <= 0:
        return {"neighbours": ids, "neighbour_cos": cos}

    def unit(a: int, b: int) -> torch.Tensor:
        flat = W_all[a:b].to(device=device, dtype=dtype).reshape(b - a, -1).float()
        return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)

    D = W_all[0].numel()
    rows = max(1, min(R, max_elements // max(F, D)))
    cols = max(1, min(F, max_elements // max(rows, D)))
    for r0 in range(first, stop, rows):
        r1 = min(r0 + rows, stop)
        u = unit(r0, r1)
        best_v = torch.full((r1 - r0, m), -torch.inf, device=u.device)
        best_i = torch.full((r1 - r0, m), -1, dtype=torch.int64, device=u.device)
        for c0 in range(0, F, cols):
            c1 = min(c0 + cols, F)
            sims = u @ unit(c0, c1).T
            own = torch.arange(r0, r1, device=u.device)
            inside = (own >= c0) & (own < c1)
            sims[inside.nonzero(as_tuple=True)[0], own[inside] - c0] = -torch.inf
            cand_i = torch.arange(c0, c1, device=u.device).expand(r1 - r0, -1)
            v, j = torch.cat([best_v, sims], 1).topk(m, dim=1)
            best_i = torch.cat([best_i, cand_i], 1).gather(1, j)
            best_v = v
        ids[r0 - first:r1 - first, :m] = best_i.cpu().numpy()
        cos[r0 - first:r1 - first, :m] = best_v.cpu().numpy()
    return {"neighbours": ids, "neighbour_cos": cos}


def make_manifest(plan: Plan, input_scale, threshold, widths, n_tokens: int) -> "cache_format.Manifest":
    cc = plan.crosscoder
    batchtopk = {}
    if cc.activation == "batchtopk":
        batchtopk = {"batchtopk_threshold": float(threshold), "batchtopk_threshold_estimated": cc.threshold is None}
    return cache_format.Manifest(
        sources=[cache_format.SourceInfo(model=s.model, site=s.site, d_model=w)
                 for s, w in zip(plan.models.sources, widths)],
        n_features=plan.n_features, n_tokens=n_tokens, n_sequences=plan.tokens.shape[0], settings=plan.settings,
        checkpoint={
            "path": str(cc.path), "format": cc.format, "activation": cc.activation,
            "n_features_total": cc.n_features, "input_scale": [float(v) for v in torch.as_tensor(input_scale).tolist()],
            "input_scale_estimated": bool(cc.input_scale is None), "dtype": str(plan.dtype).replace("torch.", ""),
            "fingerprint": plan.fingerprint, "inputs_fingerprint": plan.inputs_fingerprint,
            "neighbours_among": plan.among,
        } | batchtopk,
        dataset=plan.options.dataset, feature_offset=plan.first,
        corpora=[dict(c) for c in plan.options.corpora],
        special_ids=sorted(int(i) for i in plan.models.special_ids),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def assemble(summaries, inputs: FinishInputs, manifest, tokens, logit_hist_bins: int) -> "cache_format.Cache":
    """The cache: the summaries' arrays, decoder geometry, neighbours and logit effects (``manifest`` is
    completed with the number of counted tokens)."""
    from .stats import (decoder_norms, example_windows, logit_effects, nearest_neighbours, neuron_alignment,
                        outlier_dims, outlier_share)

    settings = manifest.settings
    arrays = summaries.finalize(W_dec=inputs.W_dec)
    if "fcorr_ids" in arrays:  # candidate ids are local to the analysed features
        arrays["fcorr_ids"] = np.where(arrays["fcorr_ids"] >= 0, arrays["fcorr_ids"] + manifest.feature_offset,
                                       -1).astype(np.int32)
    W_dec = inputs.W_dec
    neighbours = inputs.neighbours or nearest_neighbours(W_dec, settings.n_neighbours)
    geometry = decoder_norms(W_dec, settings.diff_shared_lo, settings.diff_shared_hi) | neighbours
    # outlier dimensions are flagged, and left out of the alignment ranking and the logit tables
    flagged = inputs.outliers if inputs.outliers is not None else outlier_dims(W_dec, settings.outlier_factor)
    manifest.outlier_dims = [np.flatnonzero(row).tolist() for row in flagged]
    if settings.n_align > 0:
        geometry |= neuron_alignment(W_dec, settings.n_align, exclude=flagged)
    windows = example_windows(arrays, settings.next_token_effects)
    logits = logit_effects(W_dec, inputs.unembeddings, settings.logit_k, logit_hist_bins, windows=windows,
                           tokens=tokens, window_before=settings.window_before, exclude=flagged)
    logits["outlier_share"] = outlier_share(W_dec, flagged)
    arrays |= {name: logits.pop(name) for name in windows}
    corpus_ids = None
    corpus_tokens = arrays.pop("corpus_n_tokens")
    if manifest.corpora:  # named corpora: per-corpus statistics and the sequences' corpus index
        from .corpus import corpus_ids as ids_of

        for c, n in zip(manifest.corpora, corpus_tokens.tolist()):
            c["n_tokens"] = int(n)
        corpus_ids = ids_of(manifest.corpora, np.asarray(tokens).shape[0])
    else:
        arrays.pop("corpus_n_active", None)
        arrays.pop("corpus_max_act", None)
    feature_stats = _fill(cache_format.FeatureStats, arrays | geometry)
    examples = _fill(cache_format.Examples, arrays)
    manifest.n_tokens = int(summaries.scalars.n_tokens)
    return cache_format.Cache(manifest=manifest, vocab=list(inputs.vocab), tokens=np.asarray(tokens),
                              features=feature_stats, examples=examples,
                              logits=cache_format.LogitEffects(**logits), corpus_ids=corpus_ids)


def _fill(cls, arrays: dict):
    """``cls`` (a cache dataclass) from the arrays named by its fields; optional fields not computed stay None."""
    return cls(**{f.name: arrays[f.name] for f in dataclasses.fields(cls) if f.name in arrays})


def write_analysis_cache(cache_dir: Path, cache: "cache_format.Cache") -> None:
    """Write ``cache`` to ``cache_dir``; an old complete cache there is first marked incomplete."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if (cache_dir / "manifest.json").exists():  # an old complete cache must not pass for the new one
        cache_format.atomic_write_json(cache_dir / "manifest.json", cache.manifest.to_json())
    cache_format.write_cache(cache_dir, cache)


def _report(cache: "cache_format.Cache", cache_dir: Path, seconds: float) -> None:
    fs, m = cache.features, cache.manifest
    dead = int((fs.n_active == 0).sum())
    dense = int((fs.density > 0.1).sum())
    which = f"{m.n_features:,} features" if not m.feature_offset else \
        f"{m.n_features:,} features ({m.feature_offset}..{m.feature_offset + m.n_features - 1})"
    l0 = float(fs.density.astype(np.float64).sum())  # active features per counted token, on average
    print(f"atlas: analysed {which} over {m.n_tokens:,} tokens: {dead:,} dead (never active), "
          f"{dense:,} dense (density > 10%), {l0:.1f} active per token (mean L0), in {seconds:.1f} s; "
          f"cache {_folder_bytes(cache_dir) / 1e6:.1f} MB in {cache_dir}")


@torch.inference_mode()
def run_analysis(crosscoder, models, tokens: torch.Tensor, options: AnalysisOptions, cache_dir: Path,
                 device, dtype, *, comm=None, shard: tuple[int, int] | None = None) -> "cache_format.Manifest":
    """Analyse ``tokens`` and write the cache to ``cache_dir``; returns its manifest (see module docstring).

    ``comm`` (:class:`atlas.distributed.Comm`): this is one torchrun rank; ranks split the batches, rank 0
    writes. ``shard`` = ``(K, N)``: analyse the K-th of N parts of the batches and write a shard
    (:mod:`atlas.merge`) instead of a cache; the returned manifest then covers that shard only.
    """
    start = time.perf_counter()
    cache_dir = Path(cache_dir)
    plan = prepare(crosscoder, models, tokens, options, device, dtype, comm=comm, shard=shard)
    if options.reuse:
        reused = _reusable(plan, cache_dir)
        if reused is not None:
            _all_ranks_done(plan)
            return reused

    # stream this process's batches into its summaries (resuming after the last saved batch)
    summaries, next_batch, stored = _resume(plan, cache_dir)
    stream = _extracted(plan, range(next_batch, plan.mine[1]))
    input_scale, threshold, stream = _estimates(plan, stored, stream)
    input_scale = torch.as_tensor(input_scale, dtype=torch.float32).cpu()
    encode = FeatureEncoder(dataclasses.replace(crosscoder, input_scale=input_scale, threshold=threshold),
                            plan.first, plan.stop, device, dtype)
    _fold(plan, summaries, stream, encode, plan.state_path(cache_dir), (input_scale, threshold), next_batch)

    # combine the ranks' summaries on rank 0, which finishes: a shard, or the cache
    if comm is not None:
        comm.reduce_summaries(summaries, plan.new_summaries)
    result = None
    if plan.lead:
        # weight-derived inputs: a shard other than the first leaves them to shard 0
        inputs = finish_inputs(plan, encode) if shard is None or shard[0] == 0 else None
        manifest = make_manifest(plan, input_scale, threshold, plan.models.widths, int(summaries.scalars.n_tokens))
        if shard is not None:
            from .merge import write_shard

            result = write_shard(cache_dir, plan, summaries, inputs, manifest)
        else:
            cache = assemble(summaries, inputs, manifest, plan.tokens.numpy(), options.logit_hist_bins)
            write_analysis_cache(cache_dir, cache)
            result = cache.manifest
            _report(cache, cache_dir, time.perf_counter() - start)
    if comm is not None:
        result = comm.broadcast(result)
    plan.state_path(cache_dir).unlink(missing_ok=True)
    _all_ranks_done(plan)
    if plan.lead:
        shutil.rmtree(cache_dir / STATE_DIR, ignore_errors=True)
    return result


def _all_ranks_done(plan: Plan) -> None:
    """Under torchrun, wait until every rank is here, so that the ranks leave the process group together:
    every transfer of the run is complete (and every rank's resume file removed) before any rank tears
    down its connections. Ranks that finish early (an empty range of batches, a short last share) no
    longer leave while rank 0 still writes the cache and its peers finish the last collective."""
    if plan.comm is not None:
        plan.comm.barrier()
