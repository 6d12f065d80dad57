"""Shards (``--shard K/N``) and feature slices (``--features A:B``) merged by ``atlas merge`` equal one run.

Everything runs in this process through :func:`atlas.analyze.run_analysis` and
:func:`atlas.merge.merge_folders` on the tiny two-model crosscoder: 22 sequences of 24 tokens in batches
of 5 (5 batches, the last one short), no stored input scale (so every shard must arrive at the scale a
single run estimates from the first two batches).
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from factory import interrupted_at_update, small_analysis_options

from atlas.analyze import parse_feature_range, parse_shard, run_analysis
from atlas.cache import read_cache
from atlas.cli import main
from atlas.errors import AtlasError
from atlas.merge import SHARD_FILE, merge_folders

CPU = torch.device("cpu")
OPTIONS = small_analysis_options()


@pytest.fixture(scope="module")
def setup(diff_setup):
    return diff_setup


@pytest.fixture(scope="module")
def whole(setup, tmp_path_factory):
    cc, models, tokens = setup
    folder = tmp_path_factory.mktemp("whole")
    run_analysis(cc, models, tokens, OPTIONS, folder, CPU, torch.float32)
    return read_cache(folder)


def analyse(setup, folder, options=OPTIONS, **kwargs):
    cc, models, tokens = setup
    return run_analysis(cc, models, tokens, options, folder, CPU, torch.float32, **kwargs)


# Arrays that equal a single run's bit for bit however the batches are split: counts, maxima, float64 sums of
# float32 batch sums, examples chosen by value and key, weight statistics. Other float arrays (correlations
# from float32 accumulators with per-shard shifts) are equal up to rounding, compared with a tolerance.
EXACT = {
    "features": {"density", "max_act", "mean_act", "n_active", "hist_counts", "dec_norm", "rel_norm", "dec_cos",
                 "neighbours", "neighbour_cos", "diff_class", "align_source", "align_dim", "align_val",
                 "align_l1_frac"},
    "examples": {"top_seq", "top_pos", "top_act", "top_window", "iv_seq", "iv_pos", "iv_act", "iv_window",
                 "iv_width"},
}


# Correlation rankings: two candidates whose correlations tie (up to rounding) may come in either order, as the
# float sums behind them are added in another order when the batches are split.
RANKED_BY = {"fcorr_ids": "fcorr_val", "ncorr_source": "ncorr_val", "ncorr_dim": "ncorr_val"}


def _assert_same_ranking(ids_a, ids_b, vals_a, vals_b, name: str) -> None:
    """Equal ids, except where two candidates tie: there the values still agree."""
    np.testing.assert_allclose(vals_a, vals_b, rtol=1e-5, atol=1e-7, err_msg=name)
    differ = ids_a != ids_b
    assert differ.mean() < 0.02, f"{name}: {differ.sum()} ids differ"


def assert_same_cache(a, b, exact: bool = True, skip: tuple = (), bitwise: bool = False):
    """Every array equal (bit for bit where ``exact`` and listed in EXACT, or an integer array; else up to
    float rounding), and the manifests equal but for the creation time. ``skip``: fields not compared.
    ``bitwise``: every array bit for bit, rankings included (the same batches folded the same way)."""
    ma, mb = dataclasses.asdict(a.manifest), dataclasses.asdict(b.manifest)
    ma.pop("created"), mb.pop("created")
    assert ma == mb
    assert a.vocab == b.vocab
    np.testing.assert_array_equal(a.tokens, b.tokens)
    for part in ("features", "examples", "logits"):
        pa, pb = getattr(a, part), getattr(b, part)
        for field in dataclasses.fields(pa):
            if field.name in skip:
                continue
            x, y = getattr(pa, field.name), getattr(pb, field.name)
            if x is None or y is None:
                assert x is None and y is None, field.name
                continue
            assert x.shape == y.shape and x.dtype == y.dtype, field.name
            if bitwise:
                np.testing.assert_array_equal(x, y, err_msg=f"{part}.{field.name}")
                continue
            if field.name in RANKED_BY:
                _assert_same_ranking(x, y, getattr(pa, RANKED_BY[field.name]), getattr(pb, RANKED_BY[field.name]),
                                     f"{part}.{field.name}")
                continue
            always = part == "logits" or field.name in EXACT.get(part, ())
            if (exact and always) or not np.issubdtype(x.dtype, np.floating):
                np.testing.assert_array_equal(x, y, err_msg=f"{part}.{field.name}")
            else:
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=f"{part}.{field.name}")


def test_parse_shard_and_feature_range():
    assert parse_shard("3/8") == (3, 8) and parse_shard(" 0 / 1 ") == (0, 1)
    assert parse_feature_range("100:200") == (100, 200)
    for bad in ("8/8", "1-8", "x/2", "2/0"):
        with pytest.raises(AtlasError, match="--shard"):
            parse_shard(bad)
    for bad in ("5:5", "9:3", "a:b", "100"):
        with pytest.raises(AtlasError, match="--features"):
            parse_feature_range(bad)


@pytest.mark.parametrize("n, orders", [(2, [(1, 0)]), (3, [(0, 1, 2), (2, 0, 1)])])
def test_shards_merged_in_any_order_equal_one_run(setup, whole, tmp_path, n, orders, capsys):
    folders = []
    for k in range(n):
        folder = tmp_path / f"shard-{k}"
        manifest = analyse(setup, folder, shard=(k, n))
        assert not manifest.complete and (folder / SHARD_FILE).is_file() and not (folder / "state").exists()
        assert not (folder / "features.npz").exists()  # a shard is not a cache
        folders.append(folder)
    out = capsys.readouterr().out
    assert f"wrote shard {n - 1}/{n}" in out and "atlas merge" in out
    assert out.count("estimated sqrt(d)/mean") == n  # each shard estimates the same scale itself
    for order in orders:
        target = tmp_path / ("merged-" + "".join(map(str, order)))
        manifest = merge_folders([folders[k] for k in order], target, device="cpu")
        assert manifest.complete
        assert_same_cache(read_cache(target), whole)


def test_a_finished_shard_is_reused_and_an_interrupted_one_resumes(setup, whole, tmp_path, monkeypatch):
    options = dataclasses.replace(OPTIONS, save_every=1)
    # shard 1/2 holds batches 2, 3 and 4: stopped in batch 3
    with interrupted_at_update(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        analyse(setup, tmp_path / "s1", options, shard=(1, 2))
    state = torch.load(tmp_path / "s1" / "state" / "summaries.pt", weights_only=True)
    assert state["batches_done"] == 3 and state["batches"] == [2, 5]
    analyse(setup, tmp_path / "s1", options, shard=(1, 2))
    analyse(setup, tmp_path / "s0", options, shard=(0, 2))
    stamp = (tmp_path / "s0" / SHARD_FILE).stat().st_mtime_ns
    analyse(setup, tmp_path / "s0", options, shard=(0, 2))  # same inputs: reused, not rewritten
    assert (tmp_path / "s0" / SHARD_FILE).stat().st_mtime_ns == stamp
    merge_folders([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged", device="cpu")
    assert_same_cache(read_cache(tmp_path / "merged"), whole)


def test_merge_refuses_missing_duplicate_and_foreign_shards(setup, tmp_path):
    for k in range(3):
        analyse(setup, tmp_path / f"s{k}", shard=(k, 3))
    with pytest.raises(AtlasError, match=r"shard 1/3 of features 0\.\.63 is missing"):
        merge_folders([tmp_path / "s0", tmp_path / "s2"], tmp_path / "out")
    shutil.copytree(tmp_path / "s2", tmp_path / "s2-copy")
    with pytest.raises(AtlasError, match="shard 2/3 is given twice"):
        merge_folders([tmp_path / f"s{k}" for k in range(3)] + [tmp_path / "s2-copy"], tmp_path / "out")
    analyse(setup, tmp_path / "other-n", shard=(1, 2))
    with pytest.raises(AtlasError, match="one N"):
        merge_folders([tmp_path / "s0", tmp_path / "other-n"], tmp_path / "out")
    analyse(setup, tmp_path / "other-seed", dataclasses.replace(OPTIONS, seed=4), shard=(1, 3))
    with pytest.raises(AtlasError, match="different inputs"):
        merge_folders([tmp_path / "s0", tmp_path / "other-seed", tmp_path / "s2"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AtlasError, match="neither a finished shard"):
        merge_folders([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(AtlasError, match="is one of the inputs"):
        merge_folders([tmp_path / "s0", tmp_path / "s1", tmp_path / "s2"], tmp_path / "s1")
    assert not (tmp_path / "out").exists()
    # the command line: one line naming the problem and the fix, exit status 2
    assert main(["merge", str(tmp_path / "s0"), str(tmp_path / "s2"), "-o", str(tmp_path / "out")]) == 2


def test_feature_slices_merged_equal_the_whole(setup, whole, tmp_path):
    # latent scaling needs the whole dictionary's reconstruction: slices compute it when asked (on)
    first = analyse(setup, tmp_path / "f0", dataclasses.replace(OPTIONS, features=(0, 24), latent_scaling="on"))
    assert first.feature_offset == 0 and first.n_features == 24 and first.complete
    for k in range(2):  # the second slice as two shards
        analyse(setup, tmp_path / f"f1-{k}", dataclasses.replace(OPTIONS, features=(24, 64), latent_scaling="on"),
                shard=(k, 2))
    sliced = read_cache(tmp_path / "f0")
    # a slice alone: its neighbours are ids in the whole dictionary, as in the whole run
    np.testing.assert_array_equal(sliced.features.neighbours, whole.features.neighbours[:24])
    np.testing.assert_array_equal(sliced.examples.iv_seq, whole.examples.iv_seq[:24])

    merge_folders([tmp_path / "f1-1", tmp_path / "f0", tmp_path / "f1-0"], tmp_path / "merged", device="cpu")
    merged = read_cache(tmp_path / "merged")
    assert merged.manifest.feature_offset == 0 and merged.manifest.n_features == 64
    # float results may differ in the last bit where a matrix product runs on a different number of features;
    # correlated features are searched among the slice's own features (the only activations it computes)
    assert_same_cache(merged, whole, exact=False, skip=("fcorr_ids", "fcorr_val"))
    ids = merged.features.fcorr_ids
    assert ((ids[:24] == -1) | (ids[:24] < 24)).all() and ((ids[24:] == -1) | (ids[24:] >= 24)).all()
    assert (ids[24:] >= 24).any()
    for name in ("n_active", "hist_counts", "neighbours"):
        np.testing.assert_array_equal(getattr(merged.features, name), getattr(whole.features, name))
    for name in ("top_seq", "top_pos", "iv_seq", "iv_pos"):
        np.testing.assert_array_equal(getattr(merged.examples, name), getattr(whole.examples, name))

    # a slice that does not start at 0 keeps its offset, and merging leaves no gap and no overlap
    analyse(setup, tmp_path / "f2", dataclasses.replace(OPTIONS, features=(30, 64), latent_scaling="on"))
    assert read_cache(tmp_path / "f2").manifest.feature_offset == 30
    with pytest.raises(AtlasError, match=r"features 24\.\.29 are missing"):
        merge_folders([tmp_path / "f0", tmp_path / "f2"], tmp_path / "gap")
    with pytest.raises(AtlasError, match="overlap"):
        merge_folders([tmp_path / "merged", tmp_path / "f2"], tmp_path / "overlap")
    # --n-features searches neighbours among its own features only: such a cache is not a slice
    analyse(setup, tmp_path / "first24", dataclasses.replace(OPTIONS, n_features=24, latent_scaling="on"))
    with pytest.raises(AtlasError, match="--features 0:24"):
        merge_folders([tmp_path / "first24", tmp_path / "f1-0", tmp_path / "f1-1"], tmp_path / "mixed")


def test_feature_range_is_checked_against_the_dictionary(setup, tmp_path):
    with pytest.raises(AtlasError, match="past the dictionary's 64 features"):
        analyse(setup, tmp_path, dataclasses.replace(OPTIONS, features=(10, 65)))


def test_merge_command_refuses_a_foreign_output_folder(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    (tmp_path / "shard").mkdir()
    assert main(["merge", str(tmp_path / "shard"), "-o", str(tmp_path / "notes")]) == 2
    err = capsys.readouterr().err
    assert "is not empty and holds no analysis cache" in err and (tmp_path / "notes" / "todo.txt").exists()
