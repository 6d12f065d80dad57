"""atlas.stats fast paths give the same numbers as the plain ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atlas.stats.intervals import interval_keys
from atlas.stats.slots import BatchEntries, gather_windows


def test_sparse_and_dense_windows_agree():
    g = torch.Generator().manual_seed(0)
    B, T, F = 3, 11, 6
    acts = torch.relu(torch.randn(B, T, F, generator=g) - 0.7)
    acts[1, 4] = 0  # an uncounted token
    b, pos, f = acts.nonzero(as_tuple=True)
    batch = BatchEntries(acts, b, pos, f, acts[b, pos, f])
    qb = torch.randint(0, B, (200,), generator=g)
    qp = torch.randint(0, T, (200,), generator=g)
    qf = torch.randint(0, F, (200,), generator=g)
    qp[:3] = torch.tensor([0, T - 1, 5])
    for before, after in ((3, 2), (0, 0), (12, 12)):
        dense = batch.windows(qb, qp, qf, before, after, sparse=False)
        sparse = batch.windows(qb, qp, qf, before, after, sparse=True)
        assert torch.equal(dense, sparse)
        want = np.zeros((200, before + 1 + after), np.float32)
        for m in range(200):
            for j in range(before + 1 + after):
                t = int(qp[m]) - before + j
                if 0 <= t < T:
                    want[m, j] = acts[qb[m], t, qf[m]]
        np.testing.assert_array_equal(dense.float().numpy(), want.astype(np.float16).astype(np.float32))
    assert torch.equal(gather_windows(acts, qb, qp, qf, 3, 2), batch.windows(qb, qp, qf, 3, 2))


def test_interval_keys_from_tables_equal_direct_keys():
    """The update hashes each token and feature once and combines the tables per entry: the keys it
    makes that way are :func:`interval_keys` of the entries, half by half."""
    from atlas.stats.intervals import feature_hashes, key_half, token_hashes

    g = torch.Generator().manual_seed(0)
    first_token, n_tokens, offset = 7 * 128, 4 * 128, 1000
    tok = torch.randint(0, n_tokens, (5000,), generator=g)
    f = torch.randint(0, 64, (5000,), generator=g)
    t_hash = token_hashes(3, first_token + torch.arange(n_tokens))
    f_hash = feature_hashes(3, offset + torch.arange(64))
    keys = interval_keys(3, first_token + tok, offset + f)
    assert torch.equal(keys >> 31, key_half(t_hash[0][tok], f_hash[0][f], 0))
    assert torch.equal(keys & (2**31 - 1), key_half(t_hash[1][tok], f_hash[1][f], 1))
    assert int(keys.min()) >= 0 and int(keys.max()) < 2**62


def test_interval_rescaling_in_blocks_changes_nothing(monkeypatch):
    from atlas.cache import Settings
    from atlas.stats import FeatureSummaries
    from atlas.stats.intervals import IntervalSamples

    settings = Settings(top_k=2, n_intervals=2, interval_k=2, window_before=2, window_after=1)
    g = torch.Generator().manual_seed(1)
    acts = torch.relu(torch.randn(12, 9, 11, generator=g)) * torch.logspace(-2, 3, 12)[:, None, None]
    counted = torch.ones(12, 9, dtype=torch.bool)

    def run():
        s = FeatureSummaries(11, settings, 0)
        for lo in range(0, 12, 2):
            s.update(acts[lo:lo + 2].clone(), counted[lo:lo + 2], lo)
        return s.finalize()

    whole = run()
    monkeypatch.setattr(IntervalSamples, "HALVE_BLOCK", 2 * 4 * 2 * 4)  # 2 features per block
    blocked = run()
    for name in whole:
        np.testing.assert_array_equal(blocked[name], whole[name], err_msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_cols", [64, 63])
def test_positive_entries_equal_a_dense_scan(dtype, n_cols):
    """The word-wise scan finds exactly the entries above zero, in row-major order, whatever the dtype,
    with negative values, -0.0 and zeros beside active values inside one word (63 columns: the plain path)."""
    from atlas.stats.summaries import positive_entries

    g = torch.Generator().manual_seed(1)
    flat = torch.randn(50, n_cols, generator=g)
    flat[flat.abs() < 1.2] = 0.0
    flat[3, :8] = torch.tensor([0.0, 2.0, -0.0, -1.0, -0.0, 0.0, 0.5, -0.0])
    flat = flat.to(dtype)
    row, col, val = positive_entries(flat)
    want = (flat > 0).nonzero()
    assert torch.equal(row, want[:, 0]) and torch.equal(col, want[:, 1])
    assert val.dtype == torch.float32
    assert torch.equal(val, flat[want[:, 0], want[:, 1]].float())
    shifted = torch.cat([torch.zeros(1, dtype=dtype), flat.reshape(-1)])[1:].view(flat.shape)  # odd offset
    assert all(torch.equal(a, b) for a, b in zip(positive_entries(shifted), (row, col, val)))


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk", "batchtopk"])
@pytest.mark.parametrize("features", [(0, 40), (7, 29)])
def test_feature_encoder_equals_crosscoder_encode(activation, features):
    """The analysis's encode (one buffer, bias and activation in place; TopK encoded whole and sliced)
    gives exactly :meth:`Crosscoder.encode`'s activations of the analysed features, with input and
    activation scales, and TopK rows whose k largest include negative pre-activations."""
    from atlas.analyze import FeatureEncoder
    from atlas.crosscoder import Crosscoder, Source

    g = torch.Generator().manual_seed(3)
    S, d, F = 2, 8, 40
    b_enc = torch.randn(F, generator=g) - 9.0  # many rows have fewer than k positive pre-activations
    threshold = {"jumprelu": torch.rand(F, generator=g), "batchtopk": torch.tensor(0.3)}.get(activation)
    cc = Crosscoder(W_enc=torch.randn(S, d, F, generator=g), W_dec=torch.randn(F, S, d, generator=g),
                    b_enc=b_enc, b_dec=torch.zeros(S, d), sources=[Source("m", "blocks.0.hook_resid_post")] * S,
                    activation=activation, threshold=threshold, k=6 if activation == "topk" else None,
                    input_scale=torch.tensor([0.5, 2.0]), act_scale=torch.rand(F, generator=g) + 0.5)
    x = torch.randn(3, 5, S, d, generator=g)
    first, stop = features
    got = FeatureEncoder(cc, first, stop, "cpu", torch.float32)(x)
    want = cc.encode(x.reshape(15, S, d))[:, first:stop].reshape(3, 5, stop - first)
    assert torch.equal(got, want)
    if activation == "topk":
        full = cc.encode(x.reshape(15, S, d))
        assert ((full > 0).sum(1) <= 6).all() and ((full > 0).sum(1) < 6).any()
