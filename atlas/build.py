"""The pipeline, read top to bottom: load → validate → analyze → write → verify.

``atlas build`` = ``atlas analyze`` (torch, models, corpus → cache) followed by ``atlas render``
(cache → site). Heavy imports happen inside the functions so that ``render`` never imports torch.
"""

from __future__ import annotations

import time
from pathlib import Path

from .errors import AtlasError


def _cache_dir_for(args) -> Path:
    if getattr(args, "cache", None):
        return Path(args.cache)
    out = Path(args.output)
    return out.parent / (out.name + ".atlas-data")


def analyze_command(args, cache_dir: Path | None = None):
    """Load the checkpoint, the models and the corpus; analyse; write the cache. Returns its Manifest."""
    from .analyze import AnalysisOptions, run_analysis
    from .checkpoints import load_checkpoint
    from .corpus import load_corpus
    from .models import load_models, pick_device

    cache_dir = Path(cache_dir or args.output)
    device, dtype = pick_device(args.device, args.dtype)

    # load
    crosscoder = load_checkpoint(args.checkpoint, models=args.model, hook_point=args.hook_point,
                                 scale=args.scale)
    models = load_models(crosscoder.sources, device=device, dtype=dtype)
    tokens = load_corpus(args.dataset, models.tokenizer, n_sequences=args.n_samples,
                         seq_len=args.seq_len, text_column=args.text_column, seed=args.seed)

    # validate
    models.check_compatible(crosscoder)

    # analyze + write (the cache is written atomically and resumes an interrupted run)
    options = AnalysisOptions(
        n_features=args.n_features,
        batch_size=args.batch_size,
        top_k=args.top_k,
        exclude_bos=not args.include_bos,
        seed=args.seed,
        dataset=args.dataset or "demo corpus",
    )
    return run_analysis(crosscoder, models, tokens, options, cache_dir, device=device, dtype=dtype)


def render_command(args, cache_dir: Path | None = None):
    """Read the cache and write the site atomically. Returns the render summary."""
    from .render import render_site

    cache_dir = Path(cache_dir or args.cache)
    return render_site(cache_dir, Path(args.output), title=args.title, labels=args.labels)


def inspect_command(args) -> None:
    from .checkpoints import describe_checkpoint

    print(describe_checkpoint(args.checkpoint, models=args.model, hook_point=args.hook_point,
                              scale=args.scale))


def build(args) -> None:
    """``atlas build``: analyse, render, verify, and print where the site is."""
    from .render.verify import verify_site

    start = time.perf_counter()
    cache_dir = _cache_dir_for(args)
    manifest = analyze_command(args, cache_dir)
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
