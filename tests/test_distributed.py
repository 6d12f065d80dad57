"""``atlas analyze`` under torchrun (torch.distributed, gloo on the CPU) equals one process.

- the environment: detection of a torchrun launch, the device of each rank, clear errors;
- the collectives: three gloo processes reduce their summaries on rank 0 (a binary tree with a rank
  left over), bit for bit what merging them in one process gives;
- end to end: ``python -m torch.distributed.run --standalone --nproc_per_node 2 -m atlas.cli analyze``
  on the tiny two-model crosscoder writes the cache a single ``atlas analyze`` writes.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atlas import distributed
from atlas.cache import read_cache
from atlas.cli import main
from atlas.errors import AtlasError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_sigterm():
    """main() installs a SIGTERM handler; put pytest's back after each test."""
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


def _clear_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_a_plain_run_is_not_distributed(monkeypatch):
    _clear_env(monkeypatch)
    assert not distributed.launched()
    assert distributed.from_environment("cpu") == (None, "cpu")
    monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "1"), monkeypatch.setenv("LOCAL_RANK", "0")
    assert not distributed.launched()  # torchrun with one process: nothing to split
    assert distributed.from_environment(None)[0] is None


def test_rank_devices():
    gpu = torch.cuda.is_available()
    assert distributed.rank_device(None, 3) == ("cuda:3" if gpu else "cpu")
    assert distributed.rank_device("cuda", 2) == "cuda:2"
    assert distributed.rank_device("cpu", 2) == "cpu"
    assert distributed.rank_device("cuda:0", 2) == "cuda:0"  # an explicit index is kept


def test_broken_launch_environment_is_an_atlas_error(monkeypatch):
    _clear_env(monkeypatch)
    monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(AtlasError, match="MASTER_ADDR is not set.*torchrun"):
        distributed.from_environment("cpu")
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(AtlasError, match="RANK='two' is not a number"):
        distributed.from_environment("cpu")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1"), monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(AtlasError, match="outside 0..WORLD_SIZE-1"):
        distributed.from_environment("cpu")


# --------------------------------------------------------------------------- collectives


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _summaries(rank: int):
    from atlas.cache import Settings
    from atlas.stats import FeatureSummaries

    settings = Settings(top_k=3, n_intervals=2, interval_k=2, window_before=1, window_after=1, seq_len=8,
                        n_sequences=12, n_corr_neurons=0, n_corr_features=0)
    g = torch.Generator().manual_seed(rank)
    s = FeatureSummaries(5, settings, seed=7)
    acts = torch.relu(torch.randn(4, 8, 5, generator=g) - 0.5)
    s.update(acts, torch.ones(4, 8, dtype=torch.bool), seq_offset=4 * rank)
    return s, settings


def _reduce_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    comm, device = distributed.from_environment("cpu")
    try:
        mine, settings = _summaries(rank)
        comm.reduce_summaries(mine, lambda: __import__("atlas.stats", fromlist=["FeatureSummaries"])
                              .FeatureSummaries(5, settings, seed=7))
        got = comm.all_gather(rank * 10)
        assert got == [r * 10 for r in range(world)] and comm.broadcast("hello" if rank == 0 else None) == "hello"
        if rank == 0:
            torch.save(mine.state_dict(), out)
    finally:
        distributed.shutdown(comm)


@pytest.mark.slow
def test_three_gloo_ranks_reduce_to_what_one_process_merges(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "reduced.pt")
    mp.spawn(_reduce_worker, args=(3, _free_port(), out), nprocs=3, join=True)
    want, _ = _summaries(0)
    for r in (1, 2):
        want.merge(_summaries(r)[0])
    got = torch.load(out, weights_only=True)

    def same(a, b, path=""):
        if isinstance(a, dict):
            assert a.keys() == b.keys(), path
            for k in a:
                same(a[k], b[k], f"{path}.{k}")
        else:
            assert torch.equal(a, b), path

    same(got, want.state_dict())


# --------------------------------------------------------------------------- end to end


def _crosscode_batchtopk(w, folder: Path, k: int = 3) -> Path:
    """The tiny two-model crosscoder saved as crosscode saves a BatchTopK crosscoder: no inference
    threshold, no normalisation factors (``is_folded`` false), models and hook point in the run config."""
    import yaml

    sd = torch.load(w.crosscoder_ckpt, weights_only=True)
    W_enc, W_dec = sd["W_enc"].float(), sd["W_dec"].float()  # [S, d, F], [F, S, d]
    S, d, F = W_enc.shape
    ckpt = folder / "epoch_0_step_10"
    ckpt.mkdir(parents=True)
    torch.save({"_W_enc_XiDiL": W_enc.reshape(S, 1, d, F), "_W_dec_LXoDo": W_dec.reshape(F, S, 1, d),
                "b_enc_L": sd["b_enc"].float(), "_b_dec_XoDo": sd["b_dec"].float().reshape(S, 1, d),
                "is_folded": torch.tensor(False)}, ckpt / "model.pt")
    (ckpt / "model_cfg.yaml").write_text(yaml.dump({
        "n_models": S, "n_hookpoints": 1, "d_model": d, "n_latents": F,
        "activation_fn": {"classname": "BatchTopkActivation", "cfg": {"k_per_example": k}}}))
    (folder / "experiment_config.yaml").write_text(yaml.dump({
        "data": {"activations_harvester": {"llms": [{"name": str(w.llama_dir)}, {"name": str(w.llama_chat_dir)}]}},
        "hookpoints": [w.hook_point]}))
    return ckpt / "model.pt"


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", ["ckkissane", "crosscode-batchtopk"])
def test_torchrun_two_ranks_equal_one_process(tiny_world, tmp_path, checkpoint):
    """Also for a crosscode BatchTopK crosscoder, whose missing threshold the ranks estimate together."""
    from test_merge import assert_same_cache

    w = tiny_world
    if checkpoint == "ckkissane":
        source = [str(w.crosscoder_ckpt), "--model", str(w.llama_dir), "--model", str(w.llama_chat_dir)]
    else:
        source = [str(_crosscode_batchtopk(w, tmp_path / "run"))]
    # two named corpora: the per-corpus statistics are merged across ranks too
    common = [*source, "--dataset", f"web={w.corpus_jsonl}", "--dataset", f"notes={w.corpus_txt}", "-n", "0", "-s", "22", "--seq-len", "24", "--batch-size", "5",
              "--top-k", "5", "--seed", "3", "--device", "cpu"]
    assert main(["analyze", *common, "-o", str(tmp_path / "single")]) == 0

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "atlas.cli", "analyze", *common, "-o", str(tmp_path / "ranks")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("atlas: analysed 64 features") == 1  # rank 0 reports, once
    assert not (tmp_path / "ranks" / "state").exists()
    single = read_cache(tmp_path / "single")
    assert single.features.corpus_n_active.shape == (64, 2) and single.features.special_n_active is not None
    assert_same_cache(read_cache(tmp_path / "ranks"), single)
    if checkpoint != "ckkissane":
        assert single.manifest.checkpoint["batchtopk_threshold_estimated"] is True
        assert single.manifest.checkpoint["batchtopk_threshold"] > 0
        assert res.stdout.count("estimated") >= 2  # the scale and the threshold, reported once each


def _corpus_of(w, n_sequences: int, seq_len: int, folder: Path) -> Path:
    """A one-document ``.jsonl`` corpus that gives exactly ``n_sequences`` sequences of ``seq_len`` tokens
    (and part of one more, dropped): the tiny corpus's text cut at that many tokens."""
    import json

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(w.tokenizer_dir)
    ids = tok(w.corpus_txt.read_text(), add_special_tokens=False)["input_ids"]
    path = folder / "small-corpus.jsonl"
    text = tok.decode(ids[: n_sequences * (seq_len - 1) + seq_len // 3])  # BOS + seq_len - 1 tokens each
    path.write_text(json.dumps({"text": text}) + "\n")
    return path


def _torchrun_analyze(nproc: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "atlas.cli", "analyze", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint,nproc", [("ckkissane", 2), ("ckkissane", 3), ("crosscode-batchtopk", 3)])
def test_torchrun_on_a_corpus_of_two_default_batches(tiny_world, tmp_path, checkpoint, nproc):
    """A corpus that gives only 25 sequences of 128 tokens (``--n-samples`` left at 100), analysed with the
    default batch size (16 sequences on a CPU: two batches, the second of 9): two ranks take one batch
    each, three ranks leave rank 0 without any batch (it still merges and writes). Every arrangement
    writes the cache one process writes; the input scale (and a crosscode BatchTopK crosscoder's
    threshold) estimated from batches that other ranks analysed."""
    from test_merge import assert_same_cache

    w = tiny_world
    if checkpoint == "ckkissane":
        source = [str(w.crosscoder_ckpt), "--model", str(w.llama_dir), "--model", str(w.llama_chat_dir)]
    else:
        source = [str(_crosscode_batchtopk(w, tmp_path / "run"))]
    corpus = _corpus_of(w, 25, 128, tmp_path)
    common = [*source, "--dataset", str(corpus), "-n", "16", "--top-k", "5", "--device", "cpu"]
    assert main(["analyze", *common, "-o", str(tmp_path / "single")]) == 0
    single = read_cache(tmp_path / "single")
    assert single.manifest.n_sequences == 25 and single.tokens.shape == (25, 128)

    res = _torchrun_analyze(nproc, [*common, "-o", str(tmp_path / "ranks")], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("atlas: analysed 16 features") == 1
    assert not (tmp_path / "ranks" / "state").exists()
    assert_same_cache(read_cache(tmp_path / "ranks"), single)


# --------------------------------------------------------------------------- remote execution (NDIF)


def test_remote_without_an_api_key_is_an_atlas_error(tiny_world, tmp_path):
    """``atlas analyze --remote`` with no NDIF key configured: one line naming the fix, exit status 2."""
    w = tiny_world
    env = {k: v for k, v in os.environ.items() if k != "NDIF_API_KEY"}
    env.update(NNSIGHT_CONFIG=str(tmp_path / "no-config.yaml"), HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-m", "atlas.cli", "analyze", str(w.crosscoder_ckpt), "--model",
                          str(w.llama_dir), "--model", str(w.llama_chat_dir), "--remote", "-o", str(tmp_path / "c")],
                         capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("atlas: error:")]
    assert len(lines) == 1 and "needs an NDIF API key" in lines[0] and "NDIF_API_KEY" in lines[0]
    assert "Traceback" not in res.stderr and not (tmp_path / "c").exists()


def test_remote_checks_name_the_fix(monkeypatch):
    from nnsight import CONFIG

    from atlas.crosscoder import Source
    from atlas.models import check_remote

    hub = [Source("openai-community/gpt2", "blocks.6.hook_resid_post")]
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    with pytest.raises(AtlasError, match="needs an NDIF API key.*NDIF_API_KEY"):
        check_remote(hub)
    monkeypatch.setattr(CONFIG.API, "APIKEY", "test-key")
    with pytest.raises(AtlasError, match="local model: pass --model with a hub id"):
        check_remote([Source(str(REPO), "blocks.0.hook_resid_post")])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AtlasError, match="unset HF_HUB_OFFLINE"):
        check_remote(hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(CONFIG.API, "HOST", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    with pytest.raises(AtlasError, match="cannot reach NDIF"):
        check_remote(hub)


def test_remote_path_gives_the_local_analysis(tiny_world, tmp_path):
    """The remote path (meta weights here, sites probed and lm_head fetched by traces, every trace serialised
    as for NDIF) run through NNsight's local simulation (``remote="local"``) writes the local cache."""
    from factory import crosscoder_from_ckkissane
    from test_merge import OPTIONS, assert_same_cache

    from atlas.analyze import run_analysis
    from atlas.corpus import load_corpus
    from atlas.models import load_models

    cpu = torch.device("cpu")
    cc = crosscoder_from_ckkissane(tiny_world.crosscoder_ckpt, [tiny_world.llama_dir, tiny_world.llama_chat_dir])
    local = load_models(cc.sources, cpu, torch.float32)
    remote = load_models(cc.sources, cpu, torch.float32, remote="local")
    assert next(remote.hf_models[cc.sources[0].model].parameters()).device.type == "meta"
    assert remote.widths == local.widths and remote._order == local._order
    tokens = load_corpus(str(tiny_world.corpus_jsonl), local.tokenizer, n_sequences=10, seq_len=16, seed=2)
    options = dataclasses.replace(OPTIONS, n_features=16)
    run_analysis(cc, local, tokens, options, tmp_path / "local", cpu, torch.float32)
    run_analysis(cc, remote, tokens, options, tmp_path / "remote", cpu, torch.float32)
    assert_same_cache(read_cache(tmp_path / "remote"), read_cache(tmp_path / "local"))


class _OneRank(distributed.Comm):
    """A world of one rank without a process group: the collectives return this rank's values."""

    def all_gather(self, obj) -> list:
        return [obj]

    def broadcast(self, obj, src: int = 0):
        return obj

    def barrier(self) -> None:
        pass


def test_rank_resume_files(tiny_world, tmp_path, monkeypatch):
    """Under torchrun each rank keeps its own resume file; an interrupted rank resumes after its last batch."""
    from factory import crosscoder_from_ckkissane, interrupted_at_update
    from test_merge import OPTIONS, assert_same_cache

    from atlas.analyze import run_analysis
    from atlas.corpus import load_corpus
    from atlas.models import load_models

    cpu = torch.device("cpu")
    cc = crosscoder_from_ckkissane(tiny_world.crosscoder_ckpt, [tiny_world.llama_dir, tiny_world.llama_chat_dir])
    models = load_models(cc.sources, cpu, torch.float32)
    tokens = load_corpus(str(tiny_world.corpus_jsonl), models.tokenizer, n_sequences=22, seq_len=24, seed=1)
    options = dataclasses.replace(OPTIONS, save_every=1)
    comm = _OneRank(rank=0, world=1, local_rank=0, backend="gloo", device=cpu)
    with interrupted_at_update(monkeypatch, 3), pytest.raises(KeyboardInterrupt):
        run_analysis(cc, models, tokens, options, tmp_path / "ranked", cpu, torch.float32, comm=comm)
    state = torch.load(tmp_path / "ranked" / "state" / "summaries.rank0-of-1.pt", weights_only=True)
    assert state["batches_done"] == 2 and state["batches"] == [0, 5]
    run_analysis(cc, models, tokens, options, tmp_path / "ranked", cpu, torch.float32, comm=comm)
    assert not (tmp_path / "ranked" / "state").exists()
    run_analysis(cc, models, tokens, options, tmp_path / "plain", cpu, torch.float32)
    assert_same_cache(read_cache(tmp_path / "ranked"), read_cache(tmp_path / "plain"))


def test_remote_site_before_a_projection_fails_before_any_analysis(tiny_world):
    """hook_z / mlp.hook_post need the output projection's weights for their logit effects; with --remote
    they stay on NDIF, so loading says so at once."""
    from atlas.crosscoder import Source
    from atlas.errors import AtlasError
    from atlas.models import load_models

    with pytest.raises(AtlasError, match="without --remote"):
        load_models([Source(str(tiny_world.llama_dir), "blocks.1.attn.hook_z")], torch.device("cpu"), torch.float32,
                    remote="local")
