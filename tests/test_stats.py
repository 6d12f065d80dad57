"""atlas.stats: every summary against a brute-force computation over the same activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atlas.cache import Settings
from atlas.stats import (FeatureSummaries, decoder_norms, interval_keys, logit_effects, merge, nearest_neighbours,
                         neuron_alignment, next_token_ids, outlier_dims, outlier_share)
from atlas.stats.intervals import power_of_two_exponent

SETTINGS = Settings(top_k=4, n_intervals=3, interval_k=2, window_before=3, window_after=2, hist_bins=16,
                    hist_log10_min=-2, hist_log10_max=2)
N_SEQ, T, F = 24, 12, 7
SEED = 5


def synthetic_acts(seed=0):
    """[N_SEQ, T, F] sparse non-negative activations with features of very different behaviour:
    f0 dead, f1 dense, f2 rare, f3 growing over the corpus (forces rescaling), f4 values spanning
    decades (hist clamping), f5/f6 ordinary."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N_SEQ, T, F, generator=g)
    acts = torch.relu(z - 0.8)
    acts[..., 0] = 0
    acts[..., 1] = torch.relu(z[..., 1] + 2)
    acts[..., 2] = torch.relu(z[..., 2] - 2.2) * 3
    acts[..., 3] = acts[..., 3] * torch.logspace(-1, 3, N_SEQ)[:, None]
    acts[..., 4] = torch.where(z[..., 4] > 0.3, 10 ** (6 * torch.rand(N_SEQ, T, generator=g) - 3), 0.0)
    counted = torch.ones(N_SEQ, T, dtype=torch.bool)
    counted[:, 0] = False  # the BOS position
    return acts, counted


def run(acts, counted, batch, seq_range=None):
    lo, hi = seq_range or (0, acts.shape[0])
    s = FeatureSummaries(F, SETTINGS, SEED)
    for start in range(lo, hi, batch):
        stop = min(start + batch, hi)
        s.update(acts[start:stop].clone(), counted[start:stop], seq_offset=start)
    return s


@pytest.fixture(scope="module")
def data():
    acts, counted = synthetic_acts()
    return acts, counted, run(acts, counted, batch=5).finalize()


def masked(acts, counted):
    return (acts * counted[:, :, None]).numpy()


def window(a, s, p, f):
    W = SETTINGS.window
    out = np.zeros(W, np.float32)
    for j in range(W):
        t = p - SETTINGS.window_before + j
        if 0 <= t < a.shape[1]:
            out[j] = a[s, t, f]
    return out


def test_scalars_match_brute_force(data):
    acts, counted, out = data
    a = masked(acts, counted).reshape(-1, F)
    n_tokens = int(counted.sum())
    active = a > 0
    np.testing.assert_array_equal(out["n_active"], active.sum(0))
    np.testing.assert_allclose(out["density"], active.sum(0) / n_tokens, rtol=1e-6)
    np.testing.assert_array_equal(out["max_act"], a.max(0))
    mean = np.where(active.sum(0) > 0, a.sum(0) / np.maximum(active.sum(0), 1), 0)
    np.testing.assert_allclose(out["mean_act"], mean, rtol=1e-5)
    edges = SETTINGS.hist_edges().astype(np.float32)
    want = np.zeros((F, SETTINGS.hist_bins), np.int64)
    for f in range(F):
        v = a[:, f][a[:, f] > 0]
        b = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, SETTINGS.hist_bins - 1)
        want[f] = np.bincount(b, minlength=SETTINGS.hist_bins)
    np.testing.assert_array_equal(out["hist_counts"], want)
    assert out["n_active"][0] == 0 and want[4, 0] > 0 and want[4, -1] > 0  # dead; clamped at both ends


def test_top_examples_match_brute_force(data):
    acts, counted, out = data
    a = masked(acts, counted)
    K = SETTINGS.top_k
    for f in range(F):
        best = a[:, :, f].max(1)
        cands = sorted(((-best[s], s) for s in range(N_SEQ) if best[s] > 0))[:K]
        assert len([s for s in out["top_seq"][f] if s >= 0]) == len(cands)
        for j, (neg, s) in enumerate(cands):
            p = int(a[s, :, f].argmax())
            assert (out["top_seq"][f, j], out["top_pos"][f, j]) == (s, p)
            assert out["top_act"][f, j] == -neg
            np.testing.assert_allclose(out["top_window"][f, j], window(a, s, p, f), rtol=1e-3)
        for j in range(len(cands), K):
            assert out["top_seq"][f, j] == -1 and out["top_act"][f, j] == 0
    assert (out["top_pos"][out["top_seq"] >= 0] > 0).all()  # never the uncounted BOS position


def test_interval_samples_match_brute_force(data):
    acts, counted, out = data
    a = masked(acts, counted)
    G, k = 2 * SETTINGS.n_intervals, SETTINGS.interval_k
    assert out["iv_seq"].shape == (F, G, k)
    for f in range(F):
        s_idx, p_idx = np.nonzero(a[:, :, f])
        if len(s_idx) == 0:
            assert (out["iv_seq"][f] == -1).all() and out["iv_width"][f] == 0
            continue
        vals = a[s_idx, p_idx, f]
        e = int(np.ceil(np.log2(vals.max())))
        assert 2.0 ** e >= vals.max() > 2.0 ** (e - 1)
        width = 2.0 ** e / G
        assert out["iv_width"][f] == np.float32(width)
        bins = np.clip(np.ceil(np.ldexp(vals, -e) * np.float32(G)) - 1, 0, G - 1).astype(int)
        assert ((vals > bins * width) & (vals <= (bins + 1) * width)).all()
        keys = interval_keys(SEED, torch.tensor(s_idx * T + p_idx), torch.full((len(s_idx),), f)).numpy()
        for g in range(G):
            members = np.nonzero(bins == g)[0]
            chosen = members[np.argsort(keys[members])[:k]]
            want = sorted(((-vals[i], s_idx[i], p_idx[i]) for i in chosen))
            got_n = int((out["iv_seq"][f, g] >= 0).sum())
            assert got_n == len(want)
            for j, (neg, s, p) in enumerate(want):
                assert (out["iv_seq"][f, g, j], out["iv_pos"][f, g, j]) == (s, p)
                assert out["iv_act"][f, g, j] == -neg
                np.testing.assert_allclose(out["iv_window"][f, g, j], window(a, s, p, f), rtol=1e-3)
    # at least n_intervals bins lie within (0, max]
    live = out["max_act"] > 0
    assert (out["iv_width"][live] * SETTINGS.n_intervals <= out["max_act"][live]).all()
    occupied = (out["iv_seq"][3] >= 0).any(1)
    assert occupied.sum() >= 3  # the growing feature spreads over several intervals


@pytest.mark.parametrize("batch", [1, 3, 24])
def test_batching_does_not_change_results(data, batch):
    acts, counted, out = data
    other = run(acts, counted, batch=batch).finalize()
    for name in out:
        if name == "mean_act":  # float32 sums within a batch
            np.testing.assert_allclose(other[name], out[name], rtol=1e-6)
        else:
            np.testing.assert_array_equal(other[name], out[name], err_msg=name)


def test_shards_merged_equal_one_run(data):
    acts, counted, out = data
    a = run(acts, counted, batch=4, seq_range=(0, 10))
    b = run(acts, counted, batch=7, seq_range=(10, N_SEQ))
    merged = merge(a, b).finalize()
    for name in out:
        if name == "mean_act":
            np.testing.assert_allclose(merged[name], out[name], rtol=1e-6)
        else:
            np.testing.assert_array_equal(merged[name], out[name], err_msg=name)
    # the other order too
    merged = merge(run(acts, counted, 7, (10, N_SEQ)), run(acts, counted, 4, (0, 10))).finalize()
    for name in out:
        np.testing.assert_allclose(merged[name], out[name], rtol=1e-6, err_msg=name)


def test_state_dict_round_trip(data, tmp_path):
    acts, counted, out = data
    first = run(acts, counted, batch=5, seq_range=(0, 10))
    torch.save(first.state_dict(), tmp_path / "s.pt")
    resumed = FeatureSummaries(F, SETTINGS, SEED)
    resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    for start in range(10, N_SEQ, 5):
        stop = min(start + 5, N_SEQ)
        resumed.update(acts[start:stop].clone(), counted[start:stop], seq_offset=start)
    got = resumed.finalize()
    for name in out:
        np.testing.assert_array_equal(got[name], out[name], err_msg=name)


def test_interval_keys_look_uniform_and_independent():
    g = torch.arange(200_000)
    u = interval_keys(0, g, torch.full_like(g, 3)).double() / 2**62
    assert ((u >= 0) & (u < 1)).all()
    counts = np.histogram(u.numpy(), bins=20, range=(0, 1))[0]
    assert counts.min() > 0.9 * 10_000 and counts.max() < 1.1 * 10_000
    v = interval_keys(0, g, torch.full_like(g, 4)).double() / 2**62
    w = interval_keys(1, g, torch.full_like(g, 3)).double() / 2**62
    for x, y in ((u, v), (u, w), (u[1:], u[:-1])):
        assert abs(np.corrcoef(x.numpy(), y.numpy())[0, 1]) < 0.01
    assert len(set(interval_keys(0, g, torch.zeros_like(g)).tolist())) == len(g)


def test_power_of_two_exponent():
    x = torch.tensor([0.3, 0.5, 1.0, 1.5, 2.0, 3.0, 1000.0, 1e-3])
    e = power_of_two_exponent(x)
    assert e.tolist() == [-1, -1, 0, 1, 1, 2, 10, -9]


def test_decoder_geometry_brute_force():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(13, 2, 5, generator=g)
    W[3, 1] = 0  # a model-A-only feature
    W[4] = W[5] * 2 + 0.01 * torch.randn(2, 5, generator=g)  # nearly the direction of feature 5
    out = decoder_norms(W)
    Wn = W.numpy()
    norms = np.linalg.norm(Wn, axis=-1)
    np.testing.assert_allclose(out["dec_norm"], norms, rtol=1e-6)
    np.testing.assert_allclose(out["rel_norm"], norms[:, 1] / norms.sum(1), rtol=1e-6)
    assert out["rel_norm"][3] == 0 and np.isnan(out["dec_cos"][3])
    cos = (Wn[:, 0] * Wn[:, 1]).sum(-1) / np.maximum(norms.prod(1), 1e-30)
    np.testing.assert_allclose(np.delete(out["dec_cos"], 3), np.delete(cos, 3), rtol=1e-5)
    assert np.isnan(decoder_norms(W[:, :1])["rel_norm"]).all()

    nn = nearest_neighbours(W, n=4, chunk=5)
    flat = Wn.reshape(13, -1)
    unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    want = np.argsort(-sims, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(nn["neighbours"], want)
    np.testing.assert_allclose(nn["neighbour_cos"], np.take_along_axis(sims, want, 1), rtol=1e-5)
    assert nn["neighbours"][4, 0] == 5 and nn["neighbour_cos"][4, 0] > 0.99
    small = nearest_neighbours(W[:3], n=4)
    assert (small["neighbours"][:, 2:] == -1).all() and np.isnan(small["neighbour_cos"][:, 2:]).all()


def test_outlier_dimension_is_flagged_and_left_out_of_alignment():
    """A planted massive dimension (the largest entry of every feature, as in a residual stream) is
    flagged by the median rule and every ranking of the alignment is the brute-force ranking without it."""
    g = torch.Generator().manual_seed(5)
    F, S, d = 30, 2, 16
    W = torch.randn(F, S, d, generator=g)
    W[:, 1, 7] = 40 + torch.rand(F, generator=g)  # source B, dimension 7
    W[:3, 0, 2] = 12.0  # large in three features only: its RMS stays under the bar
    mask = outlier_dims(W)
    rms = np.sqrt((W.numpy() ** 2).mean(0))
    np.testing.assert_array_equal(mask, rms > 5 * np.median(rms, axis=1, keepdims=True))
    assert mask.sum() == 1 and mask[1, 7]
    plain = neuron_alignment(W, k=4)
    assert (plain["align_source"][:, 0] == 1).all() and (plain["align_dim"][:, 0] == 7).all()
    out = neuron_alignment(W, k=4, exclude=mask, block=64)  # several blocks
    flat = W.reshape(F, -1).numpy()
    allowed = ~mask.reshape(-1)
    for f in range(F):
        cols = np.flatnonzero(allowed)
        want = cols[np.argsort(-np.abs(flat[f, cols]), kind="stable")[:4]]
        got = out["align_source"][f] * d + out["align_dim"][f]
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(out["align_val"][f], flat[f, want], rtol=1e-6)
        np.testing.assert_allclose(out["align_l1_frac"][f], np.abs(flat[f, want]) / np.abs(flat[f]).sum(), rtol=1e-5)
    assert not outlier_dims(torch.randn(F, S, d, generator=g)).any()


def test_logit_effects_brute_force():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(9, 2, 6, generator=g)
    U = [torch.randn(6, 50, generator=g), torch.randn(6, 50, generator=g)]
    out = logit_effects(W, U, k=5, n_bins=7, max_elements=120)  # several chunks
    effs = {}
    for f in range(9):
        for s in range(2):
            raw = W[f, s].double().numpy() @ U[s].double().numpy()
            assert out["mean"][f, s] == pytest.approx(raw.mean(), rel=1e-4, abs=1e-5)
            eff = raw - raw.mean()  # centred over the vocabulary
            effs[f, s] = eff
            order = np.argsort(-eff)
            np.testing.assert_array_equal(out["top_ids"][f, s], order[:5])
            np.testing.assert_allclose(out["top_vals"][f, s], eff[order[:5]], rtol=1e-5)
            np.testing.assert_array_equal(out["bot_ids"][f, s], order[::-1][:5])
            np.testing.assert_allclose(out["bot_vals"][f, s], eff[order[::-1][:5]], rtol=1e-5)
            assert out["hist_lo"][f, s] == pytest.approx(eff.min(), rel=1e-5)
            assert out["hist_hi"][f, s] == pytest.approx(eff.max(), rel=1e-5)
            counts, _ = np.histogram(eff, bins=7, range=(eff.min(), eff.max()))
            assert out["hist_counts"][f, s].sum() == 50
            assert np.abs(out["hist_counts"][f, s] - counts).sum() <= 2  # float rounding at bin edges
        diff = effs[f, 1] - effs[f, 0]  # the B−A table: growth of the centred effect from A's decoder to B's
        order = np.argsort(-diff)
        np.testing.assert_array_equal(out["diff_top_ids"][f], order[:5])
        np.testing.assert_allclose(out["diff_top_vals"][f], diff[order[:5]], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(out["diff_bot_ids"][f], order[::-1][:5])
        np.testing.assert_allclose(out["diff_bot_vals"][f], diff[order[::-1][:5]], rtol=1e-4, atol=1e-5)
    none = logit_effects(W, U, k=0, n_bins=7, max_elements=120)  # no top tokens: the histograms stay
    assert none["top_ids"].shape == (9, 2, 0) and none["bot_vals"].shape == (9, 2, 0)
    for name in ("hist_counts", "hist_lo", "hist_hi"):
        np.testing.assert_array_equal(none[name], out[name])
    single = logit_effects(W[:, :1], U[:1], k=5, n_bins=7)  # one source: no B−A table
    assert "diff_top_ids" not in single
    np.testing.assert_array_equal(single["top_ids"][:, 0], out["top_ids"][:, 0])


def test_outlier_dims_over_blocks_and_factor():
    """Read in blocks of rows, the rule flags the same dimensions; a larger factor flags fewer, 0 none."""
    g = torch.Generator().manual_seed(8)
    W = torch.randn(50, 2, 12, generator=g)
    W[:, 0, 3] += 30.0  # RMS about 30× the median dimension's
    W[:, 1, 5] += 15.0  # about 15×
    whole = outlier_dims(W)
    assert whole[0, 3] and whole[1, 5] and whole.sum() == 2
    np.testing.assert_array_equal(outlier_dims(W, block=24 * 3), whole)  # 3 rows per block, a short last one
    assert outlier_dims(W, factor=20.0).sum() == 1 and outlier_dims(W, factor=20.0)[0, 3]
    assert not outlier_dims(W, factor=0).any() and outlier_dims(W, factor=0).shape == (2, 12)
    assert outlier_dims(W.to(torch.bfloat16)).sum() == 2


def test_outlier_share_brute_force():
    g = torch.Generator().manual_seed(9)
    W = torch.randn(6, 2, 5, generator=g)
    W[2, 1] = 0  # a zero decoder via B
    mask = np.zeros((2, 5), bool)
    mask[0, [1, 4]] = True
    got = outlier_share(W, mask)
    assert got.shape == (6, 2) and got.dtype == np.float32
    np.testing.assert_array_equal(outlier_share(W, mask, block=10), got)  # one row per block
    w = W.double().numpy()
    for f in range(6):
        assert got[f, 0] == pytest.approx((w[f, 0, [1, 4]] ** 2).sum() / (w[f, 0] ** 2).sum(), rel=1e-5)
        if f != 2:
            assert got[f, 1] == 0
    assert np.isnan(got[2, 1])


def test_logit_effects_leave_out_excluded_dimensions():
    """With ``exclude``, every table (top, bottom, histogram, mean, B−A) is the brute force of the decoder
    with those entries set to 0, while the next-token hover keeps the whole decoder's effect."""
    g = torch.Generator().manual_seed(3)
    F_, d, V = 8, 6, 40
    W = torch.randn(F_, 2, d, generator=g)
    W[:, :, 2] += 20.0  # a massive dimension every decoder writes to, in both sources
    U = [torch.randn(d, V, generator=g), torch.randn(d, V, generator=g)]
    U[0][2, 7] = U[1][2, 7] = 5.0  # ... which the unembedding turns into one token promoted for everyone
    mask = np.zeros((2, d), bool)
    mask[:, 2] = True
    tokens = torch.randint(0, V, (4, 10), generator=g)
    seq = torch.randint(0, 4, (F_, 2), generator=g)
    pos = torch.randint(1, 8, (F_, 2), generator=g)
    acts = torch.rand(F_, 2, 4, generator=g).half().numpy()
    windows = {"hover": (seq.numpy(), pos.numpy(), acts)}
    raw = logit_effects(W, U, k=4, n_bins=5, max_elements=3 * V)
    assert (raw["top_ids"][:, :, 0] == 7).all()  # every feature's first promoted token, without exclusion
    out = logit_effects(W, U, k=4, n_bins=5, max_elements=3 * V, exclude=mask, windows=windows,
                        tokens=tokens.numpy(), window_before=1)
    kept = W.clone()
    kept[:, :, 2] = 0
    want = logit_effects(kept, U, k=4, n_bins=5)
    for name in ("top_ids", "bot_ids", "hist_counts", "diff_top_ids", "diff_bot_ids"):
        np.testing.assert_array_equal(out[name], want[name], err_msg=name)
    for name in ("top_vals", "bot_vals", "hist_lo", "hist_hi", "mean", "diff_top_vals", "diff_bot_vals"):
        np.testing.assert_allclose(out[name], want[name], rtol=1e-4, atol=1e-4, err_msg=name)
    assert (out["top_ids"][:, :, 0] != 7).any()
    ids = next_token_ids(tokens, seq, pos, 1, 2)
    for f in range(F_):  # the hover: the whole decoder's effect on the next token's logit
        for j in range(2):
            for w in range(4):
                if ids[f, j, w] < 0:
                    continue
                for s in range(2):
                    whole = float(acts[f, j, w]) * float(W[f, s] @ U[s][:, ids[f, j, w]])
                    assert float(out["hover"][f, j, w, s]) == pytest.approx(whole, rel=2e-3, abs=1e-2)


def test_low_precision_activations_fold_as_their_float32_values():
    """A GPU encodes in bfloat16 and the summaries read that buffer as it is: every statistic (windows
    and correlations included) equals the one folded from the same values widened to float32 first."""
    import dataclasses

    acts, counted = synthetic_acts(seed=3)
    acts = acts.clamp_max(60_000).to(torch.bfloat16)  # values a bfloat16 encode can produce
    x = torch.randn(N_SEQ, T, 2, 4, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    settings = dataclasses.replace(SETTINGS, n_corr_neurons=3, n_corr_features=2)
    cand = torch.tensor([[(f + 1) % F, (f + 2) % F, -1] for f in range(F)])

    def fold(a):
        s = FeatureSummaries(F, settings, SEED, width=8, n_sources=2, candidates=cand)
        for lo in range(0, N_SEQ, 5):
            s.update(a[lo:lo + 5].clone(), counted[lo:lo + 5], seq_offset=lo, x=x[lo:lo + 5])
        return s.finalize()

    low, wide = fold(acts), fold(acts.float())
    assert low.keys() == wide.keys() and {"ncorr_val", "fcorr_val", "top_window", "iv_window"} <= low.keys()
    for name in wide:
        np.testing.assert_array_equal(low[name], wide[name], err_msg=name)
