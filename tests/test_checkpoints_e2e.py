"""``atlas build`` runs from a checkpoint of every format on the tiny fixture models (slow)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from test_checkpoints_formats import write_crosscode, write_dl_crosscoder, write_dl_sae, write_neel_sae, write_saelens

from atlas.checkpoints import load_checkpoint
from atlas.cli import main

torch.set_num_threads(1)

pytestmark = pytest.mark.slow

D = 32  # width of the tiny models
BUILD_ARGS = ["-s", "8", "--seq-len", "32", "--batch-size", "4", "-n", "6", "--device", "cpu", "--top-k", "4"]


def build(capsys, tmp_path, world, *argv) -> dict:
    """Run ``atlas build`` and return the analysis manifest (what the analysis took from the checkpoint)."""
    site = tmp_path / "site"
    rc = main(["build", *map(str, argv), "-o", str(site), "--dataset", str(world.corpus_txt), *BUILD_ARGS])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert (site / "index.html").is_file()
    assert "Atlas written: 6 features" in out.out
    return json.loads((tmp_path / "site.atlas-data" / "manifest.json").read_text())


def sources(manifest: dict) -> list[tuple[str, str]]:
    return [(s["model"], s["site"]) for s in manifest["sources"]]


def assert_logit_effects_through(tmp_path, world, projection: str, directions: torch.Tensor) -> None:
    """The built atlas's top logit effects of the first 6 features equal a brute force: ``directions``
    (one row per feature, at the projection's input) carried into the residual stream by the GPT-2's
    module ``projection`` applied as a module (bias removed), then through ``ln_f``'s weight and ``lm_head``."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(world.gpt2_dir).eval()
    proj, norm = hf.get_submodule(projection), hf.transformer.ln_f
    with torch.inference_mode():
        resid = proj(directions) - proj(torch.zeros(1, directions.shape[1]))
        effects = (resid * norm.weight) @ hf.lm_head.weight.T  # [F, V]
        effects = effects - effects.mean(1, keepdim=True)  # centred over the vocabulary
    logits = np.load(tmp_path / "site.atlas-data" / "logits.npz")
    want = torch.topk(effects[:6], 4, dim=1)
    np.testing.assert_allclose(logits["top_vals"][:, 0, :4], want.values.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(logits["top_ids"][:, 0, :4], want.indices.numpy())


def test_build_ckkissane(tmp_path, capsys, tiny_world):
    m = build(capsys, tmp_path, tiny_world, tiny_world.crosscoder_ckpt, "--model", tiny_world.llama_chat_dir)
    assert m["checkpoint"]["format"] == "ckkissane" and m["checkpoint"]["input_scale_estimated"] is True
    assert sources(m) == [(str(tiny_world.llama_dir), "blocks.1.hook_resid_post"),
                          (str(tiny_world.llama_chat_dir), "blocks.1.hook_resid_post")]


def test_build_dictionary_learning_crosscoder(tmp_path, capsys, tiny_world):
    g = torch.Generator().manual_seed(1)
    write_dl_crosscoder(tmp_path / "cc", g, S=2, d=D, F=16, dtype="bf16", batchtopk=True, threshold=0.05,
                        normaliser=True, prefix="_orig_mod.", hub=True,
                        config={"model_names": [str(tiny_world.llama_dir), str(tiny_world.llama_chat_dir)], "layer": 1})
    cc = load_checkpoint(tmp_path / "cc")
    assert [s.model for s in cc.sources] == [str(tiny_world.llama_dir), str(tiny_world.llama_chat_dir)]
    m = build(capsys, tmp_path, tiny_world, tmp_path / "cc")
    assert m["checkpoint"]["format"] == "dictionary_learning" and m["checkpoint"]["activation"] == "batchtopk"
    assert m["checkpoint"]["input_scale_estimated"] is False
    assert m["checkpoint"]["input_scale"] == pytest.approx(cc.input_scale.tolist())


def test_build_dictionary_learning_sae(tmp_path, capsys, tiny_world):
    g = torch.Generator().manual_seed(2)
    write_dl_sae(tmp_path / "sae", g, "AutoEncoder", d=D, F=16,
                 trainer={"lm_name": str(tiny_world.gpt2_dir), "submodule_name": "resid_post_layer_1"})
    m = build(capsys, tmp_path, tiny_world, tmp_path / "sae" / "ae.pt")
    assert sources(m) == [(str(tiny_world.gpt2_dir), "blocks.1.hook_resid_post")]
    assert m["checkpoint"]["input_scale"] == [1.0] and m["checkpoint"]["input_scale_estimated"] is False


def test_build_crosscode(tmp_path, capsys, tiny_world):
    g = torch.Generator().manual_seed(3)
    run = tmp_path / "run"
    write_crosscode(run, g, M=1, P=2, d=D, F=16, activation="jumprelu",
                    hookpoints=["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"])
    exp = yaml.safe_load((run / "experiment_config.yaml").read_text())
    exp["data"]["activations_harvester"]["llms"] = [{"name": str(tiny_world.gpt2_dir)}]
    (run / "experiment_config.yaml").write_text(yaml.dump(exp))
    m = build(capsys, tmp_path, tiny_world, run)
    assert m["checkpoint"]["format"] == "crosscode" and m["checkpoint"]["activation"] == "jumprelu"
    assert sources(m) == [(str(tiny_world.gpt2_dir), "blocks.1.hook_resid_post"),
                          (str(tiny_world.gpt2_dir), "blocks.2.hook_resid_post")]


def test_build_saelens(tmp_path, capsys, tiny_world):
    g = torch.Generator().manual_seed(4)
    folder = tmp_path / "sae"
    write_saelens(folder, g, "jumprelu", d=D, F=16)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"].update(model_name=str(tiny_world.gpt2_dir), hook_name="blocks.1.hook_resid_post")
    (folder / "cfg.json").write_text(json.dumps(cfg))
    m = build(capsys, tmp_path, tiny_world, folder)
    assert m["checkpoint"]["format"] == "saelens" and m["checkpoint"]["input_scale_estimated"] is False
    assert sources(m) == [(str(tiny_world.gpt2_dir), "blocks.1.hook_resid_post")]


def test_build_saelens_hook_z(tmp_path, capsys, tiny_world):
    """An attention SAE on hook_z: it reads the heads' outputs, and its logit effects go through the
    attention's output projection (checked against the projection applied as a module)."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(6)
    folder = tmp_path / "sae"
    write_saelens(folder, g, "standard", d=D, F=16)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["reshape_activations"] = "hook_z"
    cfg["metadata"].update(model_name=str(tiny_world.gpt2_dir), hook_name="blocks.1.attn.hook_z")
    (folder / "cfg.json").write_text(json.dumps(cfg))
    m = build(capsys, tmp_path, tiny_world, folder)
    assert sources(m) == [(str(tiny_world.gpt2_dir), "blocks.1.attn.hook_z")]
    W_dec = load_file(str(folder / "sae_weights.safetensors"))["W_dec"].float()  # [F, d]
    assert_logit_effects_through(tmp_path, tiny_world, "transformer.h.1.attn.c_proj", W_dec)


def test_build_saelens_one_attention_head(tmp_path, capsys, tiny_world):
    """An SAE on one head of hook_z (SAELens ``hook_head_index``): it reads that head's d_head columns,
    and its logit effects go through that head's rows of the output projection."""
    from safetensors.torch import load_file

    d_head, head = D // 2, 1  # the tiny GPT-2 has 2 heads
    g = torch.Generator().manual_seed(7)
    folder = tmp_path / "sae"
    write_saelens(folder, g, "standard", d=d_head, F=16)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"].update(model_name=str(tiny_world.gpt2_dir), hook_name="blocks.1.attn.hook_z", hook_head_index=head)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    m = build(capsys, tmp_path, tiny_world, folder)
    assert sources(m) == [(str(tiny_world.gpt2_dir), "blocks.1.attn.hook_z.head1")]
    assert m["sources"][0]["d_model"] == d_head
    W_dec = load_file(str(folder / "sae_weights.safetensors"))["W_dec"].float()  # [F, d_head]
    z = torch.zeros(W_dec.shape[0], D)
    z[:, head * d_head:(head + 1) * d_head] = W_dec  # the directions placed in head 1 of hook_z
    assert_logit_effects_through(tmp_path, tiny_world, "transformer.h.1.attn.c_proj", z)


def test_build_neel_sae_on_mlp_neurons(tmp_path, capsys, tiny_world):
    """An SAE of Neel Nanda's 1L-Sparse-Autoencoder kind on MLP neurons (site ``post``): it reads the MLP's
    hidden activations, and its logit effects go through the MLP's output projection."""
    width = 4 * D  # the tiny GPT-2's MLP
    path = write_neel_sae(tmp_path / "sae", torch.Generator().manual_seed(9),
                          {"model_name": str(tiny_world.gpt2_dir), "site": "post", "layer": 1}, d=width, F=16)
    m = build(capsys, tmp_path, tiny_world, path)
    assert m["checkpoint"]["format"] == "ckkissane"
    assert sources(m) == [(str(tiny_world.gpt2_dir), "blocks.1.mlp.hook_post")]
    W_dec = torch.load(path, weights_only=True)["W_dec"].float()  # [F, 4d]
    assert_logit_effects_through(tmp_path, tiny_world, "transformer.h.1.mlp.c_proj", W_dec)
