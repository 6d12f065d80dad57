"""Command-line interface: argument parsing only. Each command calls one function elsewhere."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from . import __version__
from .errors import AtlasError, os_error

DEFAULT_SITE = "site"
DEFAULT_CACHE = "atlas-data"


def _add_checkpoint_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        nargs="?",
        default=None,
        help="crosscoder or SAE checkpoint: a file, or a folder (its newest checkpoint is used); "
        "default: the demo crosscoder that ships with Crosscoder Atlas",
    )
    p.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="ID_OR_PATH",
        help="Hugging Face model id or local path, once per model in source order; overrides the "
        "checkpoint's cfg (a two-model crosscoder needs the second model here)",
    )
    p.add_argument(
        "--hook-point",
        default=None,
        metavar="NAME",
        help="hook point the crosscoder reads, e.g. blocks.6.hook_resid_post, blocks.6.hook_mlp_out, "
        "blocks.6.attn.hook_z (one head: blocks.6.attn.hook_z.head3), blocks.6.mlp.hook_post or a module path "
        "(default: from the checkpoint's cfg)",
    )
    p.add_argument(
        "--scale",
        type=float,
        action="append",
        default=None,
        metavar="X",
        help="input normalisation factor per source (once per source, or once for all); default: "
        "from the checkpoint when stored, else estimated over the corpus",
    )


def _add_analysis_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--n-features", type=int, default=50, metavar="N",
                   help="number of features to analyse and show, from the first (default: 50; 0 = all)")
    p.add_argument("-s", "--n-samples", type=int, default=None, metavar="N",
                   help="number of text sequences of the corpus to run through the models, shared equally among "
                   "the named corpora of --dataset (default: 100; 800 for the demo, i.e. without a checkpoint "
                   "argument)")
    p.add_argument("--seq-len", type=int, default=128, metavar="L",
                   help="tokens per sequence (default: 128)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="sequences per forward pass (default: 16 on a CPU; on a GPU as many as make about 32k "
                   "tokens, fewer where the batch's [tokens × features] activations would pass 4 GiB)")
    p.add_argument("--dataset", action="append", default=None, metavar="[NAME=]PATH",
                   help="corpus: a .txt/.jsonl/.json/.parquet/.csv file or a folder of them, or a "
                   "Hugging Face dataset name when the hub is reachable; repeat it as NAME=PATH to analyse "
                   "named corpora (e.g. --dataset web=a.jsonl --dataset chat=b.jsonl), each feature's density "
                   "and max then shown per corpus (default: the demo's two corpora, english and python)")
    p.add_argument("--text-column", default="text", metavar="NAME",
                   help="column holding the text in tabular datasets (default: text)")
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="dtype of the models and the crosscoder (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--top-k", type=int, default=20, metavar="K",
                   help="top activating examples kept per feature (default: 20)")
    p.add_argument("--include-bos", action="store_true",
                   help="count beginning-of-sequence tokens in the statistics (excluded by default)")
    p.add_argument("--no-neuron-correlations", action="store_true",
                   help="skip the correlated-neurons panel (saves a float32 [features × sources·d] sum on "
                   "the device: 1.8 GB at 100k features × 2 × 2304)")
    p.add_argument("--corr-features", type=int, default=10, metavar="N",
                   help="correlated features kept per feature, by Pearson correlation of activations over all "
                   "tokens (default: 10; 0 skips the panel)")
    p.add_argument("--corr-candidates", type=int, default=16, metavar="N",
                   help="how many of each feature's nearest decoder-cosine neighbours its correlations are "
                   "computed with, exactly (default: 16; more costs more per token)")
    p.add_argument("--shared-range", default="0.3:0.7", metavar="LO:HI",
                   help="relative decoder norm range of the 'shared' class of a two-source crosscoder; below "
                   "LO is model-A-only, above HI model-B-only (default: 0.3:0.7)")
    p.add_argument("--next-token-effects", choices=["top", "all", "none"], default="top",
                   help="which example windows get each token's effect on the next token's logit, shown "
                   "on hover: top examples, all (interval samples too), none (default: top)")
    p.add_argument("--latent-scaling", choices=["auto", "on", "off"], default="auto",
                   help="latent scaling of a two-model crosscoder (how much of each latent the other model "
                   "holds, docs: panels): auto computes it when every feature is analysed, on also for a "
                   "subset (the whole dictionary is then encoded twice per batch), off skips it (default: auto)")
    p.add_argument("--outlier-factor", type=float, default=5.0, metavar="X",
                   help="decoder dimensions whose RMS over all features is above X times the median "
                   "dimension's are outliers (the massive residual dimensions every decoder writes to): "
                   "flagged on the pages and left out of the logit tables and the alignment ranking "
                   "(default: 5.0; 0 keeps every dimension)")
    p.add_argument("--exclude-special", action="store_true",
                   help="leave every special token of the tokenizer (end-of-text, padding, chat-template "
                   "markers such as <|im_start|>) out of the statistics, as BOS is")
    p.add_argument("--seed", type=int, default=0, help="seed for corpus sampling and interval sampling (default: 0)")
    p.add_argument("--features", default=None, metavar="A:B",
                   help="analyse features A..B-1 only, a slice of the dictionary for one device or job (wins "
                   "over --n-features; nearest neighbours are searched among all features); combine slices "
                   "with atlas merge")
    p.add_argument("--remote", action="store_true",
                   help="run the models on NDIF through NNsight's remote execution (needs an NDIF API key in "
                   "NDIF_API_KEY, network access, and Hugging Face model ids)")
    p.add_argument("--save-every", type=int, default=50, metavar="N",
                   help="save the resumable analysis state every N batches, so that a crashed or killed run "
                   "loses at most N batches (default: 50; Ctrl-C and SIGTERM always save)")


def _add_render_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--title", default=None, help="title shown on every page (default: from the checkpoint)")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="feature labels/explanations: JSON ({id: label} or a list of {id, label}) or CSV "
                   "with columns id,label")
    p.add_argument("--site-url", default=None, metavar="URL",
                   help="public URL the site will be served from, e.g. https://example.org/atlas/; used only "
                   "for absolute URLs in sitemap.xml (default: relative URLs)")
    p.add_argument("--min-active", type=int, default=10, metavar="N",
                   help="features with fewer than N active tokens are flagged as low-count on their page and "
                   "their neuron and feature correlations are hidden (default: 10; 0 shows them all)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atlas",
        description="Turn a trained crosscoder or sparse autoencoder into a static feature atlas website.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("build", help="analyse a checkpoint and write the site (analyze + render)",
                       description="Analyse a checkpoint over a corpus and write a static atlas site.")
    _add_checkpoint_options(p)
    p.add_argument("-o", "--output", default=DEFAULT_SITE, metavar="DIR",
                   help=f"folder the site is written to (default: {DEFAULT_SITE}/)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="analysis cache folder (default: <output>.atlas-data beside the site)")
    _add_analysis_options(p)
    _add_render_options(p)

    p = sub.add_parser("analyze", help="run the models over the corpus and write the analysis cache",
                       description="Run the models over the corpus and write the analysis cache.")
    _add_checkpoint_options(p)
    p.add_argument("-o", "--output", default=DEFAULT_CACHE, metavar="DIR",
                   help=f"cache folder (default: {DEFAULT_CACHE}/)")
    _add_analysis_options(p)
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="analyse only the K-th (from 0) of N equal parts of the corpus and write a shard into "
                   "the output folder, e.g. --shard $SLURM_ARRAY_TASK_ID/8 in a scheduler array; combine the "
                   "N shards with atlas merge")

    p = sub.add_parser("merge", help="combine shards (--shard) and feature slices (--features) into one cache",
                       description="Combine the folders written by atlas analyze --shard K/N (all N of them) "
                       "and/or feature-slice caches of atlas analyze --features A:B into one complete analysis "
                       "cache, exactly as one process would have written it.")
    p.add_argument("inputs", nargs="+", metavar="DIR",
                   help="shard folders and/or cache folders of one analysis, in any order")
    p.add_argument("-o", "--output", default=DEFAULT_CACHE, metavar="DIR",
                   help=f"cache folder to write (default: {DEFAULT_CACHE}/)")
    p.add_argument("--device", default=None,
                   help="torch device for merging and the logit effects, e.g. cpu, cuda (default: cuda when "
                   "available, else cpu)")

    p = sub.add_parser("render", help="write the site from an analysis cache (no models needed)",
                       description="Write the static site from an analysis cache.")
    p.add_argument("cache", help="analysis cache folder written by `atlas analyze`")
    p.add_argument("-o", "--output", default=DEFAULT_SITE, metavar="DIR",
                   help=f"folder the site is written to (default: {DEFAULT_SITE}/)")
    _add_render_options(p)

    p = sub.add_parser("inspect", help="describe a checkpoint: format, sources, shapes, warnings",
                       description="Describe a checkpoint without running any model.")
    _add_checkpoint_options(p)

    p = sub.add_parser("serve", help="preview a site over HTTP on localhost",
                       description="Serve a built site over HTTP for local preview.")
    p.add_argument("site", nargs="?", default=DEFAULT_SITE, help=f"site folder (default: {DEFAULT_SITE}/)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    return parser


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    # SIGTERM (a scheduler's time limit, `kill`) unwinds like Ctrl-C: temporary files are removed and the
    # analysis state saved so far stays resumable.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if args.command == "build":
            from .build import build

            build(args)
        elif args.command == "analyze":
            from .build import analyze_command

            analyze_command(args)
        elif args.command == "merge":
            from .build import merge_command

            merge_command(args)
        elif args.command == "render":
            from .build import render_command

            render_command(args)
        elif args.command == "inspect":
            from .build import inspect_command

            inspect_command(args)
        elif args.command == "serve":
            from .serve import serve

            serve(Path(args.site), host=args.host, port=args.port)
    except AtlasError as exc:
        print(f"atlas: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # disk full, permission denied, ...: one line naming the path and the fix
        err = os_error(exc, getattr(args, "output", None))  # the folder written to, when the error has no path
        print(f"atlas: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("atlas: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        if argv is None:  # the command line: the process exits next (see atlas.lifetimes)
            from .lifetimes import freeze_for_exit

            freeze_for_exit()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
