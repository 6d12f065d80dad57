"""Benchmark of ``atlas build``'s fixed costs on the issue-14 comparison input.

The fixture (built once into ``--folder``, reused afterwards): a random 4-layer d=256 Llama with a
byte-level BPE tokenizer (vocab 4096, trained on ``pydoc_data.topics``) saved with ``save_pretrained``;
a 4,096-latent SAELens SAE (``cfg.json`` + ``sae_weights.safetensors``, standard ReLU architecture, no
normalisation) on its ``blocks.2.hook_resid_post``, with encoder biases set so that each latent fires on
about 1% of tokens; and a JSONL corpus (``pydoc_data.topics`` paragraphs) that gives 512 sequences × 128
tokens = 65,536 tokens. The command timed is what a user runs::

    atlas build <fixture>/sae -n 4096 -s 512 --seq-len 128 --dataset <fixture>/corpus.jsonl -o <tmp>/site

Two measurements, each repeated ``--runs`` times (the minimum is printed; on a shared machine other
jobs only ever add time):

1. wall time of that command in a fresh subprocess (``python -m atlas.cli build ...``), as a user sees it;
2. where the time goes: the same command run in a subprocess of this script (``--phases``) that starts
   the clock first thing, imports ``atlas.cli`` and calls its ``main`` exactly as the CLI does, with the
   pipeline's functions wrapped by timers (:data:`PHASES`). Interpreter start-up is the subprocess's wall
   time minus its own clock. Imports done inside a phase (atlas imports its heavy dependencies lazily)
   count in that phase; ``--importtime`` lists the largest top-level imports of one build (``python -X
   importtime``).

The last line is parseable: ``build: total X.XX s, fixed Y.YY s`` — total is the minimum wall time of
(1), fixed is that minus the bare forward passes and the per-batch work of (2) (encode and summaries).

    python bench/fixed_costs.py                     # fixture in /tmp/atlas-fixed-costs, 3 runs
    python bench/fixed_costs.py --runs 5 --importtime

Results measured by the team are in ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.2.hook_resid_post"
N_FEATURES = 4096
N_SEQ, SEQ_LEN = 512, 128

# (label, module, attribute): functions timed in the --phases run, in pipeline order; an attribute is
# "function" or "Class.method". Labels starting with two spaces are parts of the phase above them.
PHASES = (
    ("checkpoint load + validation", "atlas.checkpoints", "load_checkpoint"),
    ("model load (transformers + NNsight)", "atlas.models", "load_models"),
    ("corpus read + tokenisation", "atlas.corpus", "load_corpus"),
    ("analysis (run_analysis)", "atlas.analyze", "run_analysis"),
    ("  forward passes (bare)", "atlas.models", "ModelSet.extract"),
    ("  encode", "atlas.analyze", "FeatureEncoder.__call__"),
    ("  summaries", "atlas.stats.summaries", "FeatureSummaries.update"),
    ("  finish: vocabulary strings, unembeddings", "atlas.analyze", "finish_inputs"),
    ("  finish: logit effects, geometry", "atlas.analyze", "assemble"),
    ("  cache write", "atlas.analyze", "write_analysis_cache"),
    ("dead-feature check (reads features.npz)", "atlas.build", "check_features_alive"),
    ("render (render_site)", "atlas.render.site", "render_site"),
    ("  cache read", "atlas.render.site", "load_cache"),
    ("  site write (commit: fsync + rename)", "atlas.render.output", "StagedSite.commit"),
    ("site verification", "atlas.render.verify", "verify_site"),
)
PER_TOKEN = ("  forward passes (bare)", "  encode", "  summaries")


# --------------------------------------------------------------------------- fixture


def build_fixture(folder: Path) -> None:
    """Write model/, sae/ and corpus.jsonl into ``folder`` (deterministic; skipped when present)."""
    if (folder / "done").exists():
        return
    import math

    import torch
    from pydoc_data.topics import topics
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "bench"))
    from analysis import build_tiny_llama  # the bench's 4-layer d=256 random Llama, vocab 4096

    folder.mkdir(parents=True, exist_ok=True)
    model_dir = folder / "model"
    build_tiny_llama(model_dir, d=256, layers=4, vocab=4096)

    docs = []
    for name in sorted(topics):
        docs += [" ".join(p.split()) for p in topics[name].split("\n\n") if p.strip()]
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}) + "\n")

    # encoder biases: each latent fires on ~1% of the corpus's first tokens
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(" ".join(docs[:400]), add_special_tokens=False)["input_ids"][: 16 * 127]
    ids = torch.tensor(ids).view(16, 127)
    ids = torch.cat([torch.full((16, 1), tok.bos_token_id), ids], 1)
    seen = {}
    handle = model.model.layers[2].register_forward_hook(
        lambda m, i, o: seen.setdefault("x", o if isinstance(o, torch.Tensor) else o[0]))
    with torch.inference_mode():
        model(input_ids=ids)
    handle.remove()
    x = seen["x"][:, 1:].reshape(-1, 256).float()
    g = torch.Generator().manual_seed(0)
    d, F = 256, N_FEATURES
    W_enc = torch.randn(d, F, generator=g) / math.sqrt(d) / x.norm(dim=1).mean() * math.sqrt(d)
    W_dec = torch.randn(F, d, generator=g) / math.sqrt(d)
    pre = x @ W_enc
    b_enc = -pre.quantile(0.99, dim=0)
    save_file({"W_enc": W_enc.contiguous(), "W_dec": W_dec.contiguous(), "b_enc": b_enc.contiguous(),
               "b_dec": torch.zeros(d)}, str(folder / "sae_tmp.safetensors"))
    sae = folder / "sae"
    sae.mkdir(exist_ok=True)
    os.replace(folder / "sae_tmp.safetensors", sae / "sae_weights.safetensors")
    cfg = {"architecture": "standard", "d_in": d, "d_sae": F, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"model_name": str(model_dir), "hook_name": HOOK, "hook_head_index": None,
                        "prepend_bos": True, "context_size": SEQ_LEN, "sae_lens_version": "6.5.0"}}
    (sae / "cfg.json").write_text(json.dumps(cfg, indent=2))
    (folder / "done").write_text("")


def build_argv(folder: Path, out: Path) -> list[str]:
    return ["build", str(folder / "sae"), "-n", str(N_FEATURES), "-s", str(N_SEQ), "--seq-len", str(SEQ_LEN),
            "--dataset", str(folder / "corpus.jsonl"), "-o", str(out / "site")]


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


# --------------------------------------------------------------------------- measurements


def _children_cpu() -> float:
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return kids.ru_utime + kids.ru_stime


def time_cli(folder: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of ``python -m atlas.cli build ...`` in a fresh process (outputs in a temp folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, "-m", "atlas.cli", *build_argv(folder, Path(tmp))]
        t0, c0 = time.perf_counter(), _children_cpu()
        r = subprocess.run(argv, env=_env(), cwd=tmp, capture_output=True, text=True)
        wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
    if r.returncode != 0:
        sys.exit(f"atlas build failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return wall, cpu


def time_phases(folder: Path) -> dict:
    """``{"wall": {phase: s}, "cpu": {phase: s}}`` of one build (see the module docstring), from a
    ``--phases`` subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, str(Path(__file__).resolve()), "--phases", "--folder", str(folder), "--out", tmp]
        t0, c0 = time.perf_counter(), _children_cpu()
        r = subprocess.run(argv, env=_env(), cwd=tmp, capture_output=True, text=True)
        totals = {"wall": time.perf_counter() - t0, "cpu": _children_cpu() - c0}
    if r.returncode != 0:
        sys.exit(f"the --phases run failed ({r.returncode}):\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for kind, spent in out.items():
        spent["interpreter start-up and exit"] = totals[kind] - spent.pop("process clock")
        spent["whole run"] = totals[kind]
    return out


def _cpu() -> float:
    """CPU seconds (user + system) of this process, its threads and its finished child processes."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def phases_child(folder: Path, out: Path) -> None:
    """Run the build in this process with :data:`PHASES` timed; print the seconds as one JSON line."""
    t_start = time.perf_counter()
    import importlib

    sys.path.insert(0, str(ROOT))
    import atlas.cli

    spent = {"imports (atlas.cli)": time.perf_counter() - t_start}
    cpu = {"imports (atlas.cli)": _cpu()}
    active = {}

    def timed(label, fn):
        def wrapper(*a, **kw):
            if active.get(label):  # a recursive or nested call of the same function: count once
                return fn(*a, **kw)
            active[label] = True
            t0, c0 = time.perf_counter(), _cpu()
            try:
                return fn(*a, **kw)
            finally:
                active[label] = False
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - t0
                cpu[label] = cpu.get(label, 0.0) + _cpu() - c0
        return wrapper

    for label, module, attr in PHASES:
        owner = importlib.import_module(module)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, name, timed(label, getattr(owner, name)))
    # names imported with ``from x import y`` inside functions are looked up at call time, so the
    # patched module attributes are what the pipeline calls; render_site is also re-exported here:
    import atlas.render

    atlas.render.render_site = importlib.import_module("atlas.render.site").render_site
    sys.stdout = open(os.devnull, "w")
    sys.argv = ["atlas", *build_argv(folder, out)]
    rc = atlas.cli.main()  # as the console script calls it (reads sys.argv)
    sys.stdout = sys.__stdout__
    if rc:
        sys.exit(rc)
    spent["process clock"] = time.perf_counter() - t_start
    cpu["process clock"] = _cpu()
    print(json.dumps({"wall": spent, "cpu": cpu}))


def import_times(folder: Path, top: int = 12) -> list[tuple[str, float]]:
    """The ``top`` largest top-level imports (cumulative seconds) of one build, from ``-X importtime``."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, "-X", "importtime", "-m", "atlas.cli", *build_argv(folder, Path(tmp))]
        r = subprocess.run(argv, env=_env(), cwd=tmp, capture_output=True, text=True)
    rows = []
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if m and not m.group(3):  # top level: imported by code, not by another import
            rows.append((m.group(4), int(m.group(2)) / 1e6))
    total = sum(s for _, s in rows)
    return [("all top-level imports", total)] + sorted(rows, key=lambda r: -r[1])[:top]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "atlas-fixed-costs"),
                   help="where the fixture is built once and reused (default: /tmp/atlas-fixed-costs)")
    p.add_argument("--runs", type=int, default=3, help="repetitions of each measurement; the minimum is kept")
    p.add_argument("--importtime", action="store_true", help="also list the largest imports of one build")
    p.add_argument("--phases", action="store_true", help=argparse.SUPPRESS)  # the timed child process
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    folder = Path(args.folder)
    if args.phases:
        phases_child(folder, Path(args.out))
        return

    t0 = time.perf_counter()
    build_fixture(folder)
    print(f"fixture in {folder} ({time.perf_counter() - t0:.1f} s)")
    clis = []
    for _ in range(args.runs):
        clis.append(time_cli(folder))
        print(f"atlas build: {clis[-1][0]:.2f} s wall, {clis[-1][1]:.2f} s CPU", flush=True)
    runs = []
    for _ in range(args.runs):
        runs.append(time_phases(folder))
        print(f"phases run: {runs[-1]['wall']['whole run']:.2f} s wall, {runs[-1]['cpu']['whole run']:.2f} s CPU",
              flush=True)
    labels = ["interpreter start-up and exit", "imports (atlas.cli)"] + [label for label, _, _ in PHASES]
    best = {kind: {k: min(r[kind].get(k, 0.0) for r in runs) for k in labels + ["whole run"]}
            for kind in ("wall", "cpu")}
    for kind in ("wall", "cpu"):
        named = sum(best[kind][k] for k in labels if not k.startswith("  "))
        best[kind]["rest (argument checks, between phases)"] = best[kind]["whole run"] - named
    print(f"\nwhere the time goes (minimum of {args.runs} runs per phase; parts indented):")
    print(f"  {'phase':<46}{'wall':>8}{'CPU':>8}")
    for k in labels + ["rest (argument checks, between phases)", "whole run"]:
        print(f"  {k:<46}{best['wall'][k]:7.2f}s{best['cpu'][k]:7.2f}s")
    if args.importtime:
        print("\nlargest top-level imports of one build (python -X importtime, cumulative):")
        for name, s in import_times(folder):
            print(f"  {name:<46}{s:7.2f} s")
    total, total_cpu = min(w for w, _ in clis), min(c for _, c in clis)
    per_token = sum(best["wall"][k] for k in PER_TOKEN)
    per_token_cpu = sum(best["cpu"][k] for k in PER_TOKEN)
    print(f"\nbuild: total {total:.2f} s, fixed {total - per_token:.2f} s "
          f"(CPU: total {total_cpu:.2f} s, fixed {total_cpu - per_token_cpu:.2f} s)")


if __name__ == "__main__":
    main()
