"""The analysis on a CUDA device gives the cache the CPU gives (skipped where no GPU is present).

The same crosscoder, models and tokens are analysed on the CPU and on ``cuda`` in float32, and every
array of the two caches is compared. Values computed the same way on both (density, maxima, decoder
geometry, logit effects, correlations) must agree to float32 rounding. Identities chosen by ranking
(top examples, interval samples, neighbours, top logits) must agree wherever the ranked values are not
tied within that rounding; windows are compared where the identities agree.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from factory import calibration_tokens, crosscoder_from_ckkissane, small_analysis_options
from transformers import AutoTokenizer

from atlas.analyze import run_analysis
from atlas.cache import read_cache
from atlas.models import load_models

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

OPTIONS = small_analysis_options()
RTOL, ATOL = 1e-3, 1e-4


@pytest.fixture(scope="module")
def setup(tiny_world):
    """The two-model crosscoder of the tiny world, its models on the CPU, and 22 sequences of 24 tokens
    (drawn from the tokenizer's calibration text: no dataset library needed on a GPU machine)."""
    a, b = str(tiny_world.llama_dir), str(tiny_world.llama_chat_dir)
    cc = crosscoder_from_ckkissane(tiny_world.crosscoder_ckpt, [a, b])
    tokens = calibration_tokens(AutoTokenizer.from_pretrained(tiny_world.tokenizer_dir), seq_len=24, n=22)
    return cc, load_models(cc.sources, torch.device("cpu"), torch.float32), tokens


@pytest.fixture(scope="module")
def caches(setup, tmp_path_factory):
    cc, cpu_models, tokens = setup
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 GEMMs as the CPU does them
    gpu = torch.device("cuda")
    gpu_models = load_models(cc.sources, gpu, torch.float32)
    out = {}
    for name, models, device in (("cpu", cpu_models, torch.device("cpu")), ("cuda", gpu_models, gpu)):
        folder = tmp_path_factory.mktemp(f"cache-{name}")
        run_analysis(cc, models, tokens, OPTIONS, folder, device, torch.float32)
        out[name] = read_cache(folder)
    return out["cpu"], out["cuda"]


def _pairs(cpu, gpu):
    for part in ("features", "examples", "logits"):
        a, b = getattr(cpu, part), getattr(gpu, part)
        for f in dataclasses.fields(a):
            yield f"{part}.{f.name}", getattr(a, f.name), getattr(b, f.name)


def _close(a: np.ndarray, b: np.ndarray, rtol=RTOL, atol=ATOL) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.isclose(a, b, rtol=rtol, atol=atol) | (np.isnan(a) & np.isnan(b))


VALUES = {
    "features.density", "features.max_act", "features.mean_act", "features.dec_norm", "features.rel_norm",
    "features.dec_cos", "features.neighbour_cos", "features.align_val", "features.align_l1_frac",
    "features.ncorr_val", "features.fcorr_val", "examples.iv_width", "logits.top_vals", "logits.bot_vals",
    "logits.hist_lo", "logits.hist_hi", "logits.mean", "logits.diff_top_vals", "logits.diff_bot_vals",
}


def test_same_fields_and_shapes(caches):
    cpu, gpu = caches
    assert gpu.manifest.complete and gpu.manifest.n_tokens == cpu.manifest.n_tokens
    np.testing.assert_array_equal(cpu.tokens, gpu.tokens)
    for name, a, b in _pairs(cpu, gpu):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape and a.dtype == b.dtype, name


def test_values_agree_to_float32_rounding(caches):
    cpu, gpu = caches
    for name, a, b in _pairs(cpu, gpu):
        if name in VALUES and a is not None:
            bad = ~_close(a, b)
            assert not bad.any(), f"{name}: {bad.sum()} of {bad.size} differ, e.g. {a[bad][:5]} vs {b[bad][:5]}"
    np.testing.assert_array_equal(cpu.features.n_active, gpu.features.n_active)
    np.testing.assert_array_equal(cpu.features.diff_class, gpu.features.diff_class)


def test_top_examples_agree_unless_tied(caches):
    cpu, gpu = caches
    a, b = cpu.examples, gpu.examples
    np.testing.assert_array_equal(a.top_seq < 0, b.top_seq < 0)  # the same slots filled
    assert _close(a.top_act, b.top_act).all()  # the ranked values agree in every slot
    same = (a.top_seq == b.top_seq) & (a.top_pos == b.top_pos)
    # where the identities differ the values must be tied (the same value at two places)
    for f, j in zip(*np.nonzero(~same)):
        acts = a.top_act[f]
        assert np.isclose(acts, acts[j], rtol=RTOL, atol=ATOL).sum() >= 2, (f, j)
    filled = a.top_seq >= 0
    assert same[filled].mean() > 0.95
    w = same & filled
    assert _close(a.top_window[w], b.top_window[w], rtol=2e-3, atol=2e-3).all()


def test_interval_samples_agree_but_near_edges(caches):
    cpu, gpu = caches
    a, b = cpu.examples, gpu.examples
    np.testing.assert_array_equal(a.iv_seq < 0, b.iv_seq < 0)  # the same slots filled
    same = (a.iv_seq == b.iv_seq) & (a.iv_pos == b.iv_pos)
    # a token whose activation lies within rounding of an interval edge may change interval, and so
    # change which tokens the two intervals sample; nothing else may differ
    moved = ~same & (a.iv_seq >= 0)
    assert moved.mean() < 0.02, f"{moved.sum()} of {moved.size} interval samples differ"
    w = same & (a.iv_seq >= 0)
    assert _close(a.iv_act[w], b.iv_act[w]).all()
    assert _close(a.iv_window[w], b.iv_window[w], rtol=2e-3, atol=2e-3).all()


def test_ranked_ids_agree_unless_tied(caches):
    cpu, gpu = caches
    for ids, vals in (("neighbours", "neighbour_cos"), ("fcorr_ids", "fcorr_val")):
        ia, ib = getattr(cpu.features, ids), getattr(gpu.features, ids)
        va = getattr(cpu.features, vals)
        differ = ia != ib
        for f, j in zip(*np.nonzero(differ)):
            assert np.isclose(va[f], va[f, j], rtol=RTOL, atol=ATOL).sum() >= 2, (ids, f, j)
    for ids, vals in (("top_ids", "top_vals"), ("bot_ids", "bot_vals")):
        ia, ib = getattr(cpu.logits, ids), getattr(gpu.logits, ids)
        va = getattr(cpu.logits, vals)
        for f, s, j in zip(*np.nonzero(ia != ib)):
            assert np.isclose(va[f, s], va[f, s, j], rtol=RTOL, atol=ATOL).sum() >= 2, (ids, f, s, j)
    for ids, vals in (("diff_top_ids", "diff_top_vals"), ("diff_bot_ids", "diff_bot_vals")):  # the B−A table
        ia, ib = getattr(cpu.logits, ids), getattr(gpu.logits, ids)
        va = getattr(cpu.logits, vals)
        for f, j in zip(*np.nonzero(ia != ib)):
            assert np.isclose(va[f], va[f, j], rtol=RTOL, atol=ATOL).sum() >= 2, (ids, f, j)


def test_histograms_agree(caches):
    cpu, gpu = caches
    for a, b in ((cpu.features.hist_counts, gpu.features.hist_counts),
                 (cpu.logits.hist_counts, gpu.logits.hist_counts)):
        np.testing.assert_array_equal(a.sum(-1), b.sum(-1))
        assert np.abs(a - b).sum() <= max(2, a.sum() // 10_000)  # a value on a bin edge may move


def test_bfloat16_on_cuda_completes_and_tracks_float32(setup, caches, tmp_path):
    cc, _, tokens = setup
    cpu, _ = caches
    gpu = torch.device("cuda")
    models = load_models(cc.sources, gpu, torch.bfloat16)
    run_analysis(cc, models, tokens, OPTIONS, tmp_path, gpu, torch.bfloat16)
    bf = read_cache(tmp_path)
    assert bf.manifest.complete
    alive = cpu.features.n_active > 0
    rel = np.abs(bf.features.max_act[alive] - cpu.features.max_act[alive]) / cpu.features.max_act[alive]
    assert np.median(rel) < 0.05
    assert np.abs(bf.features.density - cpu.features.density).max() < 0.05
