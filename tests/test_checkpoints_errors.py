"""Bad checkpoints and options: each gives one AtlasError line naming the problem and the fix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_checkpoints_formats import write_ckkissane, write_crosscode, write_dl_crosscoder, write_saelens

from atlas.checkpoints import load_checkpoint
from atlas.cli import main
from atlas.errors import AtlasError

torch.set_num_threads(1)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def load_error(*args, **kwargs) -> str:
    with pytest.raises(AtlasError) as info:
        load_checkpoint(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# --------------------------------------------------------------------------- options


def test_two_model_crosscoder_needs_second_model(tmp_path):
    path = write_ckkissane(tmp_path, gen())
    msg = load_error(path)
    assert "two-model crosscoder" in msg and "--model ID --model ID" in msg


def test_too_many_models(tmp_path):
    path = write_ckkissane(tmp_path, gen())
    assert "pass --model 2 time(s)" in load_error(path, models=["a", "b", "c"])


def test_scale_count_must_match_sources(tmp_path):
    path = write_ckkissane(tmp_path, gen(), S=2)
    msg = load_error(path, models=["b"], scale=[1.0, 2.0, 3.0])
    assert "--scale" in msg and "2 sources" in msg


def test_scale_must_be_positive(tmp_path):
    path = write_ckkissane(tmp_path, gen(), S=2)
    assert "positive" in load_error(path, models=["b"], scale=[-1.0])


def test_hook_point_count_for_grid(tmp_path):
    path = write_crosscode(tmp_path, gen(), M=2, P=2, experiment=False)
    msg = load_error(path, models=["a", "b"], hook_point="blocks.1.hook_resid_post")
    assert "comma" in msg and "2" in msg


def test_missing_hook_point(tmp_path):
    cfg = {"d_in": 16, "dict_size": 24, "model_name": "gpt2"}
    path = write_ckkissane(tmp_path, gen(), S=1, cfg=cfg)
    assert "--hook-point" in load_error(path)
    assert load_checkpoint(path, hook_point="blocks.2.hook_resid_post").sources[0].site == "blocks.2.hook_resid_post"


def test_saelens_model_missing_from_cfg(tmp_path):
    write_saelens(tmp_path, gen(), "standard")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["metadata"]["model_name"]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert "--model" in load_error(tmp_path)
    assert load_checkpoint(tmp_path, models=["gpt2"]).sources[0].model == "gpt2"


# --------------------------------------------------------------------------- tensors and configs


def test_shape_mismatch_between_tensors(tmp_path):
    path = write_ckkissane(tmp_path, gen(), S=2, d=16, F=24)
    sd = torch.load(path, weights_only=True)
    sd["W_dec"] = torch.randn(24, 2, 15)
    torch.save(sd, path)
    msg = load_error(path, models=["b"])
    assert "W_dec has shape [24, 2, 15]" in msg and "[24, 2, 16]" in msg


def test_dl_decoder_axis_order_checked(tmp_path):
    path = write_dl_crosscoder(tmp_path, gen(), S=2, d=16, F=24)
    sd = torch.load(path, weights_only=True)
    sd["decoder.weight"] = sd["decoder.weight"].permute(1, 0, 2).contiguous()  # [F, S, d]: wrong for this format
    torch.save(sd, path)
    assert "decoder.weight" in load_error(path, models=["a", "b"], hook_point="h")


def test_cfg_inconsistent_with_tensors(tmp_path):
    path = write_ckkissane(tmp_path, gen(), d=16, F=24, cfg_extra={"dict_size": 4096})
    msg = load_error(path, models=["b"])
    assert "dict_size = 4096" in msg and "24" in msg


def test_saelens_cfg_inconsistent(tmp_path):
    write_saelens(tmp_path, gen(), "standard", d=16)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["d_in"] = 768
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert "d_in = 768" in load_error(tmp_path)


def test_missing_tensor(tmp_path):
    path = write_ckkissane(tmp_path, gen())
    sd = torch.load(path, weights_only=True)
    del sd["b_enc"]
    torch.save(sd, path)
    assert "'b_enc'" in load_error(path, models=["b"])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_refused(tmp_path, value):
    path = write_ckkissane(tmp_path, gen())
    sd = torch.load(path, weights_only=True)
    sd["W_enc"][0, 0, 0] = value
    torch.save(sd, path)
    msg = load_error(path, models=["b"])
    assert "non-finite" in msg and "W_enc" in msg and "earlier checkpoint" in msg


def test_unknown_format_lists_formats(tmp_path):
    path = tmp_path / "mystery.pt"
    torch.save({"weight": torch.randn(3, 4), "bias": torch.randn(3)}, path)
    msg = load_error(path)
    assert "unknown checkpoint format" in msg
    for name in ("ckkissane", "dictionary_learning", "crosscode", "SAELens"):
        assert name in msg


def test_saelens_weights_without_cfg(tmp_path):
    path = write_saelens(tmp_path, gen(), "standard")
    (tmp_path / "cfg.json").unlink()
    msg = load_error(path)
    assert "cfg.json" in msg


def test_ckkissane_without_cfg(tmp_path):
    path = write_ckkissane(tmp_path, gen())
    (tmp_path / "7_cfg.json").unlink()
    msg = load_error(path)
    assert "7_cfg.json" in msg and "--model" in msg
    cc = load_checkpoint(path, models=["a", "b"], hook_point="blocks.1.hook_resid_post")
    assert [s.model for s in cc.sources] == ["a", "b"]


def test_crosscode_without_model_cfg(tmp_path):
    path = write_crosscode(tmp_path, gen(), activation="relu")
    (path.parent / "model_cfg.yaml").unlink()
    assert "model_cfg.yaml" in load_error(path)


def test_invalid_json_cfg(tmp_path):
    path = write_ckkissane(tmp_path, gen())
    (tmp_path / "7_cfg.json").write_text("{ not json")
    assert "not valid JSON" in load_error(path, models=["b"])


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.95])
def test_truncated_torch_file(tmp_path, keep):
    path = write_ckkissane(tmp_path, gen())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    msg = load_error(path, models=["b"])
    assert "truncated" in msg or "empty" in msg


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.99])
def test_truncated_safetensors(tmp_path, keep):
    path = write_saelens(tmp_path, gen(), "standard")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    assert "truncated or corrupt" in load_error(path)


def test_pickled_object_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"W_enc": torch.randn(2, 3, 4), "opt": torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)}, path)
    assert "state_dict" in load_error(path)


def test_path_not_found(tmp_path):
    assert "not found" in load_error(tmp_path / "nope.pt")


def test_empty_folder(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("x")
    assert "no checkpoint file" in load_error(tmp_path / "run")


def test_unsupported_saelens_architecture(tmp_path):
    write_saelens(tmp_path, gen(), "standard")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["architecture"] = "transcoder"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    msg = load_error(tmp_path)
    assert "transcoder" in msg and "supported" in msg


def test_crosscode_transcoder_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"_W_enc_XiDiL": torch.randn(8, 12), "_W_dec_LXoDo": torch.randn(12, 3, 8), "b_enc_L": torch.randn(12)}, path)
    assert "transcoder" in load_error(path)


# --------------------------------------------------------------------------- folders


def _touch(path: Path, t: float) -> None:
    os.utime(path, (t, t))


def test_folder_picks_newest_checkpoint(tmp_path):
    runs = tmp_path / "checkpoints"
    paths = {}
    for version, step, t in [(0, 0, 1000), (0, 1, 2000), (1, 0, 3000), (1, 1, 1500)]:
        p = write_ckkissane(runs / f"version_{version}", gen(version * 10 + step), name=str(step))
        _touch(p, t)
        paths[(version, step)] = p
    assert load_checkpoint(runs, models=["b"]).path == str(paths[(1, 0)])
    _touch(paths[(0, 0)], 4000)
    assert load_checkpoint(runs, models=["b"]).path == str(paths[(0, 0)])


def test_folder_skips_training_state_files(tmp_path):
    path = write_saelens(tmp_path, gen(), "standard")
    _touch(path, 1000)
    save_file({"sparsity": torch.zeros(4)}, str(tmp_path / "sparsity.safetensors"))
    torch.save({"step": 3}, tmp_path / "trainer_state.pt")
    assert load_checkpoint(tmp_path).path == str(path)


def test_config_file_argument_points_at_weights(tmp_path):
    path = write_ckkissane(tmp_path, gen())
    assert load_checkpoint(tmp_path / "7_cfg.json", models=["b"]).path == str(path)
    sae = write_saelens(tmp_path / "sae", gen(), "standard")
    assert load_checkpoint(tmp_path / "sae" / "cfg.json").path == str(sae)


# --------------------------------------------------------------------------- CLI


def test_cli_error_is_one_line_exit_2(tmp_path, capsys):
    path = write_ckkissane(tmp_path, gen())
    sd = torch.load(path, weights_only=True)
    sd["W_enc"] = sd["W_enc"][:, :5]
    torch.save(sd, path)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("atlas: error: ") and "\n" not in err and "Traceback" not in err
