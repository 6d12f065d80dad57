"""The pipeline, read top to bottom: load → validate → analyze → write → verify.

``atlas build`` = ``atlas analyze`` (torch, models, corpus → cache) followed by ``atlas render``
(cache → site). Heavy imports happen inside the functions so that ``render`` never imports torch.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from .errors import AtlasError, os_error
from .lifetimes import frozen, paused

# what a folder that already holds an analysis cache (complete or interrupted) contains
_CACHE_ENTRIES = ("manifest.json", "state", "vocab.json", "tokens.npy", "features.npz", "examples.npz", "logits.npz",
                  "corpus_ids.npy")


def _cache_dir_for(args) -> Path:
    if getattr(args, "cache", None):
        return Path(args.cache)
    out = Path(args.output)
    return out.parent / (out.name + ".atlas-data")


def check_writable(folder: Path) -> None:
    """Raise AtlasError unless files can be created in ``folder`` (or, when it does not exist yet, in its
    nearest existing parent); nothing is left behind."""
    probe = Path(folder).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise AtlasError(f"{probe} is a file, so {folder} cannot be created: pass -o/--output with a folder path")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".atlas-write-test-"):
            pass
    except OSError as exc:  # reported for the folder, not for the probe file's random name
        raise os_error(OSError(exc.errno, exc.strerror), probe) from None


def check_cache_folder(cache_dir: Path) -> None:
    """Raise AtlasError when ``cache_dir`` is a file or a non-empty folder that holds no analysis cache."""
    cache_dir = Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise AtlasError(f"the analysis cache path {cache_dir} is a file: pass another folder "
                         "(-o/--output for atlas analyze, --cache for atlas build)")
    if cache_dir.is_dir():
        names = {p.name for p in cache_dir.iterdir()}
        if names and not names & set(_CACHE_ENTRIES):
            raise AtlasError(f"the folder {cache_dir} is not empty and holds no analysis cache (no manifest.json): "
                             "pass an empty or new folder (-o/--output for atlas analyze, --cache for atlas "
                             f"build), or remove {cache_dir} first")
    check_writable(cache_dir)


def check_features_alive(cache_dir: Path, manifest) -> None:
    """Raise AtlasError when no analysed feature ever fired (the cache stays, for `atlas render`)."""
    import numpy as np

    with np.load(Path(cache_dir) / "features.npz", allow_pickle=False) as z:
        n_active = z["n_active"]
    if n_active.size and not n_active.any():
        total = int(manifest.checkpoint.get("n_features_total", n_active.size))
        more = f", or --n-features 0 to analyse all {total:,} features" if total > n_active.size else ""
        raise AtlasError(
            f"all {n_active.size:,} analysed features are dead (never active over {manifest.n_tokens:,} tokens): "
            "the models, hook point or input scale do not match what the crosscoder was trained on; check them "
            f"with `atlas inspect` and pass --model, --hook-point or --scale{more} (`atlas render {cache_dir}` "
            "shows this analysis anyway)"
        )


DEFAULT_N_SAMPLES = 100


def n_samples_of(args) -> int:
    """``-s/--n-samples``, or its default: 100, or ``DEMO_N_SAMPLES`` for the demo (no checkpoint argument)."""
    if getattr(args, "n_samples", None) is not None:
        return args.n_samples
    if getattr(args, "checkpoint", None) is None:
        from .demo import DEMO_N_SAMPLES

        return DEMO_N_SAMPLES
    return DEFAULT_N_SAMPLES


def dataset_label(datasets: list[str] | None) -> str:
    """``Manifest.dataset``: the ``--dataset`` values as given, or the demo's corpora."""
    if not datasets:
        return "demo corpora (english, python)"
    return ", ".join(datasets)


def analyze_command(args, cache_dir: Path | None = None):
    """Load the checkpoint, the models and the corpus; analyse; write the cache. Returns its Manifest."""
    with paused():  # torch and the analysis modules (atlas.lifetimes)
        from . import distributed
        from .analyze import check_counts, check_outlier_factor, parse_feature_range, parse_shard, parse_shared_range

    cache_dir = Path(cache_dir or args.output)
    features = parse_feature_range(args.features) if args.features is not None else None
    # bad option values fail before any model is loaded
    shared_range = parse_shared_range(args.shared_range)
    check_counts(args.top_k, args.corr_features, args.corr_candidates)
    check_outlier_factor(args.outlier_factor)
    from .corpus import parse_datasets

    parse_datasets(args.dataset)
    shard = parse_shard(args.shard) if getattr(args, "shard", None) is not None else None
    if shard is not None:
        from .merge import check_shard_folder

        check_shard_folder(cache_dir)
    # under torchrun: join the process group; this rank runs on cuda:LOCAL_RANK (or the cpu)
    comm, device_arg = distributed.from_environment(args.device)
    try:
        manifest = _analyze(args, cache_dir, comm, device_arg, features, shard, shared_range)
    finally:
        distributed.shutdown(comm)
    return manifest


def _analyze(args, cache_dir: Path, comm, device_arg, features, shard, shared_range):
    from .analyze import AnalysisOptions, default_batch_size, run_analysis
    from .checkpoints import load_checkpoint
    from .corpus import load_corpora
    from .models import load_models, pick_device

    if shard is None:
        check_cache_folder(cache_dir)
    if args.save_every < 1:
        raise AtlasError(f"--save-every must be at least 1 (got {args.save_every})")
    device, dtype = pick_device(device_arg, args.dtype)

    # load
    with paused():  # imports and loading: long-lived objects, no garbage (atlas.lifetimes)
        crosscoder = load_checkpoint(args.checkpoint, models=args.model, hook_point=args.hook_point,
                                     scale=args.scale)
        models = load_models(crosscoder.sources, device=device, dtype=dtype, remote=args.remote)
        split = load_corpora(args.dataset, models.tokenizer, n_sequences=n_samples_of(args),
                             seq_len=args.seq_len, text_column=args.text_column, seed=args.seed)
        tokens = split.tokens

    # validate
    models.check_compatible(crosscoder)

    # analyze + write (the cache is written atomically and resumes an interrupted run)
    batch_size = args.batch_size
    if batch_size is None:
        batch_size = default_batch_size(device, args.seq_len, crosscoder.n_features, dtype)
    options = AnalysisOptions(
        n_features=args.n_features,
        batch_size=batch_size,
        top_k=args.top_k,
        exclude_bos=not args.include_bos,
        exclude_special=args.exclude_special,
        neuron_correlations=not args.no_neuron_correlations,
        next_token_effects=args.next_token_effects,
        latent_scaling=args.latent_scaling,
        outlier_factor=args.outlier_factor,
        n_corr_features=args.corr_features,
        corr_candidates=args.corr_candidates,
        diff_shared=shared_range,
        seed=args.seed,
        dataset=dataset_label(args.dataset),
        corpora=tuple(split.corpora),
        save_every=args.save_every,
        features=features,
    )
    with frozen():  # the modules, models and tokenizer loaded above live until the end (atlas.lifetimes)
        manifest = run_analysis(crosscoder, models, tokens, options, cache_dir, device=device, dtype=dtype,
                                comm=comm, shard=shard)
    if shard is None and (comm is None or comm.rank == 0):  # a shard has no features.npz; rank 0 wrote the cache
        check_features_alive(cache_dir, manifest)
    return manifest


def merge_command(args):
    """``atlas merge``: shards and feature slices → one complete cache. Returns its Manifest."""
    from .merge import merge_folders

    check_cache_folder(Path(args.output))
    return merge_folders([Path(p) for p in args.inputs], Path(args.output), device=args.device)


def render_command(args, cache_dir: Path | None = None):
    """Read the cache and write the site atomically. Returns the render summary."""
    from .render import render_site
    from .render.output import check_output

    cache_dir = Path(cache_dir or args.cache)
    check_output(Path(args.output))
    check_writable(Path(args.output).absolute().parent)
    return render_site(cache_dir, Path(args.output), title=args.title, labels=args.labels,
                       site_url=getattr(args, "site_url", None), min_active=getattr(args, "min_active", 10))


def inspect_command(args) -> None:
    from .checkpoints import describe_checkpoint

    print(describe_checkpoint(args.checkpoint, models=args.model, hook_point=args.hook_point,
                              scale=args.scale))


def _torchrun_rank() -> int:
    from .distributed import launched

    return int(os.environ["RANK"]) if launched() else 0


def build(args) -> None:
    """``atlas build``: analyse, render, verify, and print where the site is."""
    from .render.output import check_output
    from .render.verify import verify_site

    start = time.perf_counter()
    cache_dir = _cache_dir_for(args)
    check_output(Path(args.output))  # before the analysis: a refused output folder must not cost a run
    check_writable(Path(args.output).absolute().parent)
    with frozen():  # the analysis freezes what it loads; it stays frozen through render and verification
        manifest = analyze_command(args, cache_dir)
        if _torchrun_rank() > 0:  # under torchrun rank 0 renders; the other ranks are done
            return
        summary = render_command(args, cache_dir)
        problems = verify_site(Path(args.output))
    if problems:
        raise AtlasError("the written site failed verification: " + "; ".join(problems[:5]))
    elapsed = time.perf_counter() - start
    index = Path(args.output).resolve() / "index.html"
    print(
        f"\nAtlas written: {summary.n_features} features, {summary.n_files} files, "
        f"{summary.total_bytes / 1e6:.1f} MB, in {elapsed:.0f} s"
        f" ({manifest.n_tokens:,} tokens analysed)\n"
        f"  open   {index.as_uri()}\n"
        f"  serve  atlas serve {args.output}"
    )
