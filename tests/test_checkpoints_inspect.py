"""``atlas inspect``: what it prints for each format, with and without the options a build needs."""

from __future__ import annotations

import torch
from test_checkpoints_formats import write_ckkissane, write_crosscode, write_dl_crosscoder, write_dl_sae, write_saelens

from atlas.cli import main

torch.set_num_threads(1)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def inspect(capsys, *argv) -> str:
    assert main(["inspect", *map(str, argv)]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    return out.out


def test_inspect_two_model_crosscoder_without_second_model(tmp_path, capsys):
    path = write_ckkissane(tmp_path, gen(), S=2, d=16, F=24, dtype="bf16")
    out = inspect(capsys, path)
    assert "ckkissane" in out
    assert "google/gemma-2-2b" in out and "unknown: pass --model" in out
    assert "blocks.14.hook_resid_pre" in out
    assert "W_enc [2, 16, 24]" in out and "W_dec [24, 2, 16]" in out
    assert "bfloat16 (converted to float32" in out
    assert "24 features, d_model 16" in out
    assert "Activation     relu" in out
    assert "not stored: estimated over the corpus" in out
    assert "Needs          --model" in out
    # with the second model the placeholder is gone
    out = inspect(capsys, path, "--model", "google/gemma-2-2b-it")
    assert "unknown" not in out and "google/gemma-2-2b-it" in out


def test_inspect_scale_sources(tmp_path, capsys):
    path = write_ckkissane(tmp_path, gen(), cfg_extra={"input_scale": [0.5, 0.25]})
    assert "stored in the cfg" in inspect(capsys, path)
    assert "from --scale: [2, 2]" in inspect(capsys, path, "--scale", "2")


def test_inspect_warns_about_nan_and_zero_decoder_rows(tmp_path, capsys):
    path = write_ckkissane(tmp_path, gen(), S=2, d=16, F=24)
    sd = torch.load(path, weights_only=True)
    sd["W_enc"][0, 3, 5] = float("nan")
    sd["W_dec"][[2, 7]] = 0.0
    torch.save(sd, path)
    out = inspect(capsys, path, "--model", "x")
    assert "W_enc has 1 NaN value(s)" in out and "refuses" in out
    assert "2 feature(s) have an all-zero decoder" in out and ": 2, 7" in out


def test_inspect_batchtopk_crosscoder(tmp_path, capsys):
    write_dl_crosscoder(tmp_path, gen(), batchtopk=True, threshold=0.7, hub=True,
                        config={"model_names": ["base", "chat"], "layer": 13})
    out = inspect(capsys, tmp_path)
    assert "dictionary_learning CrossCoder" in out
    assert "batchtopk (trained with k = 4; inference threshold 0.7 on the code-normalised activation)" in out
    assert "code normalisation CROSSCODER" in out
    assert "blocks.13.hook_resid_post" in out


def test_inspect_uncalibrated_batchtopk_warns(tmp_path, capsys):
    path = write_dl_crosscoder(tmp_path, gen(), batchtopk=True, threshold=-1.0)
    out = inspect(capsys, path)
    assert "never calibrated" in out
    assert out.count("unknown: pass --model") == 2 and "unknown: pass --hook-point" in out


def test_inspect_saelens_jumprelu(tmp_path, capsys):
    write_saelens(tmp_path, gen(), "jumprelu", dtype="fp16")
    out = inspect(capsys, tmp_path)
    assert "SAELens SAE (jumprelu)" in out and "SAE (one source)" in out
    assert "jumprelu (per-feature threshold" in out
    assert "float16" in out and "none needed" in out
    assert "gpt2" in out and "blocks.8.hook_resid_pre" in out


def test_inspect_dl_sae_and_crosscode(tmp_path, capsys):
    write_dl_sae(tmp_path / "sae", gen(), "AutoEncoderTopK")
    out = inspect(capsys, tmp_path / "sae")
    assert "AutoEncoderTopK" in out and "topk (k = 5 per token)" in out
    write_crosscode(tmp_path / "cc", gen(), M=2, P=3)
    out = inspect(capsys, tmp_path / "cc")
    assert "crosscode" in out and "2 models × 3 sites" in out and "folded_scaling_factors" in out


def test_inspect_names_the_crosscode_threshold_key(tmp_path, capsys):
    """An older crosscode JumpReLU crosscoder (log-threshold saved as ``activation_fn.log_threshold``, no
    ``_L``) is read, and ``atlas inspect`` says which key held the threshold."""
    write_crosscode(tmp_path / "cc", gen(), threshold_key="activation_fn.log_threshold")
    out = inspect(capsys, tmp_path / "cc")
    assert "Activation     jumprelu (per-feature threshold" in out
    assert "JumpReLU threshold = exp(activation_fn.log_threshold)" in out
