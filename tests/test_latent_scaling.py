"""Latent scaling (atlas.stats.latent_scaling) against a brute force over every token of a tiny
two-model crosscoder, and the same numbers from a feature slice, a sharded run and a one-source SAE."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from factory import resid_post, small_analysis_options
from transformers import AutoModelForCausalLM

from atlas.analyze import run_analysis
from atlas.cache import read_cache
from atlas.errors import AtlasError

CPU = torch.device("cpu")
OPTIONS = small_analysis_options()


@pytest.fixture(scope="module")
def scaled_run(diff_setup, tmp_path_factory):
    cc, models, tokens = diff_setup
    folder = tmp_path_factory.mktemp("latent-scaling")
    run_analysis(cc, models, tokens, OPTIONS, folder, CPU, torch.float32)
    return read_cache(folder)


@pytest.fixture(scope="module")
def sae_setup(tiny_world):
    """A one-source SAE on the tiny GPT-2, its model and a few sequences."""
    from factory import crosscoder_from_ckkissane

    from atlas.corpus import load_corpus
    from atlas.models import load_models

    cc = crosscoder_from_ckkissane(tiny_world.sae_ckpt, [str(tiny_world.gpt2_dir)])
    models = load_models(cc.sources, CPU, torch.float32)
    tokens = load_corpus(str(tiny_world.corpus_jsonl), models.tokenizer, n_sequences=10, seq_len=24, seed=1)
    return cc, models, tokens


def brute_force_betas(diff_setup):
    """β^ε and β^r [F, m, t] and ν^ε, ν^r [F] from every token's activations, by the definitions."""
    cc, models, tokens = diff_setup
    hf = [AutoModelForCausalLM.from_pretrained(s.model).eval() for s in cc.sources]
    with torch.no_grad():
        x = torch.stack([resid_post(m, tokens, 1) for m in hf], dim=2)  # [N, T, S, d]
    counted = tokens != models.bos_token_id
    n_est = OPTIONS.batch_size * OPTIONS.scale_batches
    scale = math.sqrt(x.shape[-1]) / x[:n_est][counted[:n_est]].norm(dim=-1).mean(0)
    enc = dataclasses.replace(cc, input_scale=scale)
    xs = x[counted]  # [n, S, d], counted tokens only
    f = enc.encode(xs).double()  # [n, F]
    h = (xs * scale[None, :, None]).double()
    W = cc.W_dec.double()  # [F, S, d]
    recon = torch.einsum("nf,fsd->nsd", f, W) + cc.b_dec.double()
    F, S = W.shape[:2]
    beta_err = np.full((F, S, S), np.nan)
    beta_rec = np.full((F, S, S), np.nan)
    for j in range(F):
        fj = f[:, j]
        if not (fj > 0).any():
            continue
        for m in range(S):
            d = W[j, m]
            den = float(d @ d) * float((fj ** 2).sum())
            for t in range(S):
                y_err = h[:, t] - recon[:, t] + fj[:, None] * W[j, t]  # the latent's own part added back
                beta_err[j, m, t] = float((fj * (y_err @ d)).sum()) / den
                beta_rec[j, m, t] = float((fj * (recon[:, t] @ d)).sum()) / den
    own = (W.norm(dim=-1).argmax(dim=1)).numpy()
    other = 1 - own
    rows = np.arange(F)
    nu_err = beta_err[rows, own, other] / beta_err[rows, own, own]
    nu_rec = beta_rec[rows, own, other] / beta_rec[rows, own, own]
    return beta_err, beta_rec, nu_err, nu_rec


def test_latent_scaling_matches_brute_force(diff_setup, scaled_run):
    beta_err, beta_rec, nu_err, nu_rec = brute_force_betas(diff_setup)
    fs = scaled_run.features
    assert scaled_run.manifest.settings.latent_scaling
    F = beta_err.shape[0]
    assert fs.ls_beta_err.shape == (F, 2, 2) and fs.ls_beta_err.dtype == np.float32
    assert fs.ls_nu_err.shape == (F,) and fs.ls_nu_rec.dtype == np.float32
    # the dead feature has no fit; the others all do
    np.testing.assert_array_equal(np.isnan(fs.ls_beta_err), np.isnan(beta_err))
    assert np.isfinite(beta_err).sum() > 0.9 * beta_err.size
    np.testing.assert_allclose(fs.ls_beta_err, beta_err, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fs.ls_beta_rec, beta_rec, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fs.ls_nu_err, nu_err, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(fs.ls_nu_rec, nu_rec, rtol=1e-3, atol=1e-4)


def test_a_feature_slice_with_latent_scaling_on_equals_the_whole(diff_setup, scaled_run, tmp_path):
    cc, models, tokens = diff_setup
    options = dataclasses.replace(OPTIONS, features=(3, 9), latent_scaling="on")
    run_analysis(cc, models, tokens, options, tmp_path, CPU, torch.float32)
    part = read_cache(tmp_path).features
    whole = scaled_run.features
    for name in ("ls_beta_err", "ls_beta_rec", "ls_nu_err", "ls_nu_rec"):
        np.testing.assert_allclose(getattr(part, name), getattr(whole, name)[3:9], rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_auto_skips_a_slice_and_off_skips_it_all(diff_setup, tmp_path):
    cc, models, tokens = diff_setup
    run_analysis(cc, models, tokens, dataclasses.replace(OPTIONS, features=(0, 4)), tmp_path / "a", CPU,
                 torch.float32)
    run_analysis(cc, models, tokens, dataclasses.replace(OPTIONS, latent_scaling="off"), tmp_path / "b", CPU,
                 torch.float32)
    for folder in ("a", "b"):
        cache = read_cache(tmp_path / folder)
        assert cache.features.ls_nu_err is None and not cache.manifest.settings.latent_scaling


def test_latent_scaling_on_needs_two_sources(sae_setup, tmp_path):
    cc, models, tokens = sae_setup
    with pytest.raises(AtlasError, match="--latent-scaling on needs a crosscoder over two models"):
        run_analysis(cc, models, tokens, dataclasses.replace(OPTIONS, latent_scaling="on"), tmp_path, CPU,
                     torch.float32)
    run_analysis(cc, models, tokens, OPTIONS, tmp_path, CPU, torch.float32)  # auto: nothing to compute
    assert read_cache(tmp_path).features.ls_beta_err is None


@pytest.mark.parametrize("block", [2**24, 40])  # one block of latents; several, each a few rows
def test_sums_over_unsorted_entries_in_blocks_match_the_definitions(monkeypatch, block):
    """``reconstruct`` and ``LatentScaling.update`` from active entries in any order (not sorted by token
    or latent), over one or several blocks of latents, equal the dense sums by their definitions."""
    from atlas.stats import latent_scaling

    monkeypatch.setattr(latent_scaling, "BLOCK", block)
    g = torch.Generator().manual_seed(4)
    N, F, S, d = 30, 11, 2, 5
    acts = torch.rand(N, F, generator=g) * (torch.rand(N, F, generator=g) < 0.3)
    acts[:, 7] = 0  # a latent never active in the batch
    tok, feat = acts.nonzero(as_tuple=True)
    order = torch.randperm(tok.numel(), generator=g)
    tok, feat = tok[order], feat[order]
    coef = acts[tok, feat]
    W = torch.randn(F, S, d, generator=g)
    b = torch.randn(S, d, generator=g)
    h = torch.randn(N, S, d, generator=g)
    recon = latent_scaling.reconstruct(h, tok, feat, coef, W, b)
    want = torch.einsum("nf,fsd->nsd", acts.double(), W.double()) + b.double()
    torch.testing.assert_close(recon.double(), want, rtol=1e-5, atol=1e-5)
    ls = latent_scaling.LatentScaling(F, S)
    ls.update(tok, feat, coef, h, recon, W)
    err, rec = h.double() - recon.double(), recon.double()
    torch.testing.assert_close(ls.f2, (acts.double() ** 2).sum(0))
    torch.testing.assert_close(ls.num_err, torch.einsum("nf,fmd,ntd->fmt", acts.double(), W.double(), err),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ls.num_rec, torch.einsum("nf,fmd,ntd->fmt", acts.double(), W.double(), rec),
                               rtol=1e-5, atol=1e-5)
    assert (ls.num_rec[7] == 0).all()
    out = ls.finalize(W)  # in blocks of rows too
    norm2 = (W.double() ** 2).sum(-1)
    gram = torch.einsum("fmd,ftd->fmt", W.double(), W.double())
    f2 = ls.f2[:, None, None]
    torch.testing.assert_close(torch.from_numpy(out["ls_beta_rec"]).double(), ls.num_rec / (norm2[:, :, None] * f2),
                               rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(torch.from_numpy(out["ls_beta_err"]).double(),
                               (ls.num_err + f2 * gram) / (norm2[:, :, None] * f2), rtol=1e-5, atol=1e-6,
                               equal_nan=True)
    assert np.isnan(out["ls_nu_err"][7]) and np.isfinite(out["ls_nu_err"][np.arange(F) != 7]).all()
