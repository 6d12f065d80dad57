"""Benchmark of the analysis stage: its cost relative to bare NNsight forward passes, and its memory.

In one process: time the forward passes alone (``ModelSet.extract``, stopping at the crosscoder's layer)
over a corpus, then the full analysis (``atlas.analyze.run_analysis``: extract, encode, fold summaries,
weight statistics, write the cache) over the same corpus; print both throughputs and their ratio, the
peak memory of each, and the analysis's peak memory at 1× and 4× the tokens (it must not grow with
the number of tokens). The same at 4× the tokens gives the marginal ratio: the extra analysis time of
the extra tokens over their extra forward time, i.e. the per-token cost without the fixed costs
(weight statistics, cache writing, warm-up of the bounded summaries). Times are wall-clock and, beside
them, this process's CPU time (``time.process_time``), which other jobs on a shared machine disturb less.

Memory is measured in separate runs after the timed ones: on CUDA ``torch.cuda.max_memory_allocated``;
on CPU the resident set size sampled every 2 ms above its level at the start of the phase, with freed
heap returned to the OS (``malloc_trim``) between phases and blocks of 1 MiB or more mmapped (glibc's
``M_MMAP_THRESHOLD`` fixed at 1 MiB), so that the resident size follows live memory rather than the
allocator's free lists. That setting makes every large allocation fault its pages in afresh (it nearly
doubled the time of the summaries), so the timed runs keep the allocator as users have it.

    python bench/analysis.py                       # tiny random Llama built here, 4096 features
    python bench/analysis.py --model PATH_OR_ID --hook-point blocks.6.hook_resid_post --features 16384

The last line of the output is for scripts (:func:`ratio_line`, read back by :func:`parse_ratio_line`):
``ratio: analysis/forward = X.XX (4x tokens), marginal Y.YY``, the wall-clock ratio of the full analysis
to the forward passes at 4× the tokens, and the marginal ratio. Results measured by the team are in
``bench/README.md``.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import math
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atlas.analyze import AnalysisOptions, run_analysis  # noqa: E402
from atlas.crosscoder import Crosscoder, Source  # noqa: E402
from atlas.models import load_models, pick_device  # noqa: E402


FACTOR = 4  # the larger corpus has FACTOR × the tokens (the marginal ratio compares the two)

_NUMBER = r"([-+]?(?:\d+\.\d+|nan|inf))"
RATIO_PATTERN = re.compile(rf"ratio: analysis/forward = {_NUMBER} \((\d+)x tokens\), marginal {_NUMBER}")


def ratio_line(ratio: float, marginal: float, factor: int = FACTOR) -> str:
    """The output's last line, for scripts: ``ratio: analysis/forward = X.XX (4x tokens), marginal Y.YY``
    (wall-clock analysis / forward time at ``factor`` × the tokens, and the marginal ratio)."""
    return f"ratio: analysis/forward = {ratio:.2f} ({factor}x tokens), marginal {marginal:.2f}"


def parse_ratio_line(line: str) -> tuple[float, int, float]:
    """``(ratio, factor, marginal)`` from a line written by :func:`ratio_line`; ValueError otherwise."""
    m = RATIO_PATTERN.fullmatch(line.strip())
    if not m:
        raise ValueError(f"not a ratio line: {line!r}")
    return float(m.group(1)), int(m.group(2)), float(m.group(3))


def build_tiny_llama(folder: Path, d: int = 256, layers: int = 4, vocab: int = 4096) -> str:
    """A random Llama with a byte-level BPE tokenizer trained on ``pydoc_data.topics`` (seconds)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<bos>", "<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                      bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return str(folder)


def random_crosscoder(models, sources, n_features: int, tokens, density: float = 0.01) -> Crosscoder:
    """Random weights; encoder biases put every feature at about ``density`` on the first batch."""
    S, d = len(sources), models.widths[0]
    g = torch.Generator().manual_seed(0)
    W_enc = torch.randn(S, d, n_features, generator=g) / math.sqrt(S * d)
    W_dec = torch.randn(n_features, S, d, generator=g) / math.sqrt(d)
    x = models.extract(tokens[:8]).float()[:, 1:]  # on the models' device: the quantile is slow on a CPU
    x = x * (math.sqrt(d) / x.norm(dim=-1).mean((0, 1)))[None, None, :, None]
    pre = torch.einsum("btsd,sdf->btf", x, W_enc.to(x.device)).reshape(-1, n_features)
    pre = pre[: min(len(pre), 4096)]
    b_enc = -pre.topk(max(1, round(density * len(pre))), dim=0).values[-1].cpu()  # the (1 - density) quantile
    return Crosscoder(W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=torch.zeros(S, d), sources=sources,
                      format="bench", path="random")


def rss_follows_live_memory() -> None:
    """Make the CPU resident size follow live memory (see the module docstring); for memory runs only:
    glibc's dynamic mmap threshold cannot be restored afterwards."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a phase: CUDA allocator peak, or sampled RSS above the phase's start."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())
        self.extra = self.peak - self.start
        return False


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def corpus(models, n_tokens: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Random token ids (BOS first) — the cost of the analysis does not depend on the text."""
    n = max(1, n_tokens // seq_len)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, models.vocab_size, (n, seq_len), generator=g)
    if models.bos_token_id is not None:
        ids[:, 0] = models.bos_token_id
    return ids


class Timer:
    """Wall-clock and process CPU seconds of a ``with`` block (CUDA synchronised at both ends)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        return False


def time_forwards(models, tokens, batch_size: int, device) -> Timer:
    with Timer(device) as t:
        for lo in range(0, len(tokens), batch_size):
            x = models.extract(tokens[lo:lo + batch_size])
            del x
            gc.collect(0)  # as the analysis does after each batch's traces (atlas.analyze._extracted)
    return t


def time_analysis(cc, models, tokens, options, device, dtype) -> tuple[Timer, int, float]:
    """The analysis's time, its cache's size in bytes, and its mean L0 (active features per counted token)."""
    with tempfile.TemporaryDirectory() as tmp:
        with Timer(device) as t:
            run_analysis(cc, models, tokens, options, Path(tmp), device, dtype)
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
        with np.load(Path(tmp) / "features.npz") as z:
            mean_l0 = float(z["density"].sum())
    return t, size, mean_l0


# Parts of the analysis timed by --breakdown: (label, module, attribute), the attribute a function of the
# module or "Class.method". Nested parts are inside the line above them (summaries → their parts).
PHASES = (
    ("forward passes (ModelSet.extract)", "atlas.models", "ModelSet.extract"),
    ("encode", "atlas.analyze", "FeatureEncoder.__call__"),
    ("summaries, all", "atlas.stats.summaries", "FeatureSummaries.update"),
    ("  scalars", "atlas.stats.scalars", "ScalarStats.update"),
    ("  top examples", "atlas.stats.top", "TopExamples.update"),
    ("  interval samples", "atlas.stats.intervals", "IntervalSamples.update"),
    ("  neuron correlations", "atlas.stats.correlations", "NeuronCorrelations.update"),
    ("  feature correlations", "atlas.stats.correlations", "FeatureCorrelations.update"),
    ("  latent scaling: reconstructions", "atlas.stats.latent_scaling", "reconstruct"),
    ("  latent scaling: products", "atlas.stats.latent_scaling", "LatentScaling.update"),
    ("nearest neighbours (before the pass)", "atlas.analyze", "Plan.local_neighbours"),
    ("finish: vocabulary strings, unembeddings", "atlas.analyze", "finish_inputs"),
    ("finish: logit effects, decoder geometry", "atlas.analyze", "assemble"),
    ("finish: cache writing", "atlas.analyze", "write_analysis_cache"),
)


def breakdown(cc, models, tokens, options, device, dtype) -> None:
    """Run the analysis once more with each part of :data:`PHASES` timed, the device synchronised before
    and after each call (so the parts add up, at the price of the overlap an unsynchronised run has)."""
    import importlib

    spent, patched = {}, []

    def timed(label, fn):
        def wrapper(*a, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - t0
        return wrapper

    for label, module, attr in PHASES:
        owner = importlib.import_module(module)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, name)
        patched.append((owner, name, original))
        setattr(owner, name, timed(label, original))
    try:
        t, _, _ = time_analysis(cc, models, tokens, options, device, dtype)
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
    print(f"breakdown of one analysis of {tokens.numel():,} tokens ({t.wall:.2f} s, device synchronised "
          "around each part):")
    for label, _, _ in PHASES:
        if label in spent:
            print(f"  {label:<40}{spent[label]:8.3f} s  {100 * spent[label] / t.wall:5.1f}%")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF id or local path (default: a tiny random Llama built here)")
    p.add_argument("--hook-point", default="blocks.2.hook_resid_post")
    p.add_argument("--sources", type=int, default=1, help="1 = SAE; 2 = the model read twice (two sources)")
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--density", type=float, default=0.01,
                   help="target density of the random features (encoder biases set on the first batch)")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--no-neuron-correlations", action="store_true", help="skip correlated neurons")
    p.add_argument("--corr-candidates", type=int, default=None, help="feature-correlation candidates (0: none)")
    p.add_argument("--next-token-effects", default=None, choices=["top", "all", "none"])
    p.add_argument("--latent-scaling", default=None, choices=["auto", "on", "off"],
                   help="latent scaling (two sources only; auto: on when --sources 2)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time each part of the analysis (one more run, device synchronised per part)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device, dtype = pick_device(args.device, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_tiny_llama(Path(tmp) / "llama")
        sources = [Source(model, args.hook_point)] * args.sources
        models = load_models(sources, device, dtype)
        tokens = corpus(models, args.tokens, args.seq_len)
        cc = random_crosscoder(models, sources, args.features, tokens, density=args.density)
        options = AnalysisOptions(n_features=0, batch_size=args.batch_size, progress=False, reuse=False,
                                  save_every=10**9)
        extra = {"neuron_correlations": not args.no_neuron_correlations,
                 "corr_candidates": args.corr_candidates, "n_corr_features": 0 if args.corr_candidates == 0 else None,
                 "next_token_effects": args.next_token_effects, "latent_scaling": args.latent_scaling}
        known = {f.name for f in dataclasses.fields(AnalysisOptions)}
        options = dataclasses.replace(options, **{k: v for k, v in extra.items() if v is not None and k in known})
        n_tok = tokens.numel()
        # warm-up (first-call costs: kernels, allocator)
        time_forwards(models, tokens[: args.batch_size], args.batch_size, device)
        time_analysis(cc, models, tokens[: args.batch_size * 2], options, device, dtype)

        t_fwd = time_forwards(models, tokens, args.batch_size, device)
        t_all, size, mean_l0 = time_analysis(cc, models, tokens, options, device, dtype)
        tokens4 = corpus(models, FACTOR * args.tokens, args.seq_len, seed=1)
        t_fwd4 = time_forwards(models, tokens4, args.batch_size, device)
        t_4x, _, _ = time_analysis(cc, models, tokens4, options, device, dtype)
        if args.breakdown:
            breakdown(cc, models, tokens, options, device, dtype)

        if device.type == "cpu":
            rss_follows_live_memory()
        with PeakMemory(device) as m_fwd:
            time_forwards(models, tokens, args.batch_size, device)
        with PeakMemory(device) as m_1x:
            time_analysis(cc, models, tokens, options, device, dtype)
        with PeakMemory(device) as m_4x:
            time_analysis(cc, models, tokens4, options, device, dtype)

    name = args.model or "tiny random Llama (d=256, 4 layers)"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} thread(s)"
    mb = 2**20
    print(f"model {name} at {args.hook_point} ×{args.sources}, {args.features} features, {where}, "
          f"{str(dtype).replace('torch.', '')}, batch {args.batch_size}×{args.seq_len}; "
          f"mean L0 {mean_l0:.1f} active features per token")
    n4 = tokens4.numel()

    def row(what, n, t, extra=""):
        print(f"{what:<18}{n:>9,} tokens  {t.wall:7.2f} s ({t.cpu:7.2f} s cpu)  {n / t.wall:>10,.0f} tok/s{extra}")

    row("forward only", n_tok, t_fwd, f"  peak +{m_fwd.extra / mb:7.1f} MiB")
    row("full analysis", n_tok, t_all, f"  peak +{m_1x.extra / mb:7.1f} MiB  (cache {size / mb:.1f} MiB)")
    row("forward only 4×", n4, t_fwd4)
    row("full analysis 4×", n4, t_4x, f"  peak +{m_4x.extra / mb:7.1f} MiB")
    marginal = (t_4x.wall - t_all.wall) / max(t_fwd4.wall - t_fwd.wall, 1e-9)
    marginal_cpu = (t_4x.cpu - t_all.cpu) / max(t_fwd4.cpu - t_fwd.cpu, 1e-9)
    print(f"analysis / forward time: {t_all.wall / t_fwd.wall:.2f}× ({t_all.cpu / t_fwd.cpu:.2f}× cpu) at 1×, "
          f"{t_4x.wall / t_fwd4.wall:.2f}× ({t_4x.cpu / t_fwd4.cpu:.2f}× cpu) at 4×; marginal (per extra token) "
          f"{marginal:.2f}× ({marginal_cpu:.2f}× cpu);  peak memory 4× / 1× tokens: "
          f"{m_4x.extra / max(m_1x.extra, 1):.2f}")
    print(ratio_line(t_4x.wall / t_fwd4.wall, marginal))


if __name__ == "__main__":
    main()
