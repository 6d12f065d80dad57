"""Named corpora (``--dataset NAME=PATH``): parsing, sharing the sequences, and the per-corpus and
special-token statistics checked against brute force on the tiny two-model crosscoder."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from factory import interrupted_at_update, resid_post, small_analysis_options
from transformers import AutoModelForCausalLM

from atlas.analyze import run_analysis
from atlas.cache import read_cache, special_share
from atlas.corpus import load_corpora, load_corpus, parse_datasets, share_sequences
from atlas.errors import AtlasError

CPU = torch.device("cpu")
# 22 sequences: 10 from corpus "a", 12 from corpus "b"
CORPORA = ({"name": "a", "path": "a.jsonl", "n_sequences": 10}, {"name": "b", "path": "b.txt", "n_sequences": 12})
OPTIONS = dataclasses.replace(small_analysis_options(), corpora=CORPORA, exclude_special=True)


# --- parsing and loading ---------------------------------------------------------------------------


def test_parse_datasets_named_plain_and_default():
    assert parse_datasets(["web=a.jsonl", "chat=dir/b.jsonl"]) == [("web", "a.jsonl"), ("chat", "dir/b.jsonl")]
    assert parse_datasets(["corpus.jsonl"]) == [("", "corpus.jsonl")]
    assert parse_datasets(["data/x=y.jsonl"]) == [("", "data/x=y.jsonl")]  # "=" after a separator: a path
    from atlas.demo import DEMO_CORPORA

    assert parse_datasets(None) == [(n, str(p)) for n, p in DEMO_CORPORA.items()]
    assert [n for n, _ in parse_datasets(None)] == ["english", "python"]
    assert all(p.is_file() for p in DEMO_CORPORA.values())


@pytest.mark.parametrize("values, message", [
    (["web=a.jsonl", "b.jsonl"], "mixes named"),
    (["a.jsonl", "b.jsonl"], "without names"),
    (["web=a.jsonl", "web=b.jsonl"], "twice"),
    (["we b=a.jsonl"], "letters, digits"),
    (["=a.jsonl"], "letters, digits"),
    (["web="], "names no corpus file"),
])
def test_bad_dataset_values_name_the_fix(values, message):
    with pytest.raises(AtlasError, match=message) as err:
        parse_datasets(values)
    assert "--dataset" in str(err.value)


def test_demo_defaults_to_800_sequences_of_both_corpora():
    from atlas.build import dataset_label, n_samples_of
    from atlas.cli import build_parser

    parse = build_parser().parse_args
    assert n_samples_of(parse(["build"])) == 800  # the demo: >= 100k tokens of 128-token sequences
    assert n_samples_of(parse(["build", "ckpt.pt"])) == 100
    assert n_samples_of(parse(["analyze", "-s", "7"])) == 7
    args = parse(["build", "--dataset", "web=a.jsonl", "--dataset", "chat=b.jsonl"])
    assert args.dataset == ["web=a.jsonl", "chat=b.jsonl"]
    assert dataset_label(args.dataset) == "web=a.jsonl, chat=b.jsonl"
    assert dataset_label(None) == "demo corpora (english, python)"


def test_bad_dataset_fails_before_any_model_loads(capsys):
    from atlas.cli import main

    assert main(["analyze", "ckpt-that-does-not-exist.pt", "--dataset", "a=x.jsonl", "--dataset", "y.jsonl"]) != 0
    assert "mixes named" in capsys.readouterr().err


def test_sequences_are_shared_equally():
    assert share_sequences(800, 2) == [400, 400]
    assert share_sequences(7, 3) == [3, 2, 2]
    assert sum(share_sequences(101, 4)) == 101


def test_load_corpora_concatenates_each_corpus_in_order(tiny_tokenizer_dir, tiny_corpus_jsonl, tiny_corpus_txt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    split = load_corpora([f"a={tiny_corpus_jsonl}", f"b={tiny_corpus_txt}"], tok, 7, 16, seed=2)
    assert [c["name"] for c in split.corpora] == ["a", "b"]
    assert [c["n_sequences"] for c in split.corpora] == [4, 3]
    want = torch.cat([load_corpus(str(tiny_corpus_jsonl), tok, 4, 16, seed=2),
                      load_corpus(str(tiny_corpus_txt), tok, 3, 16, seed=2)])
    assert torch.equal(split.tokens, want)
    assert split.corpus_ids().tolist() == [0, 0, 0, 0, 1, 1, 1]
    plain = load_corpora([str(tiny_corpus_jsonl)], tok, 5, 16, seed=2)
    assert plain.corpora == [] and torch.equal(plain.tokens, load_corpus(str(tiny_corpus_jsonl), tok, 5, 16, seed=2))
    with pytest.raises(AtlasError, match="--n-samples 2 or more"):
        load_corpora([f"a={tiny_corpus_jsonl}", f"b={tiny_corpus_txt}"], tok, 1, 16)


# --- statistics against brute force ----------------------------------------------------------------


@pytest.fixture(scope="module")
def special_tokens(diff_setup):
    """The tiny setup's tokens with EOS at every ninth position (documents joined with EOS)."""
    cc, models, tokens = diff_setup
    tokens = tokens.clone()
    tokens[:, 7::9] = models.tokenizer.eos_token_id
    return tokens


@pytest.fixture(scope="module")
def named_cache(diff_setup, special_tokens, tmp_path_factory):
    cc, models, _ = diff_setup
    folder = tmp_path_factory.mktemp("named")
    run_analysis(cc, models, special_tokens, OPTIONS, folder, CPU, torch.float32)
    return read_cache(folder), folder


@pytest.fixture(scope="module")
def brute_acts(diff_setup, special_tokens, named_cache):
    """Every token's feature activations by plain forward hooks and a direct encode (no token left out)."""
    cc, _, _ = diff_setup
    cache, _ = named_cache
    hf = [AutoModelForCausalLM.from_pretrained(s.model).eval() for s in cc.sources]
    with torch.no_grad():
        x = torch.stack([resid_post(m, special_tokens, 1) for m in hf], dim=2)  # [N, T, S, d]
    scale = torch.tensor(cache.manifest.checkpoint["input_scale"])
    N, T, S, d = x.shape
    acts = dataclasses.replace(cc, input_scale=scale).encode(x.reshape(-1, S, d)).reshape(N, T, -1)
    return acts.numpy()


def test_per_corpus_counts_and_maxima_match_brute_force(diff_setup, special_tokens, named_cache, brute_acts):
    _, models, _ = diff_setup
    cache, folder = named_cache
    fs, m = cache.features, cache.manifest
    tokens = special_tokens.numpy()
    special = np.isin(tokens, sorted(models.special_ids))
    counted = ~special  # --exclude-special: BOS and EOS are left out
    ids = np.repeat([0, 1], [10, 12])
    np.testing.assert_array_equal(cache.corpus_ids, ids)
    assert np.load(folder / "corpus_ids.npy").dtype == np.int16
    assert [c["name"] for c in m.corpora] == ["a", "b"] and [c["n_sequences"] for c in m.corpora] == [10, 12]
    assert [c["path"] for c in m.corpora] == ["a.jsonl", "b.txt"]
    F = fs.n_active.shape[0]
    assert fs.corpus_n_active.shape == (F, 2) and fs.corpus_n_active.dtype == np.int64
    assert fs.corpus_max_act.shape == (F, 2) and fs.corpus_max_act.dtype == np.float32
    for c in range(2):
        rows = ids == c
        assert m.corpora[c]["n_tokens"] == int(counted[rows].sum())
        act = brute_acts[rows] * counted[rows][:, :, None]
        np.testing.assert_array_equal(fs.corpus_n_active[:, c], (act > 0).sum((0, 1)))
        np.testing.assert_allclose(fs.corpus_max_act[:, c], act.max((0, 1)), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(fs.corpus_n_active.sum(1), fs.n_active)
    np.testing.assert_array_equal(fs.corpus_max_act.max(1), fs.max_act)
    assert sum(c["n_tokens"] for c in m.corpora) == m.n_tokens


def test_special_token_activations_match_brute_force(diff_setup, special_tokens, named_cache, brute_acts):
    _, models, _ = diff_setup
    cache, _ = named_cache
    fs = cache.features
    tokens = special_tokens.numpy()
    # EOS counts; the BOS at position 0 is left out as from every statistic
    eos = tokens == models.tokenizer.eos_token_id
    assert eos.any() and not (eos & (tokens == models.bos_token_id)).any()
    want = (brute_acts[eos] > 0).sum(0)
    np.testing.assert_array_equal(fs.special_n_active, want)
    assert want.sum() > 0  # the check can fail: some features fire on EOS
    total = (brute_acts[tokens != models.bos_token_id] > 0).sum(0)
    share = special_share(fs.n_active, fs.special_n_active, exclude_special=True)
    alive = total > 0
    np.testing.assert_allclose(share[alive], want[alive] / total[alive], rtol=1e-12)
    assert np.isnan(share[~alive]).all()


def test_special_tokens_counted_in_the_statistics(diff_setup, special_tokens, tmp_path, brute_acts):
    """Without --exclude-special the share is special_n_active / n_active, and one unnamed corpus has no
    per-corpus fields nor corpus_ids.npy."""
    cc, models, _ = diff_setup
    options = dataclasses.replace(small_analysis_options(), corpora=())
    run_analysis(cc, models, special_tokens, options, tmp_path, CPU, torch.float32)
    cache = read_cache(tmp_path)
    fs = cache.features
    assert fs.corpus_n_active is None and fs.corpus_max_act is None and cache.corpus_ids is None
    assert cache.manifest.corpora == [] and not (tmp_path / "corpus_ids.npy").exists()
    eos = special_tokens.numpy() == models.tokenizer.eos_token_id
    np.testing.assert_array_equal(fs.special_n_active, (brute_acts[eos] > 0).sum(0))
    share = special_share(fs.n_active, fs.special_n_active, exclude_special=False)
    alive = fs.n_active > 0
    np.testing.assert_allclose(share[alive], fs.special_n_active[alive] / fs.n_active[alive])


# --- every way of splitting the work gives the same numbers ----------------------------------------


def test_shards_and_resume_give_the_same_corpus_statistics(diff_setup, special_tokens, named_cache, tmp_path,
                                                           monkeypatch, capsys):
    from test_merge import assert_same_cache

    from atlas.merge import merge_folders

    cc, models, _ = diff_setup
    whole, _ = named_cache
    for k in range(2):
        run_analysis(cc, models, special_tokens, OPTIONS, tmp_path / f"shard-{k}", CPU, torch.float32, shard=(k, 2))
    merge_folders([tmp_path / "shard-1", tmp_path / "shard-0"], tmp_path / "merged", device="cpu")
    merged = read_cache(tmp_path / "merged")
    assert_same_cache(merged, whole)
    np.testing.assert_array_equal(merged.corpus_ids, whole.corpus_ids)

    options = dataclasses.replace(OPTIONS, save_every=1)
    with interrupted_at_update(monkeypatch, 3), pytest.raises(KeyboardInterrupt):
        run_analysis(cc, models, special_tokens, options, tmp_path / "resumed", CPU, torch.float32)
    run_analysis(cc, models, special_tokens, options, tmp_path / "resumed", CPU, torch.float32)
    capsys.readouterr()
    resumed = read_cache(tmp_path / "resumed")
    assert_same_cache(resumed, whole)
    np.testing.assert_array_equal(resumed.corpus_ids, whole.corpus_ids)


def test_corpora_that_do_not_cover_the_sequences_are_refused(diff_setup, tmp_path):
    cc, models, tokens = diff_setup
    options = dataclasses.replace(OPTIONS, corpora=(CORPORA[0],))
    with pytest.raises(AtlasError, match="hold 10 sequences but 22"):
        run_analysis(cc, models, tokens, options, tmp_path, CPU, torch.float32)


def test_corpus_names_and_sizes_are_part_of_the_fingerprint(diff_setup):
    from atlas.analyze import inputs_fingerprint
    from atlas.cache import Settings

    cc, models, tokens = diff_setup
    fp = [inputs_fingerprint(cc, models.sources, tokens, opt, Settings(), torch.float32) for opt in (
        OPTIONS, dataclasses.replace(OPTIONS, corpora=({**CORPORA[0], "n_sequences": 11},
                                                       {**CORPORA[1], "n_sequences": 11})),
        dataclasses.replace(OPTIONS, corpora=({**CORPORA[0], "name": "c"}, CORPORA[1])),
        dataclasses.replace(OPTIONS, corpora=({**CORPORA[0], "path": "elsewhere/a.jsonl"}, CORPORA[1])))]
    assert len(set(fp[:3])) == 3 and fp[3] == fp[0]  # where the files lie does not matter


def test_demo_corpora_keep_the_documents_of_the_two_sources():
    from atlas.demo import DEMO_CORPORA

    for name, source in (("english", "brown"), ("python", "pydoc")):
        with open(DEMO_CORPORA[name], encoding="utf-8") as f:
            docs = [json.loads(line) for line in f]
        assert docs and {d["source"] for d in docs} == {source}


def test_a_shard_without_corpus_summaries_is_refused_by_name(diff_setup, special_tokens, tmp_path, capsys):
    """A shard written before the per-corpus statistics existed: merging names the shard and the fix."""
    from atlas.merge import SUMMARIES_FILE, merge_folders

    cc, models, _ = diff_setup
    for k in range(2):
        run_analysis(cc, models, special_tokens, OPTIONS, tmp_path / f"shard-{k}", CPU, torch.float32, shard=(k, 2))
    path = tmp_path / "shard-1" / SUMMARIES_FILE
    state = torch.load(path, weights_only=True)
    del state["summaries"]["corpora"]
    torch.save(state, path)
    with pytest.raises(AtlasError, match=r"shard-1 lacks the summary 'corpora'.*--shard 1/2"):
        merge_folders([tmp_path / "shard-0", tmp_path / "shard-1"], tmp_path / "merged", device="cpu")
    capsys.readouterr()
