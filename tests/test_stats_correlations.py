"""atlas.stats correlations, neuron alignment, model-diff classes and next-token effects against brute force."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from atlas.cache import Settings
from atlas.stats import FeatureSummaries, merge
from atlas.stats.correlations import FeatureCorrelations, NeuronCorrelations, sparse_t_matmul
from atlas.stats.geometry import diff_classes, neuron_alignment
from atlas.stats.logits import logit_effects, next_token_ids

N_SEQ, T, F, S, D = 20, 10, 9, 2, 6
SETTINGS = Settings(top_k=3, n_intervals=2, interval_k=2, window_before=2, window_after=1, hist_bins=8,
                    n_corr_neurons=4, n_corr_features=3, n_corr_candidates=5)


def synthetic(seed=0):
    """Sparse acts[N, T, F] and neurons x[N, T, S, D] with large offsets (1e3) and small spread, some
    neurons driven by features (strong correlations of both signs), a constant neuron, a dead feature,
    and co-activating feature pairs."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N_SEQ, T, F, generator=g)
    acts = torch.relu(z - 0.5)
    acts[..., 0] = 0  # dead
    acts[..., 2] = torch.relu(z[..., 1] - 0.3) * 2 + torch.relu(z[..., 2] - 1.5)  # co-active with f1
    acts[..., 5] = torch.relu(z[..., 5] + 1.5)  # dense
    x = 1e3 + torch.randn(N_SEQ, T, S, D, generator=g) * 0.5
    x[..., 0, 1] += 3 * acts[..., 3]
    x[..., 1, 4] -= 2 * acts[..., 4] + 0.5 * acts[..., 3]
    x[..., 1, 0] = 7.0  # constant neuron
    x[:, 0] = -5e3  # BOS: an outlier that must not count
    counted = torch.ones(N_SEQ, T, dtype=torch.bool)
    counted[:, 0] = False
    return acts, x.double(), counted


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of columns of a[n, P] with columns of b[n, Q] (float64, NaN if constant)."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    num = a.T @ b
    den = np.sqrt((a * a).sum(0))[:, None] * np.sqrt((b * b).sum(0))[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def candidates_for(seed=1):
    g = torch.Generator().manual_seed(seed)
    cand = torch.stack([torch.randperm(F - 1, generator=g)[:5] for _ in range(F)])
    cand = cand + (cand >= torch.arange(F)[:, None])  # never itself
    cand[1, 0] = 2
    cand[2, 1] = 1
    cand[7, 3:] = -1  # fewer candidates
    return cand


def run(acts, x, counted, batch, seq_range=None, cand=None, dtype=torch.float32):
    lo, hi = seq_range or (0, acts.shape[0])
    s = FeatureSummaries(F, SETTINGS, 0, width=S * D, n_sources=S,
                         candidates=candidates_for() if cand is None else cand)
    for start in range(lo, hi, batch):
        stop = min(start + batch, hi)
        s.update(acts[start:stop].clone(), counted[start:stop], seq_offset=start, x=x[start:stop].to(dtype))
    return s


@pytest.fixture(scope="module")
def data():
    acts, x, counted = synthetic()
    return acts, x, counted, run(acts, x, counted, batch=3).finalize()


def brute_neurons(acts, x, counted):
    keep = counted.reshape(-1).numpy()
    a = acts.reshape(-1, F).double().numpy()[keep]
    xx = x.reshape(-1, S * D).numpy()[keep]
    return pearson(a, xx)


def test_neuron_correlations_match_brute_force(data):
    acts, x, counted, out = data
    corr = brute_neurons(acts, x, counted)
    k = SETTINGS.n_corr_neurons
    assert out["ncorr_source"].shape == (F, k) and out["ncorr_val"].dtype == np.float32
    assert (out["ncorr_source"][0] == -1).all() and np.isnan(out["ncorr_val"][0]).all()  # dead feature
    for f in range(1, F):
        order = np.argsort(-np.where(np.isnan(corr[f]), -1, np.abs(corr[f])), kind="stable")[:k]
        got = out["ncorr_source"][f] * D + out["ncorr_dim"][f]
        np.testing.assert_array_equal(got, order, err_msg=f"feature {f}")
        np.testing.assert_allclose(out["ncorr_val"][f], corr[f, order], atol=2e-6)
        assert 1 * D + 0 not in got  # the constant neuron has no correlation
    assert (out["ncorr_source"][3, 0], out["ncorr_dim"][3, 0]) == (0, 1) and out["ncorr_val"][3, 0] > 0.9
    assert (out["ncorr_source"][4, 0], out["ncorr_dim"][4, 0]) == (1, 4) and out["ncorr_val"][4, 0] < -0.8


def test_neuron_correlations_with_half_precision_inputs(data):
    acts, x, counted, out = data
    # bf16 inputs: rounding of x (offset 1e3, spread 0.5) is the only difference
    x16 = (x - 1e3).to(torch.bfloat16).double() + 1e3
    corr = brute_neurons(acts, x16, counted)
    got = run(acts, x - 1e3, counted, batch=4, dtype=torch.bfloat16).finalize()
    f = 3
    idx = got["ncorr_source"][f] * D + got["ncorr_dim"][f]
    np.testing.assert_allclose(got["ncorr_val"][f], corr[f, idx], atol=1e-5)


def test_feature_correlations_match_brute_force(data):
    acts, x, counted, out = data
    keep = counted.reshape(-1).numpy()
    a = acts.reshape(-1, F).double().numpy()[keep]
    full = pearson(a, a)
    cand = candidates_for().numpy()
    k = SETTINGS.n_corr_features
    assert out["fcorr_ids"].shape == (F, k)
    assert (out["fcorr_ids"][0] == -1).all()
    for f in range(1, F):
        c = cand[f][cand[f] >= 0]
        vals = full[f, c]
        ok = ~np.isnan(vals)
        order = np.argsort(-vals[ok], kind="stable")[:k]
        want_ids, want_vals = c[ok][order], vals[ok][order]
        n = len(want_ids)
        np.testing.assert_array_equal(out["fcorr_ids"][f, :n], want_ids, err_msg=f"feature {f}")
        np.testing.assert_allclose(out["fcorr_val"][f, :n], want_vals, atol=2e-6)
        assert (out["fcorr_ids"][f, n:] == -1).all() and np.isnan(out["fcorr_val"][f, n:]).all()
    assert out["fcorr_ids"][1, 0] == 2 and out["fcorr_val"][1, 0] > 0.5  # the co-activating pair


@pytest.mark.parametrize("batch", [1, 7, N_SEQ])
def test_batching_does_not_change_correlations(data, batch):
    acts, x, counted, out = data
    other = run(acts, x, counted, batch=batch).finalize()
    for name in ("ncorr_source", "ncorr_dim", "fcorr_ids"):
        np.testing.assert_array_equal(other[name], out[name], err_msg=name)
    for name in ("ncorr_val", "fcorr_val"):
        np.testing.assert_allclose(other[name], out[name], atol=1e-6, err_msg=name)


def test_shards_with_different_shifts_merge_exactly(data, tmp_path):
    acts, x, counted, out = data
    x2 = x.clone()
    x2[8:] += 50.0 * torch.linspace(-1, 1, S * D).reshape(S, D).double()  # second shard: other means
    want = run(acts, x2, counted, batch=3).finalize()
    a = run(acts, x2, counted, batch=2, seq_range=(0, 8))
    b = run(acts, x2, counted, batch=5, seq_range=(8, N_SEQ))
    assert not torch.allclose(a.neurons.shift, b.neurons.shift)
    for merged in (merge(a, b).finalize(),
                   merge(run(acts, x2, counted, 5, (8, N_SEQ)), run(acts, x2, counted, 2, (0, 8))).finalize()):
        for name in ("ncorr_source", "ncorr_dim", "fcorr_ids", "top_seq", "iv_seq"):
            np.testing.assert_array_equal(merged[name], want[name], err_msg=name)
        for name in ("ncorr_val", "fcorr_val"):
            np.testing.assert_allclose(merged[name], want[name], atol=1e-5, err_msg=name)
    # resume: state_dict → torch.save → load → continue
    first = run(acts, x, counted, batch=3, seq_range=(0, 9))
    torch.save(first.state_dict(), tmp_path / "s.pt")
    resumed = FeatureSummaries(F, SETTINGS, 0, width=S * D, n_sources=S, candidates=candidates_for())
    resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    for start in range(9, N_SEQ, 3):
        resumed.update(acts[start:start + 3].clone(), counted[start:start + 3], start, x=x[start:start + 3].float())
    got = resumed.finalize()
    for name in out:
        np.testing.assert_allclose(got[name], out[name], atol=1e-6, err_msg=name)


def test_merge_into_empty_summary_adopts_shift(data):
    acts, x, counted, out = data
    empty = FeatureSummaries(F, SETTINGS, 0, width=S * D, n_sources=S, candidates=candidates_for())
    got = merge(empty, run(acts, x, counted, batch=3)).finalize()
    np.testing.assert_allclose(got["ncorr_val"], out["ncorr_val"], atol=1e-6)


def test_feature_correlation_shards_need_the_same_candidates():
    a = FeatureCorrelations(candidates_for(1))
    b = FeatureCorrelations(candidates_for(2))
    with pytest.raises(ValueError, match="candidate"):
        a.merge(b)


def test_correlations_are_optional(data):
    acts, x, counted, out = data
    plain = FeatureSummaries(F, dataclasses.replace(SETTINGS, n_corr_neurons=0), 0, width=S * D, n_sources=S)
    plain.update(acts[:4].clone(), counted[:4], 0)  # no x needed
    got = plain.finalize()
    assert "ncorr_val" not in got and "fcorr_ids" not in got
    needs_x = FeatureSummaries(F, SETTINGS, 0, width=S * D, n_sources=S)
    with pytest.raises(ValueError, match="activations x"):
        needs_x.update(acts[:4].clone(), counted[:4], 0)


def test_sparse_product_matches_dense():
    g = torch.Generator().manual_seed(3)
    A = torch.relu(torch.randn(13, 40, generator=g) - 1)
    rows, cols = A.nonzero(as_tuple=True)
    dense = torch.randn(40, 7, generator=g)
    got = sparse_t_matmul(rows, cols, A[rows, cols], 13, dense)
    torch.testing.assert_close(got, A @ dense, rtol=1e-5, atol=1e-5)
    assert sparse_t_matmul(rows[:0], cols[:0], A[rows, cols][:0], 13, dense).abs().sum() == 0


def test_neuron_correlation_numerics_with_large_offsets():
    """float32 accumulation over many batches with means 1e4 × the spread stays within 1e-5 of float64."""
    g = torch.Generator().manual_seed(4)
    n_f, d, batches, n = 5, 4, 60, 200
    nc = NeuronCorrelations(n_f, d)
    fs, xs = [], []
    for _ in range(batches):
        f = torch.relu(torch.randn(n, n_f, generator=g))
        x = 1e4 + torch.randn(n, d, generator=g).double() + 0.3 * f[:, :d].double()
        tok, feat = f.nonzero(as_tuple=True)
        nc.update(x.float(), torch.ones(n, dtype=torch.bool), tok, feat, f[tok, feat])
        fs.append(f.double().numpy())
        xs.append(x.float().double().numpy())
    want = pearson(np.concatenate(fs), np.concatenate(xs))
    got = nc.correlation(0, n_f).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_neuron_alignment_brute_force():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(7, 3, 4, generator=g)
    W[2] = 0
    out = neuron_alignment(W, k=5, block=20)  # several blocks
    flat = W.reshape(7, -1).numpy()
    for f in range(7):
        if f == 2:
            assert np.isnan(out["align_l1_frac"][f]).all()
            continue
        order = np.argsort(-np.abs(flat[f]), kind="stable")[:5]
        np.testing.assert_array_equal(out["align_source"][f] * 4 + out["align_dim"][f], order)
        np.testing.assert_allclose(out["align_val"][f], flat[f, order], rtol=1e-6)
        np.testing.assert_allclose(out["align_l1_frac"][f], np.abs(flat[f, order]) / np.abs(flat[f]).sum(),
                                   rtol=1e-5)
    wide = neuron_alignment(W[:, :1, :2], k=3)
    assert (wide["align_dim"][:, 2] == -1).all() and np.isnan(wide["align_val"][:, 2]).all()


def test_diff_classes():
    r = np.array([0.0, 0.29, 0.3, 0.5, 0.7, 0.71, 1.0, np.nan], np.float32)
    np.testing.assert_array_equal(diff_classes(r, 0.3, 0.7), [0, 0, 1, 1, 1, 2, 2, -1])
    assert diff_classes(r, 0.3, 0.7).dtype == np.int8


def test_next_token_effects_brute_force():
    g = torch.Generator().manual_seed(6)
    n_f, s, d, V, n, t = 5, 2, 4, 30, 6, 8
    W = torch.randn(n_f, s, d, generator=g)
    U = [torch.randn(d, V, generator=g) for _ in range(s)]
    tokens = torch.randint(0, V, (n, t), generator=g)
    seq = torch.randint(0, n, (n_f, 3), generator=g)
    pos = torch.randint(0, t, (n_f, 3), generator=g)
    seq[1, 2] = -1
    pos[1, 2] = -1
    pos[0, 0] = t - 1  # last token: no next token at the centre
    before, after = 2, 3
    acts = torch.rand(n_f, 3, before + 1 + after, generator=g).half().numpy()
    ids = next_token_ids(tokens, seq, pos, before, after)
    out = logit_effects(W, U, k=3, n_bins=4, max_elements=2 * V, windows={"hover": (seq.numpy(), pos.numpy(), acts)},
                        tokens=tokens.numpy(), window_before=before)
    assert out["hover"].shape == (n_f, 3, before + 1 + after, s) and out["hover"].dtype == np.float16
    for f in range(n_f):
        for j in range(3):
            for w in range(before + 1 + after):
                p = int(pos[f, j]) - before + w
                for src in range(s):
                    got = float(out["hover"][f, j, w, src])
                    if seq[f, j] < 0 or p < 0 or p + 1 >= t:
                        assert got == 0 and ids[f, j, w] == -1
                        continue
                    nxt = int(tokens[seq[f, j], p + 1])
                    assert ids[f, j, w] == nxt
                    want = float(acts[f, j, w]) * float(W[f, src] @ U[src][:, nxt])
                    assert got == pytest.approx(want, rel=2e-3, abs=1e-4)
    assert (out["hover"][0, 0, before] == 0).all()


def test_state_dict_describes_itself(data):
    acts, x, counted, out = data
    full = run(acts, x, counted, batch=3)
    bare = FeatureSummaries(F, SETTINGS, 0)  # built without width or candidates, as a merging tool might
    bare.load_state_dict(full.state_dict())
    got = bare.finalize()
    for name in ("ncorr_source", "ncorr_dim", "ncorr_val", "fcorr_ids", "fcorr_val"):
        np.testing.assert_array_equal(got[name], out[name], err_msg=name)
    with pytest.raises(ValueError, match="different statistics"):
        FeatureSummaries(F, SETTINGS, 0).merge(full)
