"""Benchmark of torchrun analysis: throughput of N processes relative to one, on the same tokens.

Builds the inputs once (the tiny random Llama and random crosscoder of ``bench/analysis.py``, a corpus
of random-free pydoc text tokens), then times ``run_analysis`` in one plain process and under
``torch.distributed.run --standalone --nproc_per_node N`` (gloo on the CPU, NCCL on GPUs), each after
a warm-up analysis in the same processes. The time is rank 0's, from a barrier before the analysis to
the cache being written (the summaries' merge over the ranks and the finish included); model loading
and process start-up are not counted. Every process uses ``--threads`` torch threads (1 by default,
so N processes use N cores).

    python bench/distributed.py                    # 1 vs 2 processes on the CPU
    python bench/distributed.py --nproc 4 --device cuda --tokens 1048576 --features 16384

Results measured by the team are in ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def prepare(folder: Path, args) -> None:
    """Model, crosscoder and tokens into ``folder`` (the workers load them from there)."""
    from analysis import build_tiny_llama, corpus, random_crosscoder

    from atlas.crosscoder import Source
    from atlas.models import load_models

    torch.set_num_threads(args.threads)
    model = args.model or build_tiny_llama(folder / "llama")
    sources = [Source(model, args.hook_point)]
    models = load_models(sources, torch.device("cpu"), torch.float32)
    tokens = corpus(models, args.tokens, args.seq_len)
    cc = random_crosscoder(models, sources, args.features, tokens)
    torch.save({"W_enc": cc.W_enc, "W_dec": cc.W_dec, "b_enc": cc.b_enc, "b_dec": cc.b_dec, "tokens": tokens},
               folder / "inputs.pt")
    (folder / "inputs.json").write_text(json.dumps({"model": model, "hook_point": args.hook_point}))


def worker(folder: Path, args) -> None:
    """One process (or one torchrun rank): load the inputs, warm up, time one analysis; rank 0 prints JSON."""
    from atlas import distributed
    from atlas.analyze import AnalysisOptions, run_analysis
    from atlas.crosscoder import Crosscoder, Source
    from atlas.models import load_models, pick_device

    torch.set_num_threads(args.threads)
    comm, device_arg = distributed.from_environment(args.device)
    try:
        device, dtype = pick_device(device_arg, args.dtype)
        meta = json.loads((folder / "inputs.json").read_text())
        data = torch.load(folder / "inputs.pt", weights_only=True)
        sources = [Source(meta["model"], meta["hook_point"])]
        cc = Crosscoder(W_enc=data["W_enc"], W_dec=data["W_dec"], b_enc=data["b_enc"], b_dec=data["b_dec"],
                        sources=sources, format="bench", path="random")
        models = load_models(sources, device, dtype)
        tokens = data["tokens"]
        options = AnalysisOptions(n_features=0, batch_size=args.batch_size, progress=False, reuse=False,
                                  save_every=10**9)
        world = comm.world if comm else 1
        rank = comm.rank if comm else 0
        with tempfile.TemporaryDirectory() as tmp:
            warm = tokens[: args.batch_size * 2 * world]
            run_analysis(cc, models, warm, options, Path(tmp) / "warm", device, dtype, comm=comm)
            if comm:
                comm.barrier()
            start = time.perf_counter()
            run_analysis(cc, models, tokens, options, Path(tmp) / "cache", device, dtype, comm=comm)
            seconds = time.perf_counter() - start
        if rank == 0:
            print("BENCH " + json.dumps({"processes": world, "seconds": seconds, "tokens": tokens.numel()}))
    finally:
        distributed.shutdown(comm)


def run(folder: Path, args, nproc: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    me = [str(Path(__file__).resolve()), "--worker", str(folder), "--threads", str(args.threads),
          "--batch-size", str(args.batch_size)] + (["--device", args.device] if args.device else []) + \
        (["--dtype", args.dtype] if args.dtype else [])
    if nproc == 1:
        cmd = [sys.executable] + me
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] + me
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("BENCH ")]
    if res.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return json.loads(lines[-1][len("BENCH "):])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help="HF id or local path (default: a tiny random Llama built here)")
    p.add_argument("--hook-point", default="blocks.2.hook_resid_post")
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--nproc", type=int, default=2, help="processes of the torchrun run (default 2)")
    p.add_argument("--repeat", type=int, default=2, help="runs of each, the fastest counts (default 2)")
    p.add_argument("--device", default=None, help="cpu, cuda (each rank on cuda:LOCAL_RANK); default: cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default 1)")
    args = p.parse_args(argv)
    if args.worker:
        return worker(Path(args.worker), args)
    args.device = args.device or "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepare(folder, args)
        results = {}
        for n in (1, args.nproc):
            runs = [run(folder, args, n) for _ in range(args.repeat)]
            results[n] = min(runs, key=lambda r: r["seconds"])
            for r in runs:
                print(f"{n} process(es): {r['tokens']:,} tokens in {r['seconds']:.2f} s "
                      f"= {r['tokens'] / r['seconds']:,.0f} tok/s")
    one, many = results[1], results[args.nproc]
    print(f"model {args.model or 'tiny random Llama (d=256, 4 layers)'} at {args.hook_point}, {args.features} "
          f"features, device {args.device}, {args.threads} thread(s) per process, batch {args.batch_size}×"
          f"{args.seq_len}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"throughput {args.nproc} processes / 1 process: {one['seconds'] / many['seconds']:.2f}× "
          f"({many['tokens'] / many['seconds']:,.0f} vs {one['tokens'] / one['seconds']:,.0f} tok/s)")


if __name__ == "__main__":
    main()
