"""Each checkpoint format, written from its documented key names, shapes, axis orders and dtypes with
random tensors, loads into a Crosscoder whose ``encode`` equals that format's own encode.

The ``write_*`` functions below build checkpoints the way each training library saves them; the ``ref_*``
functions are independent re-implementations of each library's encode, written from the format's own
tensors (never through ``atlas.checkpoints``). Other checkpoint test modules import the writers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from atlas.checkpoints import load_checkpoint
from atlas.crosscoder import Crosscoder
from atlas.errors import AtlasError

torch.set_num_threads(1)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def rand(g: torch.Generator, *shape, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def inputs(g: torch.Generator, S: int, d: int, B: int = 48, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(B, S, d, generator=g) * scale


def F32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


def assert_encode_matches(cc: Crosscoder, x: torch.Tensor, ref: torch.Tensor) -> None:
    out = cc.encode(x)
    assert out.shape == ref.shape
    assert (ref > 0).any(), "the reference activates no feature: the test would prove nothing"
    assert (ref == 0).any(), "the reference activates every feature: the test would prove little"
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


# =========================================================================== ckkissane / Neel


def write_ckkissane(folder: Path, g, *, S=2, d=16, F=24, dtype="fp32", name="7", cfg: dict | None = None,
                    cfg_extra: dict | None = None) -> Path:
    """``N.pt`` state dict (W_enc[S,d,F], W_dec[F,S,d], b_enc[F], b_dec[S,d]) + ``N_cfg.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    dt = DTYPES[dtype]
    sd = {
        "W_enc": rand(g, S, d, F, scale=1 / math.sqrt(d), dtype=dt),
        "W_dec": rand(g, F, S, d, scale=0.1, dtype=dt),
        "b_enc": rand(g, F, scale=0.5, dtype=dt),
        "b_dec": rand(g, S, d, scale=0.1, dtype=dt),
    }
    path = folder / f"{name}.pt"
    torch.save(sd, path)
    if cfg is None:
        cfg = {"seed": 49, "batch_size": 4096, "lr": 5e-5, "l1_coeff": 2, "d_in": d, "dict_size": F,
               "seq_len": 1024, "enc_dtype": dtype, "model_name": "gemma-2-2b", "site": "resid_pre",
               "device": "cuda:0", "dec_init_norm": 0.08, "hook_point": "blocks.14.hook_resid_pre"}
    cfg = {**cfg, **(cfg_extra or {})}
    (folder / f"{name}_cfg.json").write_text(json.dumps(cfg))
    return path


def ref_ckkissane(sd: dict, x: torch.Tensor, scale=None) -> torch.Tensor:
    if scale is not None:
        x = x * torch.as_tensor(scale, dtype=torch.float32)[None, :, None]
    pre = torch.einsum("bnd,ndh->bh", x, F32(sd["W_enc"])) + F32(sd["b_enc"])
    return torch.relu(pre)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_ckkissane_model_diffing(tmp_path, dtype):
    g = torch.Generator().manual_seed(1)
    path = write_ckkissane(tmp_path, g, dtype=dtype)
    cc = load_checkpoint(path, models=["google/gemma-2-2b-it"])
    sd = torch.load(path, weights_only=True)
    assert cc.format == "ckkissane"
    assert [s.model for s in cc.sources] == ["google/gemma-2-2b", "google/gemma-2-2b-it"]
    assert {s.site for s in cc.sources} == {"blocks.14.hook_resid_pre"}
    assert cc.W_enc.dtype == torch.float32 and cc.input_scale is None
    x = inputs(g, 2, 16)
    assert_encode_matches(cc, x, ref_ckkissane(sd, x))


def test_ckkissane_demo_cfg_keys_and_scale(tmp_path):
    g = torch.Generator().manual_seed(2)
    path = write_ckkissane(tmp_path, g, cfg_extra={"model_names": ["demo:a", "demo:b"], "input_scale": [0.5, 2.0]})
    cc = load_checkpoint(path)
    assert [s.model for s in cc.sources] == ["demo:a", "demo:b"]
    torch.testing.assert_close(cc.input_scale, torch.tensor([0.5, 2.0]))
    sd = torch.load(path, weights_only=True)
    x = inputs(g, 2, 16)
    assert_encode_matches(cc, x, ref_ckkissane(sd, x, [0.5, 2.0]))
    # --scale replaces the stored factor; one value serves every source
    cc2 = load_checkpoint(path, scale=[3.0])
    torch.testing.assert_close(cc2.input_scale, torch.tensor([3.0, 3.0]))
    assert_encode_matches(cc2, x, ref_ckkissane(sd, x, [3.0, 3.0]))
    # --model given once per model replaces the cfg's ids; --hook-point replaces the cfg's hook point
    cc3 = load_checkpoint(path, models=["m1", "m2"], hook_point="model.layers.3")
    assert [(s.model, s.site) for s in cc3.sources] == [("m1", "model.layers.3"), ("m2", "model.layers.3")]


def test_neel_cross_layer(tmp_path):
    g = torch.Generator().manual_seed(3)
    cfg = {"seed": 51, "dict_size": 20, "seq_len": 1024, "enc_dtype": "fp32", "model_name": "gpt2-small",
           "site": "resid_post", "device": "cuda:0", "dec_init_norm": 0.005}
    path = write_ckkissane(tmp_path, g, S=4, d=12, F=20, cfg=cfg, name="lambda_2_64k")
    cc = load_checkpoint(path)
    assert [(s.model, s.site) for s in cc.sources] == [("gpt2", f"blocks.{i}.hook_resid_post") for i in range(4)]
    sd = torch.load(path, weights_only=True)
    x = inputs(g, 4, 12)
    assert_encode_matches(cc, x, ref_ckkissane(sd, x))


def test_ckkissane_hf_layout(tmp_path):
    """ckkissane's Hugging Face upload: ``<hook>/cc_weights.pt`` + ``<hook>/cfg.json``."""
    g = torch.Generator().manual_seed(4)
    folder = tmp_path / "blocks.14.hook_resid_pre"
    path = write_ckkissane(folder, g, name="cc_weights")
    (folder / "cc_weights_cfg.json").rename(folder / "cfg.json")
    cc = load_checkpoint(folder, models=["google/gemma-2-2b", "google/gemma-2-2b-it"])
    assert cc.path == str(path) and cc.format == "ckkissane"


def test_sae_as_one_source_crosscoder(tmp_path):
    g = torch.Generator().manual_seed(5)
    path = write_ckkissane(tmp_path, g, S=1, cfg_extra={"model_name": "gpt2", "hook_point": "blocks.1.hook_resid_post"})
    cc = load_checkpoint(path)
    assert cc.n_sources == 1 and cc.sources[0].model == "gpt2"


def write_neel_sae(folder: Path, g, cfg: dict, *, d=16, F=24, dtype="fp32", name="1") -> Path:
    """Neel Nanda's 1L-Sparse-Autoencoder / Kissane et al.'s attention SAE: ``AutoEncoder.state_dict()``
    (2-D ``W_enc[d, F]``, ``W_dec[F, d]``) saved as ``N.pt`` with the training cfg as ``N_cfg.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    dt = DTYPES[dtype]
    sd = {"W_enc": rand(g, d, F, scale=1 / math.sqrt(d), dtype=dt), "W_dec": rand(g, F, d, scale=0.3, dtype=dt),
          "b_enc": rand(g, F, scale=0.4, dtype=dt), "b_dec": rand(g, d, scale=0.5, dtype=dt)}
    torch.save(sd, folder / f"{name}.pt")
    (folder / f"{name}_cfg.json").write_text(json.dumps({"act_size": d, "dict_size": F, "enc_dtype": dtype, **cfg}))
    return folder / f"{name}.pt"


def ref_neel_sae(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """The training code's encode: ``relu((x - b_dec) @ W_enc + b_enc)`` on ``x[B, d]``."""
    return torch.relu((x - F32(sd["b_dec"])) @ F32(sd["W_enc"]) + F32(sd["b_enc"]))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("cfg,site", [
    ({"model_name": "gpt2-small", "site": "z", "layer": 3, "act_name": "blocks.3.attn.hook_z", "head": "cat"},
     "blocks.3.attn.hook_z"),
    ({"model_name": "gelu-1l", "site": "post", "layer": 0}, "blocks.0.mlp.hook_post"),
    ({"model_name": "gpt2-small", "site": "resid_pre", "layer": 2}, "blocks.2.hook_resid_pre"),
])
def test_neel_and_kissane_saes(tmp_path, cfg, site, dtype):
    g = torch.Generator().manual_seed(7)
    path = write_neel_sae(tmp_path, g, cfg, dtype=dtype)
    cc = load_checkpoint(path)
    assert cc.format == "ckkissane" and cc.n_sources == 1 and cc.sources[0].site == site
    assert torch.equal(cc.input_scale, torch.ones(1))  # trained on raw activations: nothing to estimate
    sd = torch.load(path, weights_only=True)
    x = inputs(g, 1, 16)
    assert_encode_matches(cc, x, ref_neel_sae(sd, x[:, 0]))
    torch.testing.assert_close(cc.W_dec[:, 0], F32(sd["W_dec"]))


def test_neel_sae_width_that_disagrees_with_its_cfg(tmp_path):
    path = write_neel_sae(tmp_path, torch.Generator().manual_seed(8), {"model_name": "gpt2", "site": "z", "layer": 0})
    cfg = json.loads(path.with_name("1_cfg.json").read_text())
    cfg["act_size"] = 99
    path.with_name("1_cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(AtlasError, match="act_size = 99"):
        load_checkpoint(path)


# =========================================================================== dictionary_learning CrossCoder


def write_dl_crosscoder(folder: Path, g, *, S=2, d=16, F=24, dtype="fp32", code_norm: int | None = 1,
                        batchtopk=False, threshold=0.3, normaliser=False, prefix="", hub=False,
                        config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dt = DTYPES[dtype]
    sd = {
        "encoder.weight": rand(g, S, d, F, scale=1 / math.sqrt(d), dtype=dt),
        "encoder.bias": rand(g, F, scale=0.5, dtype=dt),
        "decoder.weight": rand(g, S, F, d, scale=0.2, dtype=dt),
        "decoder.bias": rand(g, S, d, scale=0.1, dtype=dt),
    }
    if code_norm is not None:
        sd["code_normalization_id"] = torch.tensor(code_norm)
    if batchtopk:
        sd["k"] = torch.tensor(4, dtype=torch.int)
        sd["threshold"] = torch.tensor(threshold, dtype=torch.float32)
    if normaliser is True:
        std = torch.rand(S, d, generator=g) + 0.5
        sd["activation_mean"] = rand(g, S, d, scale=1.0)
        sd["activation_std"] = std
        sd["target_rms"] = torch.tensor(1.0)
        sd["activation_global_scale"] = 1.0 / torch.sqrt((std ** 2).sum(-1) + 1e-8)
    elif normaliser == "nan":
        sd["activation_mean"] = torch.full((S, d), float("nan"))
        sd["activation_std"] = torch.full((S, d), float("nan"))
        sd["target_rms"] = torch.tensor(1.0)
        sd["activation_global_scale"] = torch.ones(S)
    sd = {prefix + k: v for k, v in sd.items()}
    if hub:
        path = folder / "model.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        cfg = {"activation_dim": d, "dict_size": F, "num_layers": S, "dict_class": "BatchTopKCrossCoder" if batchtopk else "CrossCoder"}
        (folder / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
    else:
        path = folder / "crosscoder.pt"
        torch.save(sd, path)
        if config is not None:
            (folder / "config.json").write_text(json.dumps(config))
    return path


def ref_dl_crosscoder(sd: dict, x: torch.Tensor, code_norm: str = "CROSSCODER", alphas=(1.0, 0.1)) -> torch.Tensor:
    """dictionary_learning CrossCoder.get_activations / BatchTopKCrossCoder.get_activations."""
    sd = {k.replace("_orig_mod.", ""): v for k, v in sd.items()}
    mean, std = sd.get("activation_mean"), sd.get("activation_std")
    if mean is not None and not torch.isnan(mean).any() and not torch.isnan(std).any():
        x = (x - mean) * sd["activation_global_scale"][None, :, None]
    enc = F32(sd["encoder.weight"])
    f = torch.relu(torch.einsum("bld,ldf->blf", x, enc).sum(dim=1) + F32(sd["encoder.bias"]))
    dw = F32(sd["decoder.weight"])
    if code_norm == "CROSSCODER":
        wn = dw.norm(dim=2).sum(dim=0, keepdim=True)
    elif code_norm == "SAE":
        wn = dw.norm(dim=(0, 2)).unsqueeze(0)
    elif code_norm == "MIXED":
        wn = dw.norm(dim=(0, 2)).unsqueeze(0) * alphas[0] + dw.norm(dim=2).sum(dim=0, keepdim=True) * alphas[1]
    else:
        wn = torch.tensor(1.0)
    if "threshold" in sd:
        f = f * (f * wn > sd["threshold"])
    return f * wn


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("batchtopk", [False, True])
def test_dl_crosscoder(tmp_path, dtype, batchtopk):
    g = torch.Generator().manual_seed(10)
    path = write_dl_crosscoder(tmp_path, g, dtype=dtype, batchtopk=batchtopk, threshold=0.5,
                               config={"trainer": {"layer": 13, "lm_name": "chat-base", "dict_class": "CrossCoder",
                                                   "activation_dim": 16, "dict_size": 24}})
    cc = load_checkpoint(path, models=["google/gemma-2-2b", "google/gemma-2-2b-it"])
    assert cc.format == "dictionary_learning"
    assert cc.activation == ("batchtopk" if batchtopk else "relu")
    assert {s.site for s in cc.sources} == {"blocks.13.hook_resid_post"}
    sd = torch.load(path, weights_only=True)
    x = inputs(g, 2, 16)
    assert_encode_matches(cc, x, ref_dl_crosscoder(sd, x))
    # W_dec comes out in canonical [F, S, d] order
    torch.testing.assert_close(cc.W_dec, F32(sd["decoder.weight"]).permute(1, 0, 2))


@pytest.mark.parametrize("code_norm,name", [(2, "SAE"), (3, "MIXED"), (4, "NONE"), (None, "CROSSCODER")])
def test_dl_crosscoder_code_normalisations(tmp_path, code_norm, name):
    g = torch.Generator().manual_seed(11)
    path = write_dl_crosscoder(tmp_path, g, code_norm=code_norm)
    cc = load_checkpoint(path, models=["a", "b"], hook_point="blocks.3.hook_resid_post")
    sd = torch.load(path, weights_only=True)
    x = inputs(g, 2, 16)
    assert_encode_matches(cc, x, ref_dl_crosscoder(sd, x, name))


def test_dl_crosscoder_compiled_hub_layout_with_normaliser(tmp_path):
    """Hub layout (config.json + model.safetensors), ``_orig_mod.`` keys, bf16, activation normaliser."""
    g = torch.Generator().manual_seed(12)
    path = write_dl_crosscoder(tmp_path, g, dtype="bf16", batchtopk=True, threshold=0.2, normaliser=True,
                               prefix="_orig_mod.", hub=True,
                               config={"model_names": ["google/gemma-2-2b", "google/gemma-2-2b-it"], "layer": 13})
    cc = load_checkpoint(tmp_path)
    assert cc.path == str(path)
    assert [s.model for s in cc.sources] == ["google/gemma-2-2b", "google/gemma-2-2b-it"]
    from safetensors.torch import load_file

    sd = load_file(str(path))
    torch.testing.assert_close(cc.input_scale, sd["_orig_mod.activation_global_scale"].float())
    x = inputs(g, 2, 16) + 2.0
    assert_encode_matches(cc, x, ref_dl_crosscoder(sd, x))
    # decode inverts the normaliser: reconstruction in model units
    f = cc.encode(x)
    dw = F32(sd["_orig_mod.decoder.weight"])
    wn = dw.norm(dim=2).sum(0)
    rec_norm = torch.einsum("bf,sfd->bsd", f / wn, dw) + F32(sd["_orig_mod.decoder.bias"])
    gsc = sd["_orig_mod.activation_global_scale"]
    rec = rec_norm / gsc[None, :, None] + sd["_orig_mod.activation_mean"]
    torch.testing.assert_close(cc.decode(f), rec, atol=1e-3, rtol=1e-3)


def test_dl_crosscoder_nan_normaliser_means_none(tmp_path):
    g = torch.Generator().manual_seed(13)
    path = write_dl_crosscoder(tmp_path, g, normaliser="nan")
    cc = load_checkpoint(path, models=["a", "b"], hook_point="h")
    torch.testing.assert_close(cc.input_scale, torch.ones(2))
    sd = torch.load(path, weights_only=True)
    x = inputs(g, 2, 16)
    assert_encode_matches(cc, x, ref_dl_crosscoder(sd, x))


# =========================================================================== dictionary_learning SAEs


def write_dl_sae(folder: Path, g, kind: str, *, d=16, F=32, dtype="fp32", trainer: dict | None = None,
                 name="ae.pt") -> Path:
    """``ae.pt`` + ``config.json`` as dictionary_learning's trainSAE writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    dt = DTYPES[dtype]
    enc = rand(g, F, d, scale=1 / math.sqrt(d), dtype=dt)  # nn.Linear(d, F).weight
    dec = rand(g, d, F, scale=0.2, dtype=dt)  # nn.Linear(F, d).weight
    if kind == "AutoEncoder":
        sd = {"bias": rand(g, d, scale=0.3, dtype=dt), "encoder.weight": enc,
              "encoder.bias": rand(g, F, scale=0.3, dtype=dt), "decoder.weight": dec}
    elif kind == "AutoEncoderNew":
        sd = {"encoder.weight": enc, "encoder.bias": rand(g, F, scale=0.3, dtype=dt), "decoder.weight": dec,
              "decoder.bias": rand(g, d, scale=0.3, dtype=dt)}
    elif kind in ("AutoEncoderTopK", "BatchTopKSAE"):
        sd = {"k": torch.tensor(5, dtype=torch.int), "threshold": torch.tensor(0.4), "decoder.weight": dec,
              "encoder.weight": enc, "encoder.bias": rand(g, F, scale=0.3, dtype=dt),
              "b_dec": rand(g, d, scale=0.3, dtype=dt)}
    elif kind == "GatedAutoEncoder":
        sd = {"decoder_bias": rand(g, d, scale=0.3, dtype=dt), "encoder.weight": enc,
              "r_mag": rand(g, F, scale=0.3, dtype=dt), "gate_bias": rand(g, F, scale=0.5, dtype=dt),
              "mag_bias": rand(g, F, scale=0.5, dtype=dt), "decoder.weight": dec}
    elif kind == "JumpReluAutoEncoder":
        sd = {"W_enc": enc.T.contiguous(), "b_enc": rand(g, F, scale=0.3, dtype=dt), "W_dec": dec.T.contiguous(),
              "b_dec": rand(g, d, scale=0.3, dtype=dt), "threshold": (torch.rand(F, generator=g) * 1.5).to(dt)}
    else:
        raise ValueError(kind)
    path = folder / name
    torch.save(sd, path)
    tr = {"trainer_class": kind.replace("AutoEncoder", "") + "Trainer", "dict_class": kind, "activation_dim": d,
          "dict_size": F, "lm_name": "EleutherAI/pythia-70m-deduped", "layer": 3,
          "submodule_name": "resid_post_layer_3", "device": "cuda:0"}
    (folder / "config.json").write_text(json.dumps({"trainer": {**tr, **(trainer or {})},
                                                     "buffer": {"d_submodule": d, "ctx_len": 128}}))
    return path


def ref_dl_sae(kind: str, sd: dict, x: torch.Tensor) -> torch.Tensor:
    """The library's ``encode`` for each SAE class, on ``x[B, d]``."""
    sd = {k: F32(v) if v.is_floating_point() else v for k, v in sd.items()}
    lin = lambda v, w, b=None: v @ w.T + (b if b is not None else 0)  # noqa: E731 - nn.Linear
    if kind == "AutoEncoder":
        return torch.relu(lin(x - sd["bias"], sd["encoder.weight"], sd["encoder.bias"]))
    if kind == "AutoEncoderNew":
        return torch.relu(lin(x, sd["encoder.weight"], sd["encoder.bias"]))
    if kind == "AutoEncoderTopK":
        post = torch.relu(lin(x - sd["b_dec"], sd["encoder.weight"], sd["encoder.bias"]))
        top = post.topk(int(sd["k"]), sorted=False, dim=-1)
        return torch.zeros_like(post).scatter_(-1, top.indices, top.values)
    if kind == "BatchTopKSAE":
        post = torch.relu(lin(x - sd["b_dec"], sd["encoder.weight"], sd["encoder.bias"]))
        return post * (post > sd["threshold"])
    if kind == "GatedAutoEncoder":
        x_enc = lin(x - sd["decoder_bias"], sd["encoder.weight"])
        f_gate = (x_enc + sd["gate_bias"] > 0).float()
        f_mag = torch.relu(sd["r_mag"].exp() * x_enc + sd["mag_bias"])
        return f_gate * f_mag
    if kind == "JumpReluAutoEncoder":
        pre = x @ sd["W_enc"] + sd["b_enc"]
        return torch.relu(pre * (pre > sd["threshold"]))
    raise ValueError(kind)


SAE_KINDS = ["AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE", "GatedAutoEncoder", "JumpReluAutoEncoder"]


@pytest.mark.parametrize("kind", SAE_KINDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_dl_sae(tmp_path, kind, dtype):
    g = torch.Generator().manual_seed(20 + SAE_KINDS.index(kind))
    path = write_dl_sae(tmp_path, g, kind, dtype=dtype)
    cc = load_checkpoint(path)
    assert cc.format == "dictionary_learning_sae" and cc.extra["class"] == kind
    assert cc.sources[0].model == "EleutherAI/pythia-70m-deduped"
    assert cc.sources[0].site == "blocks.3.hook_resid_post"
    torch.testing.assert_close(cc.input_scale, torch.ones(1))
    sd = torch.load(path, weights_only=True)
    x = inputs(g, 1, 16)
    assert_encode_matches(cc, x, ref_dl_sae(kind, sd, x[:, 0]))


def test_dl_sae_checkpoint_subfolder_reads_parent_config(tmp_path):
    """trainSAE's intermediate ``checkpoints/ae_<step>.pt`` take the run's config.json one folder up."""
    g = torch.Generator().manual_seed(30)
    write_dl_sae(tmp_path, g, "AutoEncoder")
    sub = write_dl_sae(tmp_path / "checkpoints", g, "AutoEncoder", name="ae_1000.pt")
    (tmp_path / "checkpoints" / "config.json").unlink()
    cc = load_checkpoint(sub)
    assert cc.sources[0].model == "EleutherAI/pythia-70m-deduped"


def test_dl_sae_training_backup(tmp_path):
    """The resumable backup ae.pt nests the weights under "ae" beside optimizer, config and norm_factor."""
    g = torch.Generator().manual_seed(31)
    path = write_dl_sae(tmp_path, g, "AutoEncoder")
    sd = torch.load(path, weights_only=True)
    trainer = json.loads((tmp_path / "config.json").read_text())["trainer"]
    (tmp_path / "config.json").unlink()
    torch.save({"step": 100, "ae": sd, "optimizer": {"state": {}, "param_groups": []}, "config": trainer,
                "norm_factor": 4.0}, path)
    cc = load_checkpoint(path)
    torch.testing.assert_close(cc.input_scale, torch.tensor([0.25]))
    x = inputs(g, 1, 16)
    assert_encode_matches(cc, x, ref_dl_sae("AutoEncoder", sd, x[:, 0] / 4.0))


# =========================================================================== crosscode


def write_crosscode(run: Path, g, *, M=2, P=2, d=12, F=20, activation="jumprelu", dtype="fp32", folded=True,
                    k=5, experiment=True, hookpoints=None, threshold_key="activation_fn.log_threshold_L") -> Path:
    """``<run>/experiment_config.yaml`` + ``<run>/epoch_0_step_N/{model.pt, model_cfg.yaml}``; a JumpReLU
    crosscoder's log-threshold is saved under ``threshold_key``."""
    dt = DTYPES[dtype]
    ckpt = run / "epoch_0_step_100"
    ckpt.mkdir(parents=True, exist_ok=True)
    Xi = (M, P) if M * P > 1 else ()
    sd = {
        "_W_enc_XiDiL": rand(g, *Xi, d, F, scale=1 / math.sqrt(d * max(M * P, 1)), dtype=dt),
        "_W_dec_LXoDo": rand(g, F, *Xi, d, scale=0.2, dtype=dt),
        "b_enc_L": rand(g, F, scale=0.4, dtype=dt),
        "_b_dec_XoDo": rand(g, *Xi, d, scale=0.1, dtype=dt),
    }
    if activation == "jumprelu":
        sd[threshold_key] = (rand(g, F, scale=0.5) - 1.0).to(dt)
        act = {"classname": "AnthropicSTEJumpReLUActivation", "cfg": {"size": F, "bandwidth": 2.0}}
    elif activation == "relu":
        act = {"classname": "ReLUActivation", "cfg": {}}
    elif activation == "topk":
        act = {"classname": "TopkActivation", "cfg": {"k": k}}
    else:
        act = {"classname": "BatchTopkActivation", "cfg": {"k_per_example": k}}
    factors = torch.rand(*Xi, generator=g) + 0.5 if Xi else torch.tensor(1.7)
    sd["folded_scaling_factors_in_Xi"] = factors.to(dt) if folded else torch.zeros(Xi, dtype=dt)
    sd["folded_scaling_factors_out_Xo"] = factors.to(dt) if folded else torch.zeros(Xi, dtype=dt)
    sd["is_folded"] = torch.tensor(folded)
    torch.save(sd, ckpt / "model.pt")
    cfg = {"n_models": M, "n_hookpoints": P, "d_model": d, "n_latents": F, "activation_fn": act,
           "use_encoder_bias": True, "use_decoder_bias": True, "dtype": "float32"}
    (ckpt / "model_cfg.yaml").write_text(yaml.dump(cfg))
    if experiment:
        hps = hookpoints or [f"blocks.{4 * (p + 1)}.hook_resid_post" for p in range(P)]
        exp = {"data": {"activations_harvester": {"llms": [{"name": f"EleutherAI/pythia-160m-{m}", "revision": "step143000"}
                                                           for m in range(M)]}},
               "hookpoints": hps, "experiment_name": "test"}
        (run / "experiment_config.yaml").write_text(yaml.dump(exp))
    return ckpt / "model.pt"


def ref_crosscode(sd: dict, cfg_act: str, x_bmpd: torch.Tensor, k=5) -> torch.Tensor:
    """crosscode BaseCrosscoder._forward_train latents on raw activations (weights as saved, folded)."""
    W = F32(sd["_W_enc_XiDiL"])
    pre = torch.einsum("b...,...l->bl", x_bmpd, W) + F32(sd["b_enc_L"])
    if cfg_act == "relu":
        return torch.relu(pre)
    if cfg_act == "jumprelu":
        th = F32(next(v for key, v in sd.items() if ".log_threshold" in key)).exp()
        return (pre > th) * pre
    if cfg_act == "topk":
        values, indices = pre.topk(k, dim=-1, sorted=False)
        out = torch.zeros_like(pre).scatter_(-1, indices, values)
        return out.clamp_min(0)  # the atlas shows top-k entries that are negative as 0 (documented)
    raise ValueError(cfg_act)


@pytest.mark.parametrize("activation", ["jumprelu", "relu", "topk"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_crosscode_grid(tmp_path, activation, dtype):
    g = torch.Generator().manual_seed(40)
    path = write_crosscode(tmp_path / "run", g, activation=activation, dtype=dtype)
    cc = load_checkpoint(tmp_path / "run")  # folder → newest checkpoint inside
    assert cc.path == str(path) and cc.format == "crosscode"
    assert [(s.model, s.site) for s in cc.sources] == [
        ("EleutherAI/pythia-160m-0", "blocks.4.hook_resid_post"), ("EleutherAI/pythia-160m-0", "blocks.8.hook_resid_post"),
        ("EleutherAI/pythia-160m-1", "blocks.4.hook_resid_post"), ("EleutherAI/pythia-160m-1", "blocks.8.hook_resid_post")]
    sd = torch.load(path, weights_only=True)
    x = inputs(g, 4, 12)
    assert_encode_matches(cc, x, ref_crosscode(sd, activation, x.reshape(-1, 2, 2, 12)))
    # unfolded: input_scale = the folded factors, W_dec back in the training space
    torch.testing.assert_close(cc.input_scale, F32(sd["folded_scaling_factors_in_Xi"]).reshape(-1))
    f = cc.encode(x)
    rec = torch.einsum("bl,lmpd->bmpd", f, F32(sd["_W_dec_LXoDo"])) + F32(sd["_b_dec_XoDo"])
    torch.testing.assert_close(cc.decode(f), rec.reshape(-1, 4, 12), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("key", ["_activation_fn.log_threshold_L", "activation_fn.log_threshold_L",
                                 "activation_fn.log_threshold", "activation_fn.log_threshold_H",
                                 "hidden_activation.log_threshold_H"])
def test_crosscode_jumprelu_threshold_under_every_key_name(tmp_path, key):
    """crosscode named the JumpReLU log-threshold differently over its versions (the activation module
    ``_activation_fn``, ``activation_fn`` or ``hidden_activation``, the parameter ``log_threshold_L``,
    ``log_threshold`` or ``log_threshold_H``): each loads as the same crosscoder, and the notes name the
    key read."""
    g = torch.Generator().manual_seed(43)
    path = write_crosscode(tmp_path / "run", g, threshold_key=key)
    cc = load_checkpoint(path)
    assert cc.activation == "jumprelu" and f"JumpReLU threshold = exp({key})" in cc.extra["notes"]
    sd = torch.load(path, weights_only=True)
    torch.testing.assert_close(cc.threshold, sd[key].exp())
    x = inputs(g, 4, 12)
    assert_encode_matches(cc, x, ref_crosscode(sd, "jumprelu", x.reshape(-1, 2, 2, 12)))


def test_crosscode_jumprelu_without_a_threshold_names_the_keys(tmp_path):
    path = write_crosscode(tmp_path / "run", torch.Generator().manual_seed(44), threshold_key="activation_fn.bias")
    with pytest.raises(AtlasError, match=r"without its log-threshold \(none of the keys _activation_fn.log_threshold_L, "
                       r".*activation_fn.log_threshold, .*hidden_activation.log_threshold_H\); the file is incomplete"):
        load_checkpoint(path)


def test_crosscode_unfolded_sae_without_run_config(tmp_path):
    g = torch.Generator().manual_seed(41)
    path = write_crosscode(tmp_path, g, M=1, P=1, activation="relu", folded=False, experiment=False)
    cc = load_checkpoint(path, models=["gpt2"], hook_point="blocks.6.hook_resid_post")
    assert cc.input_scale is None  # trained on normalised inputs, factor not saved: estimated
    sd = torch.load(path, weights_only=True)
    x = inputs(g, 1, 12)
    assert_encode_matches(cc, x, ref_crosscode(sd, "relu", x[:, 0]))


def test_crosscode_batchtopk_leaves_its_threshold_to_the_analysis(tmp_path):
    """crosscode saves no inference threshold for BatchTopK: the loader keeps k and no threshold (the
    analysis estimates it, see tests/test_batchtopk.py); a threshold put in encodes as crosscode's
    batch-level top-k does over a batch whose cut-off is that threshold."""
    g = torch.Generator().manual_seed(42)
    path = write_crosscode(tmp_path, g, activation="batchtopk")
    cc = load_checkpoint(path)
    assert cc.activation == "batchtopk" and cc.k == 5 and cc.threshold is None
    assert any("estimates" in n for n in cc.extra["notes"]) and not cc.extra["warnings"]
    sd = torch.load(path, weights_only=True)
    x = inputs(g, 4, 12)
    pre = ref_crosscode(sd, "relu", x.reshape(-1, 2, 2, 12))  # relu of the pre-activations
    ranked = pre.reshape(-1).topk(5 * pre.shape[0] + 1).values  # batch-level top-k over these tokens, and one more
    cc.threshold = (ranked[-2] + ranked[-1]) / 2  # a cut-off between the last kept value and the next
    want = torch.where(pre >= ranked[-2], pre, 0.0)
    assert_encode_matches(cc, x, want)


# =========================================================================== SAELens


def write_saelens(folder: Path, g, arch="standard", *, d=16, F=32, dtype="fp32", version="6.5.0",
                  apply_b_dec=True, normalize="none", scaler: float | None = None, rescale=False) -> Path:
    """``cfg.json`` + ``sae_weights.safetensors`` as ``SAE.save_model`` writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    dt = DTYPES[dtype]
    sd = {"W_enc": rand(g, d, F, scale=1 / math.sqrt(d), dtype=dt), "W_dec": rand(g, F, d, scale=0.3, dtype=dt),
          "b_dec": rand(g, d, scale=0.3, dtype=dt)}
    if arch == "gated":
        sd.update(b_gate=rand(g, F, scale=0.5, dtype=dt), b_mag=rand(g, F, scale=0.5, dtype=dt),
                  r_mag=rand(g, F, scale=0.3, dtype=dt))
    else:
        sd["b_enc"] = rand(g, F, scale=0.4, dtype=dt)
    if arch == "jumprelu":
        sd["threshold"] = (torch.rand(F, generator=g) * 1.2).to(dt)
    if arch == "batchtopk":
        sd["topk_threshold"] = torch.tensor(0.6, dtype=torch.double)
    save_file(sd, str(folder / "sae_weights.safetensors"))
    cfg = {"d_in": d, "d_sae": F, "dtype": {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype],
           "device": "cpu", "apply_b_dec_to_input": apply_b_dec, "normalize_activations": normalize,
           "reshape_activations": "none"}
    meta = {"model_name": "gpt2-small", "hook_name": "blocks.8.hook_resid_pre", "hook_head_index": None,
            "prepend_bos": True, "context_size": 128, "sae_lens_version": version}
    if arch in ("topk", "batchtopk"):
        cfg["k"] = 6
        cfg["rescale_acts_by_decoder_norm"] = rescale
    if version.startswith("6"):
        cfg.update(architecture=arch, metadata=meta)
    else:  # before 6.0: flat, hook_point/hook_name at the top level, activation_fn_str
        cfg.update(meta)
        cfg["hook_point"] = cfg.pop("hook_name")
        cfg["activation_fn_str"] = "topk" if arch == "topk" else "relu"
        if arch == "topk":
            cfg["activation_fn_kwargs"] = {"k": cfg.pop("k")}
        if arch == "jumprelu":
            cfg["architecture"] = "jumprelu"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    (folder / "sparsity.safetensors").write_bytes(b"")  # written later by the trainer; never a checkpoint
    if scaler is not None:
        (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": scaler}))
    return folder / "sae_weights.safetensors"


def test_saelens_head_index_reads_one_head_of_hook_z(tmp_path):
    """``hook_head_index`` on hook_z becomes the site ``hook_z.headH``; on another hook (hook_q) it
    cannot be read: refused when loading for a build, a warning in ``atlas inspect``."""
    from atlas.checkpoints import describe_checkpoint

    g = torch.Generator().manual_seed(50)
    for hook, head in (("blocks.3.attn.hook_z", 5), ("blocks.3.hook_z", 0)):
        folder = tmp_path / hook
        write_saelens(folder, g, d=8)
        cfg = json.loads((folder / "cfg.json").read_text())
        cfg["metadata"].update(hook_name=hook, hook_head_index=head)
        (folder / "cfg.json").write_text(json.dumps(cfg))
        assert load_checkpoint(folder).sources[0].site == f"{hook}.head{head}"
    folder = tmp_path / "q"
    write_saelens(folder, g, d=8)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"].update(hook_name="blocks.3.attn.hook_q", hook_head_index=2)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(AtlasError, match="only hook_z heads"):
        load_checkpoint(folder)
    assert "only hook_z heads" in describe_checkpoint(folder)


def ref_saelens(arch: str, sd: dict, cfg: dict, x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """SAELens ``SAE.encode`` for each architecture on ``x[B, d]``."""
    sd = {k: F32(v) for k, v in sd.items()}
    if scale is not None:
        x = x * scale  # ActivationScaler.scale, applied before the SAE
    if cfg.get("normalize_activations") == "layer_norm":
        mu = x.mean(dim=-1, keepdim=True)
        x = x - mu
        x = x / (x.std(dim=-1, keepdim=True) + 1e-5)
    elif cfg.get("normalize_activations") == "constant_norm_rescale":
        x = x * (x.shape[-1] ** 0.5) / x.norm(dim=-1, keepdim=True)
    sae_in = x - sd["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    if arch == "gated":
        active = (sae_in @ sd["W_enc"] + sd["b_gate"] > 0).float()
        mag = torch.relu(sae_in @ (sd["W_enc"] * sd["r_mag"].exp()) + sd["b_mag"])
        return active * mag
    hidden_pre = sae_in @ sd["W_enc"] + sd["b_enc"]
    if arch == "standard":
        return torch.relu(hidden_pre)
    if arch == "jumprelu":
        return torch.relu(hidden_pre) * (hidden_pre > sd["threshold"])
    if cfg.get("rescale_acts_by_decoder_norm"):
        hidden_pre = hidden_pre * sd["W_dec"].norm(dim=-1)
    k = cfg.get("k") or cfg.get("activation_fn_kwargs", {}).get("k")
    if arch == "topk":
        vals, idx = torch.topk(hidden_pre, k=k, dim=-1, sorted=False)
        return torch.zeros_like(hidden_pre).scatter_(-1, idx, vals.relu())
    if arch == "batchtopk":  # the inference JumpReLU SAELens saves it as: threshold = topk_threshold
        acts = hidden_pre.relu()
        return acts * (hidden_pre > sd["topk_threshold"])
    raise ValueError(arch)


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk", "batchtopk", "gated"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_saelens_v6(tmp_path, arch, dtype):
    g = torch.Generator().manual_seed(50)
    path = write_saelens(tmp_path, g, arch, dtype=dtype, rescale=arch == "topk")
    cc = load_checkpoint(tmp_path)
    assert cc.path == str(path) and cc.format == "saelens"
    assert (cc.sources[0].model, cc.sources[0].site) == ("gpt2", "blocks.8.hook_resid_pre")
    from safetensors.torch import load_file

    sd = load_file(str(path))
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    x = inputs(g, 1, 16)
    assert_encode_matches(cc, x, ref_saelens(arch, sd, cfg, x[:, 0]))


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_saelens_pre_6(tmp_path, arch):
    g = torch.Generator().manual_seed(51)
    path = write_saelens(tmp_path, g, arch, version="3.12.0", apply_b_dec=False)
    cc = load_checkpoint(path)
    assert cc.sources[0].site == "blocks.8.hook_resid_pre"
    from safetensors.torch import load_file

    sd = load_file(str(path))
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    x = inputs(g, 1, 16)
    assert_encode_matches(cc, x, ref_saelens(arch, sd, cfg, x[:, 0]))


@pytest.mark.parametrize("normalize,scaler", [("expected_average_only_in", 0.37), ("expected_average_only_in", None),
                                              ("layer_norm", None), ("constant_norm_rescale", None)])
def test_saelens_normalisation(tmp_path, normalize, scaler):
    g = torch.Generator().manual_seed(52)
    path = write_saelens(tmp_path, g, "standard", normalize=normalize, scaler=scaler)
    from safetensors.torch import load_file

    sd = load_file(str(path))
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    x = inputs(g, 1, 16)
    if normalize == "expected_average_only_in" and scaler is None:
        cc = load_checkpoint(path)
        assert cc.input_scale is None  # estimated by the analysis
        cc = load_checkpoint(path, scale=[0.2])
        assert_encode_matches(cc, x, ref_saelens("standard", sd, cfg, x[:, 0], scale=0.2))
        return
    cc = load_checkpoint(path)
    assert_encode_matches(cc, x, ref_saelens("standard", sd, cfg, x[:, 0], scale=scaler))


def test_no_path_means_demo_checkpoint(tmp_path, monkeypatch):
    """``atlas build`` without a checkpoint loads the demo one: ckkissane format with model_names and
    input_scale in its cfg."""
    import atlas.demo

    g = torch.Generator().manual_seed(60)
    path = write_ckkissane(tmp_path, g, name="demo_crosscoder",
                           cfg_extra={"model_names": ["demo:smollm2", "demo:smollm2-python"], "input_scale": [0.1, 0.2],
                                      "hook_point": "blocks.12.hook_resid_post"})
    monkeypatch.setattr(atlas.demo, "default_checkpoint", lambda: path)
    cc = load_checkpoint(None)
    assert cc.path == str(path)
    assert [(s.model, s.site) for s in cc.sources] == [("demo:smollm2", "blocks.12.hook_resid_post"),
                                                        ("demo:smollm2-python", "blocks.12.hook_resid_post")]
    torch.testing.assert_close(cc.input_scale, torch.tensor([0.1, 0.2]))
