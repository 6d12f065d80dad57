"""A BatchTopK crosscoder saved without its inference threshold (crosscode): the analysis estimates the
threshold as BatchTopK trainers do and every arrangement of the run arrives at the same value.

The tiny two-model crosscoder is read as BatchTopK with k = 3 and no threshold; 22 sequences of 24 tokens
in batches of 5, no stored input scale, both estimated from the first two batches (``scale_batches``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from factory import interrupted_at_update, resid_post, small_analysis_options
from test_merge import assert_same_cache
from transformers import AutoModelForCausalLM

from atlas.analyze import batch_topk_thresholds, run_analysis
from atlas.cache import read_cache
from atlas.merge import merge_folders

CPU = torch.device("cpu")
OPTIONS = small_analysis_options()
K = 3


@pytest.fixture(scope="module")
def setup(diff_setup):
    cc, models, tokens = diff_setup
    return dataclasses.replace(cc, activation="batchtopk", threshold=None, k=K), models, tokens


@pytest.fixture(scope="module")
def whole(setup, tmp_path_factory):
    cc, models, tokens = setup
    folder = tmp_path_factory.mktemp("batchtopk")
    manifest = run_analysis(cc, models, tokens, OPTIONS, folder, CPU, torch.float32)
    return manifest, read_cache(folder)


@pytest.fixture(scope="module")
def brute(setup):
    """Every source's activations by plain forward hooks, the counted (non-BOS) tokens, the input scale."""
    cc, models, tokens = setup
    hf = [AutoModelForCausalLM.from_pretrained(s.model).eval() for s in cc.sources]
    x = torch.stack([resid_post(m, tokens, 1) for m in hf], dim=2)  # [N, T, S, d]
    counted = tokens != models.bos_token_id
    n_first = OPTIONS.batch_size * OPTIONS.scale_batches
    scale = math.sqrt(x.shape[-1]) / x[:n_first][counted[:n_first]].norm(dim=-1).mean(0)
    return x, counted, scale


def test_threshold_is_the_mean_of_each_batch_cut_off(setup, whole, brute):
    cc, _, _ = setup
    manifest, _ = whole
    x, counted, scale = brute
    scaled = dataclasses.replace(cc, activation="relu", input_scale=scale)
    cut_offs = []
    for b in range(OPTIONS.scale_batches):
        rows = slice(b * OPTIONS.batch_size, (b + 1) * OPTIONS.batch_size)
        xb = x[rows][counted[rows]]  # [n, S, d]
        acts = scaled.encode(xb).reshape(-1)  # every feature at every counted token
        cut_offs.append(float(acts.sort(descending=True).values[K * xb.shape[0] - 1]))
    assert manifest.checkpoint["batchtopk_threshold_estimated"] is True
    assert manifest.checkpoint["batchtopk_threshold"] == pytest.approx(np.mean(cut_offs), rel=1e-5)
    assert manifest.checkpoint["batchtopk_threshold"] > 0


def test_statistics_follow_the_estimated_threshold(setup, whole, brute):
    """Density and maxima equal a brute-force encode with that threshold, and the estimate holds the
    trained budget: about k active features per token over the corpus."""
    cc, _, _ = setup
    manifest, cache = whole
    x, counted, scale = brute
    theta = torch.tensor(manifest.checkpoint["batchtopk_threshold"])
    encoder = dataclasses.replace(cc, input_scale=scale, threshold=theta)
    N, T, S, d = x.shape
    acts = encoder.encode(x.reshape(-1, S, d)).reshape(N, T, -1) * counted[:, :, None]
    n_tokens = int(counted.sum())
    np.testing.assert_allclose(cache.features.density, ((acts > 0).sum((0, 1)) / n_tokens).numpy(), rtol=1e-6)
    np.testing.assert_allclose(cache.features.max_act, acts.amax((0, 1)).numpy(), rtol=1e-5)
    mean_l0 = float(cache.features.density.sum())
    assert 0.5 * K < mean_l0 < 2 * K


def test_block_wise_cut_off_equals_one_sort():
    g = torch.Generator().manual_seed(0)
    from atlas.crosscoder import Crosscoder, Source

    S, d, F = 2, 6, 23
    cc = Crosscoder(W_enc=torch.randn(S, d, F, generator=g), W_dec=torch.randn(F, S, d, generator=g),
                    b_enc=torch.randn(F, generator=g) - 1, b_dec=torch.zeros(S, d),
                    sources=[Source("m", "blocks.0.hook_resid_post")] * S, activation="batchtopk", k=4,
                    input_scale=torch.ones(S), act_scale=torch.rand(F, generator=g) + 0.5)
    x = torch.randn(3, 7, S, d, generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.3
    relu = dataclasses.replace(cc, activation="relu")
    values = relu.encode(x[mask]).reshape(-1).sort(descending=True).values
    want = float(values[4 * int(mask.sum()) - 1])
    empty = torch.zeros_like(mask)
    for block in (1, 5, 23, 64):  # one-column blocks multiply in another order: equal up to rounding
        got = batch_topk_thresholds(cc, [(x, mask), (x, empty), (x, mask)], CPU, torch.float32, block=block)
        assert got[0] == pytest.approx(want, rel=1e-6) and got[2] == got[0] and got[1] == 0.0
    sparse = dataclasses.replace(cc, b_enc=cc.b_enc - 50)  # fewer positive activations than k·n: keep them all
    assert batch_topk_thresholds(sparse, [(x, mask)], CPU, torch.float32) == [0.0]


def test_shards_and_resumed_runs_arrive_at_the_same_threshold(setup, whole, tmp_path, monkeypatch):
    cc, models, tokens = setup
    _, one = whole
    for k in range(2):  # shard 1 holds batches 2.. and extracts the first two only for the estimates
        run_analysis(cc, models, tokens, OPTIONS, tmp_path / f"s{k}", CPU, torch.float32, shard=(k, 2))
    merge_folders([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged", device="cpu")
    assert_same_cache(read_cache(tmp_path / "merged"), one)

    options = dataclasses.replace(OPTIONS, save_every=1)
    with interrupted_at_update(monkeypatch, 4), pytest.raises(KeyboardInterrupt):
        run_analysis(cc, models, tokens, options, tmp_path / "resumed", CPU, torch.float32)
    state = torch.load(tmp_path / "resumed" / "state" / "summaries.pt", weights_only=True)
    assert state["batches_done"] == 3 and float(state["threshold"]) == one.manifest.checkpoint["batchtopk_threshold"]
    run_analysis(cc, models, tokens, options, tmp_path / "resumed", CPU, torch.float32)
    assert_same_cache(read_cache(tmp_path / "resumed"), one, bitwise=True)
