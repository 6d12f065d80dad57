"""atlas.analyze end to end on tiny models: the cache checked against brute force over the same tokens."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from factory import crosscoder_from_ckkissane, interrupted_at_update, resid_post, small_analysis_options
from transformers import AutoModelForCausalLM

from atlas.analyze import run_analysis
from atlas.cache import read_cache
from atlas.corpus import load_corpus
from atlas.crosscoder import Source
from atlas.errors import AtlasError
from atlas.models import load_models

CPU = torch.device("cpu")
OPTIONS = small_analysis_options()


@pytest.fixture(scope="module")
def diff_cache(diff_setup, tmp_path_factory):
    cc, models, tokens = diff_setup
    folder = tmp_path_factory.mktemp("diff-cache")
    manifest = run_analysis(cc, models, tokens, OPTIONS, folder, CPU, torch.float32)
    return manifest, read_cache(folder), folder


@pytest.fixture(scope="module")
def brute(diff_setup, diff_cache):
    """All activations by plain forward hooks and a direct encode: acts[N, T, F] (BOS zeroed), x, scale."""
    cc, models, tokens = diff_setup
    hf = [AutoModelForCausalLM.from_pretrained(s.model).eval() for s in cc.sources]
    x = torch.stack([resid_post(m, tokens, 1) for m in hf], dim=2)  # [N, T, S, d]
    counted = tokens != models.bos_token_id
    first = x[: OPTIONS.batch_size * OPTIONS.scale_batches][counted[: OPTIONS.batch_size * OPTIONS.scale_batches]]
    scale = math.sqrt(x.shape[-1]) / first.norm(dim=-1).mean(0)
    scaled = dataclasses.replace(cc, input_scale=scale)
    N, T, S, d = x.shape
    acts = torch.cat([scaled.encode(x[lo:lo + 5].reshape(-1, S, d)).reshape(-1, T, cc.n_features)
                      for lo in range(0, N, 5)])
    acts = acts * counted[:, :, None]
    return acts.numpy(), scale, hf


def test_cache_is_complete_and_consistent(diff_setup, diff_cache):
    cc, models, tokens = diff_setup
    manifest, cache, _ = diff_cache
    F = cc.n_features
    assert manifest.complete and cache.manifest.n_features == F
    assert [s.model for s in cache.manifest.sources] == [s.model for s in cc.sources]
    assert cache.manifest.n_tokens == tokens.numel() - tokens.shape[0]  # BOS excluded
    assert cache.manifest.n_sequences == 22 and cache.manifest.settings.seq_len == 24
    np.testing.assert_array_equal(cache.tokens, tokens.numpy())
    assert len(cache.vocab) == 512 and cache.vocab[models.bos_token_id] == "<bos>"
    W = cache.manifest.settings.window
    assert cache.examples.top_window.shape == (F, 5, W)
    assert cache.examples.iv_window.shape == (F, 8, 3, W)
    assert cache.logits.top_ids.shape == (F, 2, 6) and cache.logits.hist_counts.shape == (F, 2, 9)
    assert (cache.logits.hist_counts.sum(-1) == 512).all()
    assert not (diff_cache[2] / "state").exists()


def test_input_scale_estimate(diff_cache, brute):
    manifest, _, _ = diff_cache
    _, scale, _ = brute
    assert manifest.checkpoint["input_scale_estimated"] is True
    np.testing.assert_allclose(manifest.checkpoint["input_scale"], scale.numpy(), rtol=1e-5)


def test_density_max_mean_match_brute_force(diff_cache, brute):
    _, cache, _ = diff_cache
    acts, _, _ = brute
    a = acts.reshape(-1, acts.shape[-1])
    n_tokens = cache.manifest.n_tokens
    fs = cache.features
    np.testing.assert_array_equal(fs.n_active, (a > 0).sum(0))
    np.testing.assert_allclose(fs.density, (a > 0).sum(0) / n_tokens, rtol=1e-6)
    np.testing.assert_allclose(fs.max_act, a.max(0), rtol=1e-5, atol=1e-6)
    mean = a.sum(0) / np.maximum((a > 0).sum(0), 1)
    np.testing.assert_allclose(fs.mean_act, mean, rtol=1e-4, atol=1e-6)
    assert fs.n_active[0] == 0  # the factory's dead feature
    assert 0 < (fs.density > 0).sum() and (fs.density < 0.5).all()
    assert (fs.hist_counts.sum(1) == fs.n_active).all()


def test_top_examples_match_brute_force(diff_cache, brute):
    _, cache, _ = diff_cache
    acts, _, _ = brute
    ex = cache.examples
    N, T, F = acts.shape
    for f in range(F):
        best = acts[:, :, f].max(1)
        want = [s for s in np.argsort(-best, kind="stable") if best[s] > 0][:5]
        got = [s for s in ex.top_seq[f] if s >= 0]
        np.testing.assert_allclose(ex.top_act[f, :len(got)], best[want], rtol=1e-5)
        assert got == want or np.allclose(best[got], best[want], rtol=1e-5)  # ties in value
        for j, s in enumerate(got):
            p = ex.top_pos[f, j]
            assert p > 0 and acts[s, p, f] == pytest.approx(ex.top_act[f, j], rel=1e-5)
            lo, hi = p - 4, p + 3
            want_window = np.zeros(7, np.float32)
            want_window[max(0, -lo):7 - max(0, hi - T)] = acts[s, max(lo, 0):min(hi, T), f]
            np.testing.assert_allclose(ex.top_window[f, j], want_window, rtol=2e-3, atol=1e-4)


def test_interval_samples_lie_in_their_intervals(diff_cache, brute):
    _, cache, _ = diff_cache
    acts, _, _ = brute
    ex, fs = cache.examples, cache.features
    F, G, k = ex.iv_seq.shape
    for f in range(F):
        if fs.n_active[f] == 0:
            assert (ex.iv_seq[f] == -1).all()
            continue
        w = ex.iv_width[f]
        assert fs.max_act[f] <= G * w * (1 + 1e-6) and fs.max_act[f] > G * w / 2 * (1 - 1e-6)
        vals = acts[:, :, f][acts[:, :, f] > 0]
        for g in range(G):
            n_in = int(((vals > g * w) & (vals <= (g + 1) * w)).sum())
            sel = ex.iv_seq[f, g] >= 0
            assert sel.sum() == min(k, n_in)
            for s, p, v in zip(ex.iv_seq[f, g][sel], ex.iv_pos[f, g][sel], ex.iv_act[f, g][sel]):
                assert acts[s, p, f] == pytest.approx(v, rel=1e-5)
                assert g * w < v <= (g + 1) * w
            assert len({(s, p) for s, p in zip(ex.iv_seq[f, g][sel], ex.iv_pos[f, g][sel])}) == sel.sum()


def test_logit_effects_match_brute_force(diff_setup, diff_cache, brute):
    cc, _, _ = diff_setup
    _, cache, _ = diff_cache
    _, _, hf = brute
    lg = cache.logits
    effs = []
    for s, model in enumerate(hf):
        U = (model.model.norm.weight[:, None] * model.lm_head.weight.T).detach().numpy()  # [d, V]
        raw = cc.W_dec[:, s].double().numpy() @ U  # [F, V]
        np.testing.assert_allclose(lg.mean[:, s], raw.mean(1), rtol=1e-4, atol=1e-6)
        eff = raw - raw.mean(1, keepdims=True)  # centred over the vocabulary
        effs.append(eff)
        order = np.argsort(-eff, axis=1)
        np.testing.assert_array_equal(lg.top_ids[:, s], order[:, :6])
        np.testing.assert_allclose(lg.top_vals[:, s], np.take_along_axis(eff, order[:, :6], 1), rtol=1e-4,
                                   atol=1e-6)
        np.testing.assert_array_equal(lg.bot_ids[:, s], order[:, ::-1][:, :6])
        np.testing.assert_allclose(lg.hist_lo[:, s], eff.min(1), rtol=1e-4)
        np.testing.assert_allclose(lg.hist_hi[:, s], eff.max(1), rtol=1e-4)
    diff = effs[1] - effs[0]  # B−A table
    order = np.argsort(-diff, axis=1)
    np.testing.assert_array_equal(lg.diff_top_ids, order[:, :6])
    np.testing.assert_allclose(lg.diff_bot_vals, np.take_along_axis(diff, order[:, ::-1][:, :6], 1), rtol=1e-4,
                               atol=1e-6)


def test_decoder_geometry(diff_setup, diff_cache):
    cc, _, _ = diff_setup
    _, cache, _ = diff_cache
    fs = cache.features
    norms = cc.W_dec.norm(dim=-1).numpy()
    np.testing.assert_allclose(fs.dec_norm, norms, rtol=1e-5)
    np.testing.assert_allclose(fs.rel_norm, norms[:, 1] / norms.sum(1), rtol=1e-5)
    # the factory's kinds: shared (f % 4 in {0, 3}), A-only (1), B-only (2)
    assert np.allclose(fs.dec_cos[::4], 1, atol=1e-5) and (fs.rel_norm[1::4] < 0.1).all()
    assert (fs.rel_norm[2::4] > 0.9).all()
    assert fs.neighbours.shape == (cc.n_features, 3)
    assert (fs.neighbours != np.arange(cc.n_features)[:, None]).all()


def test_resume_after_interruption_gives_the_same_cache(diff_setup, diff_cache, tmp_path):
    cc, models, tokens = diff_setup
    _, full, _ = diff_cache

    class Interrupting:
        def __init__(self, inner, after):
            self.inner, self.after, self.calls = inner, after, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def extract(self, ids, mask):
            self.calls += 1
            if self.calls > self.after:
                raise KeyboardInterrupt
            return self.inner.extract(ids, mask)

    options = dataclasses.replace(OPTIONS, save_every=2)
    # the first 2 batches serve the scale estimate and the analysis; the 4th forward is interrupted:
    # the 3 finished batches are saved on the way out
    with pytest.raises(KeyboardInterrupt):
        run_analysis(cc, Interrupting(models, 3), tokens, options, tmp_path, CPU, torch.float32)
    state = torch.load(tmp_path / "state" / "summaries.pt", weights_only=True)
    assert state["batches_done"] == 3
    resumed_models = Interrupting(models, 10**9)
    run_analysis(cc, resumed_models, tokens, options, tmp_path, CPU, torch.float32)
    assert resumed_models.calls == 5 - 3  # 22 sequences = 5 batches, 3 done before; scale from the state
    assert not (tmp_path / "state").exists()
    resumed = read_cache(tmp_path)
    for part in ("features", "examples", "logits"):
        a, b = getattr(full, part), getattr(resumed, part)
        for field in dataclasses.fields(a):
            np.testing.assert_array_equal(getattr(a, field.name), getattr(b, field.name), err_msg=field.name)
    # a complete cache made from the same inputs is reused without running the models
    again = Interrupting(models, 0)
    run_analysis(cc, again, tokens, options, tmp_path, CPU, torch.float32)
    assert again.calls == 0


def test_interrupt_inside_an_update_keeps_the_last_saved_state(diff_setup, tmp_path, monkeypatch):
    cc, models, tokens = diff_setup
    # the state is changed, then the interrupt arrives
    with interrupted_at_update(monkeypatch, 4, after=True), pytest.raises(KeyboardInterrupt):
        run_analysis(cc, models, tokens, dataclasses.replace(OPTIONS, save_every=2), tmp_path, CPU,
                     torch.float32)
    assert torch.load(tmp_path / "state" / "summaries.pt", weights_only=True)["batches_done"] == 2


def test_feature_slice_and_bos_option(diff_setup, diff_cache, tmp_path, capsys):
    cc, models, tokens = diff_setup
    _, full, _ = diff_cache
    options = dataclasses.replace(OPTIONS, n_features=10, exclude_bos=False)
    manifest = run_analysis(cc, models, tokens, options, tmp_path, CPU, torch.float32)
    out = capsys.readouterr().out
    assert "analysed 10 features" in out and "dead" in out and "dense" in out
    sliced = read_cache(tmp_path)
    l0 = float(sliced.features.density.astype(np.float64).sum())
    assert l0 > 0 and f"{l0:.1f} active per token (mean L0)" in out  # the summary line's mean L0
    assert manifest.n_features == 10 and sliced.features.density.shape == (10,)
    assert manifest.n_tokens == tokens.numel() and manifest.checkpoint["n_features_total"] == 64
    bos_hits = sliced.features.n_active - full.features.n_active[:10]
    assert (bos_hits >= 0).all() and (bos_hits <= tokens.shape[0]).all()


def test_given_input_scale_and_cross_layer_sources(tiny_world, tmp_path):
    path = str(tiny_world.gpt2_dir)
    sae = crosscoder_from_ckkissane(tiny_world.sae_ckpt, [path], input_scale=torch.tensor([0.7]))
    two_layers = dataclasses.replace(
        sae, W_enc=torch.cat([sae.W_enc, sae.W_enc]), W_dec=torch.cat([sae.W_dec, sae.W_dec], 1),
        b_dec=torch.cat([sae.b_dec, sae.b_dec]), input_scale=torch.tensor([0.7, 0.5]),
        sources=[Source(path, "blocks.0.hook_resid_post"), Source(path, "blocks.2.hook_resid_post")])
    models = load_models(two_layers.sources, CPU, torch.float32)
    assert len(models.models) == 1
    tokens = load_corpus(str(tiny_world.corpus_txt), models.tokenizer, n_sequences=6, seq_len=16)
    manifest = run_analysis(two_layers, models, tokens, OPTIONS, tmp_path, CPU, torch.float32)
    assert manifest.checkpoint["input_scale"] == pytest.approx([0.7, 0.5])
    assert manifest.checkpoint["input_scale_estimated"] is False
    fs = read_cache(tmp_path).features
    np.testing.assert_allclose(fs.rel_norm, 0.5, rtol=1e-6)  # the same decoder at both layers
    np.testing.assert_allclose(fs.dec_cos, 1, rtol=1e-5)
    assert [s.site for s in manifest.sources] == ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]


def test_nan_activations_are_an_atlas_error(diff_setup, tmp_path):
    cc, models, tokens = diff_setup
    broken = dataclasses.replace(cc, W_enc=cc.W_enc.clone(), input_scale=torch.ones(2))
    broken.W_enc[0, 0, 3] = float("nan")
    with pytest.raises(AtlasError, match="NaN"):
        run_analysis(broken, models, tokens, OPTIONS, tmp_path, CPU, torch.float32)


@pytest.fixture(scope="module")
def brute_x(diff_setup, brute):
    """The sources' activations x[N, T, S, d] (model units) by plain forward hooks, and the counted mask."""
    cc, models, tokens = diff_setup
    _, _, hf = brute
    x = torch.stack([resid_post(m, tokens, 1) for m in hf], dim=2)
    return x.double().numpy(), (tokens != models.bos_token_id).numpy()


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(0)
    b = b - b.mean(0)
    den = np.sqrt((a * a).sum(0))[:, None] * np.sqrt((b * b).sum(0))[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a.T @ b) / np.where(den > 0, den, 1), np.nan)


def test_correlated_neurons_match_brute_force(diff_cache, brute, brute_x):
    _, cache, _ = diff_cache
    acts, _, _ = brute
    x, counted = brute_x
    F, (S, d) = acts.shape[-1], x.shape[-2:]
    corr = _pearson(acts[counted].astype(np.float64), x[counted].reshape(-1, S * d))
    fs = cache.features
    assert fs.ncorr_val.shape == (F, 10) and fs.ncorr_source.dtype == np.int32
    assert (fs.ncorr_source[0] == -1).all()  # the dead feature
    for f in range(1, F):
        got = fs.ncorr_source[f] * d + fs.ncorr_dim[f]
        np.testing.assert_allclose(fs.ncorr_val[f], corr[f, got], atol=1e-4)
        strongest = np.sort(np.abs(corr[f]))[::-1][:10]
        np.testing.assert_allclose(np.abs(fs.ncorr_val[f]), strongest, atol=1e-4)


def test_correlated_features_match_brute_force(diff_setup, diff_cache, brute):
    cc, _, _ = diff_setup
    _, cache, _ = diff_cache
    acts, _, _ = brute
    counted = acts.any(-1) | True
    a = acts.reshape(-1, acts.shape[-1]).astype(np.float64)
    n_tokens = cache.manifest.n_tokens
    keep = np.ones(len(a), bool)
    keep[::acts.shape[1]] = False  # BOS positions (first of each sequence) are not counted
    assert keep.sum() == n_tokens and counted.all()
    full = _pearson(a[keep], a[keep])
    flat = cc.W_dec.reshape(cc.n_features, -1).double().numpy()
    unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    fs = cache.features
    for f in range(1, cc.n_features):
        cand = np.argsort(-sims[f], kind="stable")[:16]
        vals = full[f, cand]
        ok = ~np.isnan(vals)
        order = np.argsort(-vals[ok], kind="stable")[:10]
        n = len(order)
        np.testing.assert_allclose(fs.fcorr_val[f, :n], vals[ok][order], atol=1e-5)
        assert set(fs.fcorr_ids[f, :n]) <= set(cand)
        np.testing.assert_allclose(full[f, fs.fcorr_ids[f, :n]], fs.fcorr_val[f, :n], atol=1e-5)


def test_alignment_and_diff_class(diff_setup, diff_cache):
    cc, _, _ = diff_setup
    _, cache, _ = diff_cache
    fs = cache.features
    flat = cc.W_dec.reshape(cc.n_features, -1).numpy()
    d = cc.d_model
    rms = np.sqrt((cc.W_dec.numpy() ** 2).mean(0))  # [S, d]: no dimension stands out in this decoder
    assert (rms <= 5 * np.median(rms, axis=1, keepdims=True)).all()
    assert cache.manifest.outlier_dims == [[], []]
    _, models, _ = diff_setup
    assert cache.manifest.special_ids == sorted(models.tokenizer.all_special_ids)  # marked in the pages
    assert models.bos_token_id in cache.manifest.special_ids
    for f in range(cc.n_features):
        got = fs.align_source[f] * d + fs.align_dim[f]  # shared features have tied entries in both sources
        np.testing.assert_allclose(np.abs(fs.align_val[f]), np.sort(np.abs(flat[f]))[::-1][:10], rtol=1e-6)
        np.testing.assert_allclose(fs.align_val[f], flat[f, got], rtol=1e-6)
        np.testing.assert_allclose(fs.align_l1_frac[f], np.abs(flat[f, got]) / np.abs(flat[f]).sum(), rtol=1e-5)
    want = np.where(fs.rel_norm < 0.3, 0, np.where(fs.rel_norm > 0.7, 2, 1))
    np.testing.assert_array_equal(fs.diff_class, want)
    # the factory's kinds: shared (f % 4 in {0, 3}), A-only (1), B-only (2)
    assert (fs.diff_class[1::4] == 0).all() and (fs.diff_class[2::4] == 2).all() and (fs.diff_class[::4] == 1).all()


def test_next_token_effects_of_top_examples(diff_setup, diff_cache, brute):
    cc, _, tokens = diff_setup
    _, cache, _ = diff_cache
    _, _, hf = brute
    ex = cache.examples
    F, K, W = ex.top_window.shape
    assert ex.top_next_logit.shape == (F, K, W, 2) and ex.top_next_logit.dtype == np.float16
    assert ex.iv_next_logit is None  # only for top examples by default
    T = tokens.shape[1]
    for s, model in enumerate(hf):
        U = (model.model.norm.weight[:, None] * model.lm_head.weight.T).detach().double().numpy()
        eff = cc.W_dec[:, s].double().numpy() @ U  # [F, V]
        for f in range(F):
            for j in range(K):
                q, p = ex.top_seq[f, j], ex.top_pos[f, j]
                for w in range(W):
                    t = p - 4 + w
                    got = float(ex.top_next_logit[f, j, w, s])
                    if q < 0 or t < 0 or t + 1 >= T:
                        assert got == 0
                        continue
                    want = float(ex.top_window[f, j, w]) * eff[f, tokens[q, t + 1]]
                    assert got == pytest.approx(want, rel=2e-3, abs=1e-3)


def test_optional_statistics_can_be_switched_off(diff_setup, tmp_path):
    cc, models, tokens = diff_setup
    options = dataclasses.replace(OPTIONS, neuron_correlations=False, n_corr_features=0, n_align=0,
                                  next_token_effects="all")
    run_analysis(cc, models, tokens[:10], options, tmp_path, CPU, torch.float32)
    cache = read_cache(tmp_path)
    fs, ex = cache.features, cache.examples
    assert fs.ncorr_val is None and fs.fcorr_ids is None and fs.align_val is None
    assert fs.diff_class is not None and ex.top_next_logit is not None
    assert ex.iv_next_logit.shape == ex.iv_window.shape + (2,)


def test_feature_slice_correlates_within_the_slice(diff_setup, diff_cache, brute, tmp_path):
    cc, models, tokens = diff_setup
    _, full, _ = diff_cache
    acts, _, _ = brute
    options = dataclasses.replace(OPTIONS, features=(8, 24))
    run_analysis(cc, models, tokens, options, tmp_path, CPU, torch.float32)
    fs = read_cache(tmp_path).features
    ids = fs.fcorr_ids[fs.fcorr_ids >= 0]
    assert ids.size and ((ids >= 8) & (ids < 24)).all()  # global ids, candidates among the slice
    a = acts.reshape(-1, acts.shape[-1]).astype(np.float64)[np.arange(acts.size // acts.shape[-1]) % acts.shape[1] > 0]
    corr = _pearson(a, a)
    for row in range(16):
        n = int((fs.fcorr_ids[row] >= 0).sum())
        np.testing.assert_allclose(fs.fcorr_val[row, :n], corr[8 + row, fs.fcorr_ids[row, :n]], atol=1e-5)
    # statistics that do not depend on the slice equal the whole run's
    np.testing.assert_array_equal(fs.ncorr_source, full.features.ncorr_source[8:24])
    np.testing.assert_allclose(fs.ncorr_val, full.features.ncorr_val[8:24], atol=1e-6)
    np.testing.assert_array_equal(fs.align_dim, full.features.align_dim[8:24])


def test_exclude_special_leaves_every_special_token_out(diff_setup, tmp_path, capsys):
    cc, models, tokens = diff_setup
    special = sorted(models.special_ids)
    eos = models.tokenizer.eos_token_id
    assert eos in special
    tokens = tokens.clone()
    tokens[:, 7::9] = eos  # documents joined with EOS, as the corpus loader does
    options = dataclasses.replace(OPTIONS, exclude_special=True)
    manifest = run_analysis(cc, models, tokens, options, tmp_path / "special", CPU, torch.float32)
    plain = run_analysis(cc, models, tokens, OPTIONS, tmp_path / "plain", CPU, torch.float32)
    capsys.readouterr()
    assert manifest.n_tokens == int((~torch.isin(tokens, torch.tensor(special))).sum())
    assert plain.n_tokens == int((tokens != models.bos_token_id).sum()) > manifest.n_tokens
    cache = read_cache(tmp_path / "special")
    assert cache.manifest.settings.exclude_special
    ex = cache.examples
    used = ex.top_seq >= 0
    centre = cache.tokens[ex.top_seq[used], ex.top_pos[used]]
    assert used.any() and not set(centre.tolist()) & set(special)  # no top example sits on a special token


def test_cli_switches_for_optional_statistics(tiny_world, tmp_path, capsys):
    from atlas.cli import main

    argv = ["analyze", str(tiny_world.sae_ckpt), "--dataset", str(tiny_world.corpus_jsonl), "-n", "0",
            "-s", "12", "--seq-len", "32", "--device", "cpu"]
    assert main(argv + ["-o", str(tmp_path / "default")]) == 0
    assert main(argv + ["-o", str(tmp_path / "switched"), "--no-neuron-correlations",
                        "--next-token-effects", "all"]) == 0
    capsys.readouterr()
    default, switched = read_cache(tmp_path / "default"), read_cache(tmp_path / "switched")
    assert default.manifest.settings.n_corr_neurons > 0 and default.features.ncorr_val is not None
    assert switched.manifest.settings.n_corr_neurons == 0
    assert switched.features.ncorr_val is None or switched.features.ncorr_val.size == 0
    assert default.examples.iv_next_logit is None and switched.examples.iv_next_logit is not None
    # the switches change nothing else
    np.testing.assert_array_equal(default.features.density, switched.features.density)
    np.testing.assert_array_equal(default.examples.top_seq, switched.examples.top_seq)


def test_default_batch_size():
    """16 sequences on a CPU; on a GPU about 32k tokens, fewer where the activations would pass 4 GiB."""
    from atlas.analyze import default_batch_size

    assert default_batch_size(CPU, 128, 100_000, torch.float32) == 16
    gpu = torch.device("cuda")
    assert default_batch_size(gpu, 256, 16_384, torch.bfloat16) == 128  # 32,768 tokens, 1 GiB
    assert default_batch_size(gpu, 128, 3072, torch.float32) == 256
    assert default_batch_size(gpu, 1024, 131_072, torch.bfloat16) == 16  # 16k tokens: 4 GiB
    assert default_batch_size(gpu, 4096, 2**20, torch.float32) == 1  # never below one sequence


def test_outlier_dimensions_are_left_out_of_the_logit_tables(diff_setup, diff_cache, brute, tmp_path):
    """A decoder dimension every feature writes to is flagged over the whole dictionary, and the logit
    tables are those of the decoders without it: for the whole dictionary, for a feature slice (the same
    dimension flagged), and not with ``outlier_factor=0``. Activations and the hover stay as they were."""
    cc, models, tokens = diff_setup
    _, plain, _ = diff_cache
    _, _, hf = brute
    W = cc.W_dec.clone()
    W[:, :, 5] += 4 * W.norm(dim=-1)  # every decoder's largest entry, in both sources
    planted = dataclasses.replace(cc, W_dec=W)
    whole = read_cache_of(planted, models, tokens, OPTIONS, tmp_path / "whole")
    assert whole.manifest.outlier_dims == [[5], [5]]
    np.testing.assert_array_equal(whole.features.n_active, plain.features.n_active)
    kept = W.clone()
    kept[:, :, 5] = 0
    for s, model in enumerate(hf):
        U = (model.model.norm.weight[:, None] * model.lm_head.weight.T).detach().double().numpy()
        eff = kept[:, s].double().numpy() @ U
        eff -= eff.mean(1, keepdims=True)
        order = np.argsort(-eff, axis=1)
        np.testing.assert_array_equal(whole.logits.top_ids[:, s], order[:, :6])
        np.testing.assert_allclose(whole.logits.bot_vals[:, s], np.take_along_axis(eff, order[:, ::-1][:, :6], 1),
                                   rtol=1e-4, atol=1e-5)
        share = W[:, s, 5].double() ** 2 / W[:, s].double().pow(2).sum(-1)
        np.testing.assert_allclose(whole.logits.outlier_share[:, s], share.numpy(), rtol=1e-5)
    assert not (whole.features.align_dim == 5).any()
    part = read_cache_of(planted, models, tokens, dataclasses.replace(OPTIONS, features=(4, 9)), tmp_path / "part")
    assert part.manifest.outlier_dims == [[5], [5]]
    np.testing.assert_array_equal(part.logits.top_ids, whole.logits.top_ids[4:9])
    np.testing.assert_allclose(part.logits.outlier_share, whole.logits.outlier_share[4:9], rtol=1e-6)
    kept_all = read_cache_of(planted, models, tokens, dataclasses.replace(OPTIONS, outlier_factor=0),
                             tmp_path / "all")
    assert kept_all.manifest.outlier_dims == [[], []] and (kept_all.logits.outlier_share == 0).all()
    U0 = (hf[0].model.norm.weight[:, None] * hf[0].lm_head.weight.T).detach().double().numpy()
    eff = W[:, 0].double().numpy() @ U0
    np.testing.assert_array_equal(kept_all.logits.top_ids[:, 0], np.argsort(-eff, axis=1)[:, :6])
    np.testing.assert_array_equal(kept_all.examples.top_next_logit, whole.examples.top_next_logit)


def read_cache_of(cc, models, tokens, options, folder):
    run_analysis(cc, models, tokens, options, folder, CPU, torch.float32)
    return read_cache(folder)


def test_negative_outlier_factor_is_refused(diff_setup, tmp_path):
    cc, models, tokens = diff_setup
    with pytest.raises(AtlasError, match="--outlier-factor must be 0"):
        run_analysis(cc, models, tokens, dataclasses.replace(OPTIONS, outlier_factor=-1), tmp_path, CPU,
                     torch.float32)
