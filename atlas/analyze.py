"""The analysis stage: stream the corpus through the models and the crosscoder, write the cache.

``run_analysis`` (called by :mod:`atlas.build`) reads batches of sequences, extracts every source's
activations (:meth:`atlas.models.ModelSet.extract`), encodes them, and folds each batch into mergeable
summaries on the device (:mod:`atlas.stats`); the batch is then dropped, so memory does not grow with
the corpus. At the end it adds the weight-derived statistics (decoder geometry, logit effects) and
writes the cache folder (:mod:`atlas.cache`).

Resume files (read and written here only): ``<cache>/state/summaries.pt``, a ``torch.save`` dict with
``fingerprint`` (hash of every input that shapes the result), ``batches_done``, ``input_scale`` and the
summaries' ``state_dict``. It is replaced atomically every ``save_every`` batches; a rerun with the same
inputs continues after the last saved batch and ends with the same cache as an uninterrupted run. The
folder is removed once the cache is complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import cache as cache_format
from .errors import AtlasError

STATE_DIR = "state"
STATE_FILE = "summaries.pt"


@dataclass
class AnalysisOptions:
    """What to compute. ``n_features`` 0 means all features; the first ``n_features`` are analysed."""

    n_features: int = 50
    batch_size: int = 16
    top_k: int = 20
    exclude_bos: bool = True
    seed: int = 0
    dataset: str = ""
    n_intervals: int = 10
    interval_k: int = 5
    window_before: int = 23
    window_after: int = 8
    logit_k: int = 10
    logit_hist_bins: int = 40
    n_neighbours: int = 10
    save_every: int = 50  # batches between resume files
    scale_batches: int = 4  # batches used to estimate a missing input scale
    progress: bool = True
    reuse: bool = True  # keep a complete cache made from the same inputs


def slice_features(crosscoder, n: int):
    """A copy of ``crosscoder`` restricted to its first ``n`` features (per-feature tensors sliced)."""
    def cut(t, axis):
        if t is None or t.ndim == 0:
            return t
        return t.narrow(axis, 0, n)

    return dataclasses.replace(
        crosscoder,
        W_enc=crosscoder.W_enc[..., :n], W_dec=crosscoder.W_dec[:n], b_enc=crosscoder.b_enc[:n],
        threshold=cut(crosscoder.threshold, 0), act_scale=cut(crosscoder.act_scale, 0),
        extra=dict(crosscoder.extra),
    )


class FeatureEncoder:
    """Encodes ``x[B, T, S, d]`` into the analysed features' activations ``[B, T, n]`` (float32).

    TopK crosscoders choose among all features, so they are encoded whole and sliced after.
    """

    def __init__(self, crosscoder, n: int, device, dtype):
        self.n = n
        whole = crosscoder.activation == "topk"
        cc = dataclasses.replace(crosscoder) if whole else slice_features(crosscoder, n)
        self.crosscoder = cc.to(device=device, dtype=dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        B, T, S, d = x.shape
        with torch.inference_mode():
            f = self.crosscoder.encode(x.reshape(B * T, S, d))[:, : self.n]
        return f.float().reshape(B, T, self.n)


def _sample_bytes(t: torch.Tensor | None, n: int = 65536) -> bytes:
    if t is None:
        return b"none"
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // n)
    return repr(tuple(t.shape)).encode() + flat[::step].float().cpu().numpy().tobytes()


def fingerprint(crosscoder, sources, tokens: torch.Tensor, options: AnalysisOptions, settings, dtype) -> str:
    """Hash of every input that shapes the analysis (weights sampled, tokens whole)."""
    from . import __version__

    h = hashlib.blake2b(digest_size=16)
    for t in (crosscoder.W_enc, crosscoder.W_dec, crosscoder.b_enc, crosscoder.b_dec, crosscoder.threshold,
              crosscoder.input_scale, crosscoder.act_scale):
        h.update(_sample_bytes(t))
    h.update(tokens.to(torch.int64).cpu().numpy().tobytes())
    meta = {
        "version": __version__, "format": cache_format.FORMAT_VERSION, "activation": crosscoder.activation,
        "k": crosscoder.k, "sources": [[s.model, s.site] for s in sources],
        "options": {k: v for k, v in dataclasses.asdict(options).items() if k not in ("progress", "reuse",
                                                                                     "save_every", "dataset")},
        "settings": dataclasses.asdict(settings), "dtype": str(dtype),
    }
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


def counted_mask(tokens: torch.Tensor, bos_token_id: int | None, exclude_bos: bool) -> torch.Tensor:
    """``[N, T]`` bool: the tokens that enter the statistics (all but BOS when it is excluded)."""
    if exclude_bos and bos_token_id is not None:
        return tokens != bos_token_id
    return torch.ones_like(tokens, dtype=torch.bool)


def _check_finite(x: torch.Tensor, what: str, lo: int, hi: int, fix: str) -> None:
    # one reduction first: NaN and inf propagate into a sum, so a finite sum proves every value finite
    if bool(torch.isfinite(x.sum(dtype=torch.float32))) or bool(torch.isfinite(x).all()):
        return
    raise AtlasError(f"{what} hold NaN or inf values in sequences {lo}..{hi - 1}: {fix}")


def estimate_input_scale(batches: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Per source ``sqrt(d) / mean ‖x‖`` over the masked tokens of activation batches ``x[B, T, S, d]``."""
    total, count = None, 0
    for x, mask in zip(batches, masks):
        norms = x.float().norm(dim=-1)[mask.to(x.device)]  # [n, S]
        total = norms.sum(0) if total is None else total + norms.sum(0)
        count += norms.shape[0]
    if not count:
        raise AtlasError("no tokens to estimate the input scale from: pass --scale, or a larger --n-samples")
    d = batches[0].shape[-1]
    return (math.sqrt(d) / (total / count)).cpu(), count


def _save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".summaries.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
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


@torch.inference_mode()
def run_analysis(crosscoder, models, tokens: torch.Tensor, options: AnalysisOptions, cache_dir: Path,
                 device, dtype) -> "cache_format.Manifest":
    """Analyse ``tokens`` and write the cache to ``cache_dir``; returns its manifest (see module docstring)."""
    from tqdm.auto import tqdm

    from .stats import FeatureSummaries, decoder_norms, logit_effects, nearest_neighbours

    start = time.perf_counter()
    cache_dir = Path(cache_dir)
    F_total = crosscoder.n_features
    if options.n_features < 0:
        raise AtlasError(f"--n-features must be 0 (all) or positive (got {options.n_features})")
    n = min(options.n_features or F_total, F_total)
    if options.batch_size < 1:
        raise AtlasError(f"--batch-size must be at least 1 (got {options.batch_size})")
    tokens = torch.as_tensor(tokens, dtype=torch.long).cpu()
    N, T = tokens.shape
    settings = cache_format.Settings(
        top_k=options.top_k, n_intervals=options.n_intervals, interval_k=options.interval_k,
        window_before=options.window_before, window_after=options.window_after, logit_k=options.logit_k,
        n_neighbours=options.n_neighbours, seq_len=T, n_sequences=N, exclude_bos=options.exclude_bos,
    )
    fp = fingerprint(crosscoder, models.sources, tokens, options, settings, dtype)
    if options.reuse:
        manifest = _cached_manifest(cache_dir, fp)
        if manifest is not None:
            print(f"atlas: the analysis cache {cache_dir} was made from the same inputs; reusing it")
            shutil.rmtree(cache_dir / STATE_DIR, ignore_errors=True)
            return manifest

    # resume, or start fresh
    state_path = cache_dir / STATE_DIR / STATE_FILE
    state = _load_state(state_path, fp, device)
    summaries = FeatureSummaries(n, settings, options.seed, device=device)
    batches_done = 0
    scale_estimated = crosscoder.input_scale is None
    input_scale = crosscoder.input_scale
    if state is not None:
        summaries.load_state_dict(state["summaries"])
        batches_done = int(state["batches_done"])
        input_scale = state["input_scale"]
        print(f"atlas: resuming the analysis after batch {batches_done} (from {state_path})")
    # stream: extract → (estimate the input scale from the first batches) → encode → fold
    starts = list(range(0, N, options.batch_size))

    def extracted(first: int):
        for b_idx in range(first, len(starts)):
            lo = starts[b_idx]
            hi = min(lo + options.batch_size, N)
            ids = tokens[lo:hi]
            x = models.extract(ids, torch.ones_like(ids))
            _check_finite(x, "the models' activations", lo, hi, "try --dtype float32")
            yield b_idx, lo, hi, x

    stream = extracted(batches_done)
    if state is None and scale_estimated and crosscoder.input_norm is not None:
        input_scale = torch.ones(crosscoder.n_sources)  # inputs are normalised per token already
    elif state is None and scale_estimated:
        held = list(itertools.islice(stream, options.scale_batches))  # analysed right after
        input_scale, n_est = estimate_input_scale(  # BOS excluded: its norm is an outlier in most models
            [x for *_, x in held], [counted_mask(tokens[lo:hi], models.bos_token_id, True) for _, lo, hi, _ in held])
        shown = ", ".join(f"{v:.4g}" for v in input_scale.tolist())
        print(f"atlas: the checkpoint has no input scale; estimated sqrt(d)/mean‖x‖ = [{shown}] per source "
              f"over {n_est:,} tokens (pass --scale to set it)")
        stream = itertools.chain(held, stream)
    crosscoder = dataclasses.replace(crosscoder, input_scale=torch.as_tensor(input_scale, dtype=torch.float32))
    encode = FeatureEncoder(crosscoder, n, device, dtype)

    bar = tqdm(total=N * T, initial=min(batches_done * options.batch_size, N) * T, unit="tok", unit_scale=True,
               desc="analysing", disable=not options.progress, file=sys.stderr, dynamic_ncols=True)
    since_save, done = 0, batches_done

    def save(batches: int) -> None:
        _save_state(state_path, {"fingerprint": fp, "batches_done": batches,
                                 "input_scale": crosscoder.input_scale, "summaries": summaries.state_dict()})

    try:
        for b_idx, lo, hi, x in stream:
            acts = encode(x)
            del x
            _check_finite(acts, "the crosscoder's feature activations", lo, hi,
                          "check the checkpoint's weights and the input scale (--scale)")
            counted = counted_mask(tokens[lo:hi], models.bos_token_id, options.exclude_bos).to(acts.device)
            done = None  # the summaries are mid-update until the batch is folded in
            summaries.update(acts, counted, seq_offset=lo)
            done = b_idx + 1
            del acts
            bar.update((hi - lo) * T)
            since_save += 1
            if since_save >= options.save_every and hi < N:
                save(done)
                since_save = 0
    except KeyboardInterrupt:
        if done is not None and since_save:  # interrupted between batches: keep every finished batch
            save(done)
        raise
    finally:
        bar.close()

    # finish: weight-derived statistics, then the cache
    arrays = summaries.finalize()
    W_dec = encode.crosscoder.W_dec[:n].float()
    geometry = decoder_norms(W_dec) | nearest_neighbours(W_dec, settings.n_neighbours)
    logits = logit_effects(W_dec, models.unembeddings(), settings.logit_k, options.logit_hist_bins)
    feature_stats = cache_format.FeatureStats(**{f.name: (arrays | geometry)[f.name]
                                                 for f in dataclasses.fields(cache_format.FeatureStats)})
    examples = cache_format.Examples(**{f.name: arrays[f.name] for f in dataclasses.fields(cache_format.Examples)})
    manifest = cache_format.Manifest(
        sources=[cache_format.SourceInfo(model=s.model, site=s.site, d_model=w)
                 for s, w in zip(models.sources, models.widths)],
        n_features=n, n_tokens=int(summaries.scalars.n_tokens), n_sequences=N, settings=settings,
        checkpoint={
            "path": str(crosscoder.path), "format": crosscoder.format, "activation": crosscoder.activation,
            "n_features_total": F_total, "input_scale": [float(v) for v in crosscoder.input_scale.tolist()],
            "input_scale_estimated": bool(scale_estimated), "dtype": str(dtype).replace("torch.", ""),
            "fingerprint": fp,
        },
        dataset=options.dataset, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    if (cache_dir / "manifest.json").exists():  # an old complete cache must not pass for the new one
        cache_format.atomic_write_json(cache_dir / "manifest.json", manifest.to_json())
    cache_format.write_cache(cache_dir, cache_format.Cache(
        manifest=manifest, vocab=models.vocab(), tokens=tokens.numpy(), features=feature_stats,
        examples=examples, logits=cache_format.LogitEffects(**logits)))
    shutil.rmtree(cache_dir / STATE_DIR, ignore_errors=True)

    dead = int((feature_stats.n_active == 0).sum())
    dense = int((feature_stats.density > 0.1).sum())
    print(f"atlas: analysed {n:,} features over {manifest.n_tokens:,} tokens: {dead:,} dead (never active), "
          f"{dense:,} dense (density > 10%), in {time.perf_counter() - start:.1f} s; "
          f"cache {_folder_bytes(cache_dir) / 1e6:.1f} MB in {cache_dir}")
    return manifest
