"""atlas.models: loading, hook resolution, extraction against plain forward hooks, unembeddings."""

from __future__ import annotations

import pytest
import torch
from factory import calibration_tokens, resid_post
from transformers import AutoModelForCausalLM, AutoTokenizer

from atlas.crosscoder import Crosscoder, Source
from atlas.errors import AtlasError
from atlas.models import _check_same_vocab, load_models, pick_device

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokens(tiny_tokenizer_dir):
    return calibration_tokens(AutoTokenizer.from_pretrained(tiny_tokenizer_dir), seq_len=24, n=3)


def _hf(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_pick_device_defaults_and_errors():
    assert pick_device("cpu", None) == (CPU, torch.float32)
    assert pick_device("cpu", "bfloat16") == (CPU, torch.bfloat16)
    if not torch.cuda.is_available():
        assert pick_device(None, None) == (CPU, torch.float32)
        with pytest.raises(AtlasError, match="--device cpu"):
            pick_device("cuda", None)
    with pytest.raises(AtlasError, match="--dtype"):
        pick_device("cpu", "float8")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_resid_post_matches_forward_hook(tiny_world, tokens, family):
    path = str(getattr(tiny_world, f"{family}_dir"))
    ms = load_models([Source(path, "blocks.1.hook_resid_post")], CPU, torch.float32)
    x = ms.extract(tokens, torch.ones_like(tokens))
    assert x.shape == (3, 24, 1, 32)
    torch.testing.assert_close(x[:, :, 0], resid_post(_hf(path), tokens, 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family,blocks", [("gpt2", "transformer.h"), ("llama", "model.layers")])
def test_hook_names_are_consistent(tiny_world, tokens, family, blocks):
    path = str(getattr(tiny_world, f"{family}_dir"))
    sites = ["blocks.2.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.hook_attn_out",
             "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post",
             f"{blocks}.1", f"{blocks}.2.input", "blocks.0.hook_resid_post"]
    ms = load_models([Source(path, s) for s in sites], CPU, torch.float32)
    assert len(ms.models) == 1  # one model read at many sites
    x = ms.extract(tokens)
    post2, pre1, attn1, mid1, mlp1, post1, mod1, in2, post0 = x.unbind(2)
    torch.testing.assert_close(pre1, post0)
    torch.testing.assert_close(pre1 + attn1, mid1)
    torch.testing.assert_close(mid1 + mlp1, post1)
    torch.testing.assert_close(mod1, post1)
    torch.testing.assert_close(in2, post1)
    torch.testing.assert_close(post2, resid_post(_hf(path), tokens, 2))


def test_two_models_source_order(tiny_world, tokens):
    a, b = str(tiny_world.llama_dir), str(tiny_world.llama_chat_dir)
    ms = load_models([Source(b, "blocks.1.hook_resid_post"), Source(a, "blocks.1.hook_resid_post")],
                     CPU, torch.float32)
    x = ms.extract(tokens)
    assert x.shape == (3, 24, 2, 32) and len(ms.models) == 2
    torch.testing.assert_close(x[:, :, 0], resid_post(_hf(b), tokens, 1))
    torch.testing.assert_close(x[:, :, 1], resid_post(_hf(a), tokens, 1))
    assert not torch.allclose(x[:, :, 0], x[:, :, 1])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_activations_do_not_depend_on_batch(tiny_world, family):
    path = str(getattr(tiny_world, f"{family}_dir"))
    tok = AutoTokenizer.from_pretrained(tiny_world.tokenizer_dir)
    rows = calibration_tokens(tok, seq_len=20, n=5)
    ms = load_models([Source(path, "blocks.2.hook_resid_post")], CPU, torch.float32)
    alone = ms.extract(rows[2:3])
    for batch in (rows, rows.flip(0), rows[[2, 0]]):
        where = int((batch == rows[2]).all(1).nonzero()[0])
        torch.testing.assert_close(ms.extract(batch)[where:where + 1], alone, rtol=1e-5, atol=1e-5)


def test_unknown_hooks_name_the_option(tiny_world):
    path = str(tiny_world.llama_dir)
    with pytest.raises(AtlasError, match="--hook-point") as err:
        load_models([Source(path, "blocks.1.hook_nonsense")], CPU, torch.float32)
    assert "blocks.6.hook_resid_post" in str(err.value)
    with pytest.raises(AtlasError, match="3 layers"):
        load_models([Source(path, "blocks.7.hook_resid_post")], CPU, torch.float32)
    with pytest.raises(AtlasError, match="--hook-point"):
        load_models([Source(path, "model.layers.9")], CPU, torch.float32)


def _crosscoder(S, d, F=8):
    return Crosscoder(W_enc=torch.zeros(S, d, F), W_dec=torch.zeros(F, S, d), b_enc=torch.zeros(F),
                      b_dec=torch.zeros(S, d), sources=[])


def test_check_compatible(tiny_world):
    ms = load_models([Source(str(tiny_world.gpt2_dir), "blocks.1.hook_resid_post")], CPU, torch.float32)
    ms.check_compatible(_crosscoder(1, 32))
    with pytest.raises(AtlasError, match="d_in=64.*--hook-point"):
        ms.check_compatible(_crosscoder(1, 64))
    with pytest.raises(AtlasError, match="--model"):
        ms.check_compatible(_crosscoder(2, 32))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_unembedding_folds_final_norm(tiny_world, family):
    """(normalised h) @ U must equal lm_head(final_norm(h)) up to the norm's bias term."""
    path = str(getattr(tiny_world, f"{family}_dir"))
    ms = load_models([Source(path, "blocks.1.hook_resid_post")], CPU, torch.float32)
    (U,) = ms.unembeddings()
    hf = ms.hf_models[path]
    assert U.shape == (32, 512)
    h = torch.randn(7, 32, generator=torch.Generator().manual_seed(0)) * 3
    with torch.inference_mode():
        if family == "gpt2":
            norm = hf.transformer.ln_f
            want = hf.lm_head(norm(h)) - hf.lm_head(norm.bias[None])
            z = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + norm.eps)
        else:
            want = hf.lm_head(hf.model.norm(h))
            z = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + hf.model.norm.variance_epsilon)
    torch.testing.assert_close(z @ U, want, rtol=1e-4, atol=1e-4)
    # lm_head is untied here: the embedding would give a different answer
    assert not torch.allclose(U, hf.get_input_embeddings().weight.T)


PROJECTION = {("gpt2", "z"): "transformer.h.1.attn.c_proj", ("llama", "z"): "model.layers.1.self_attn.o_proj",
              ("gpt2", "post"): "transformer.h.1.mlp.c_proj", ("llama", "post"): "model.layers.1.mlp.down_proj"}
# each site read before an output projection, and the hook where that projection's output is read
BEFORE_PROJECTION = {"blocks.1.attn.hook_z": ("z", "blocks.1.hook_attn_out"),
                     "blocks.1.hook_z": ("z", "blocks.1.hook_attn_out"),
                     "blocks.1.mlp.hook_post": ("post", "blocks.1.hook_mlp_out")}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("hook", list(BEFORE_PROJECTION))
def test_sites_before_an_output_projection(tiny_world, tokens, family, hook):
    """hook_z / mlp.hook_post are what the attention's / MLP's output projection receives; projected,
    they are hook_attn_out / hook_mlp_out."""
    kind, after = BEFORE_PROJECTION[hook]
    path = str(getattr(tiny_world, f"{family}_dir"))
    x = load_models([Source(path, hook)], CPU, torch.float32).extract(tokens)[:, :, 0]
    out = load_models([Source(path, after)], CPU, torch.float32).extract(tokens)[:, :, 0]
    hf = _hf(path)
    seen = []
    proj = hf.get_submodule(PROJECTION[family, kind])
    handle = proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.inference_mode():
        hf(input_ids=tokens, attention_mask=torch.ones_like(tokens))
    handle.remove()
    torch.testing.assert_close(x, seen[0], rtol=0, atol=1e-6)
    with torch.inference_mode():
        torch.testing.assert_close(proj(x), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("hook", ["blocks.1.attn.hook_z", "blocks.1.mlp.hook_post"])
def test_logit_effects_go_through_the_output_projection(tiny_world, family, hook):
    """U of a source before an output projection = (what the projection makes of each basis vector, bias
    removed) @ U of the residual stream, the projection applied as a module, not read off its weight."""
    path = str(getattr(tiny_world, f"{family}_dir"))
    ms = load_models([Source(path, hook)], CPU, torch.float32)
    (U_site,) = ms.unembeddings()
    (U_resid,) = load_models([Source(path, "blocks.1.hook_resid_post")], CPU, torch.float32).unembeddings()
    width = ms.widths[0]
    proj = ms.hf_models[path].get_submodule(PROJECTION[family, BEFORE_PROJECTION[hook][0]])
    with torch.inference_mode():
        basis = proj(torch.eye(width)) - proj(torch.zeros(1, width))  # row i: where e_i lands
    assert U_site.shape == (width, U_resid.shape[1])
    torch.testing.assert_close(U_site, basis @ U_resid, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, n_heads", [("gpt2", 2), ("llama", 4)])  # the Llama has grouped KV heads
def test_one_head_of_hook_z(tiny_world, tokens, family, n_heads):
    """``hook_z.headH`` is head H's d_head columns of hook_z (heads flattened head-major), and its
    unembedding is the matching rows of hook_z's; a head past the last names the count."""
    path = str(getattr(tiny_world, f"{family}_dir"))
    whole = load_models([Source(path, "blocks.1.attn.hook_z")], CPU, torch.float32)
    d_head = whole.widths[0] // n_heads
    for head in (0, n_heads - 1):
        ms = load_models([Source(path, f"blocks.1.attn.hook_z.head{head}")], CPU, torch.float32)
        assert ms.widths == [d_head]
        cols = slice(head * d_head, (head + 1) * d_head)
        torch.testing.assert_close(ms.extract(tokens), whole.extract(tokens)[..., cols], rtol=0, atol=0)
        torch.testing.assert_close(ms.unembeddings()[0], whole.unembeddings()[0][cols], rtol=0, atol=0)
    with pytest.raises(AtlasError, match=f"{n_heads} heads"):
        load_models([Source(path, f"blocks.1.hook_z.head{n_heads}")], CPU, torch.float32)


def test_hook_z_of_a_model_without_attention_projection_names_the_option(tiny_world, monkeypatch):
    import atlas.models as models

    monkeypatch.setattr(models, "_OUT_PROJECTIONS", ("nope",))
    with pytest.raises(AtlasError, match="--hook-point"):
        load_models([Source(str(tiny_world.llama_dir), "blocks.1.attn.hook_z")], CPU, torch.float32)


def test_vocab_shows_leading_spaces(tiny_world):
    ms = load_models([Source(str(tiny_world.llama_dir), "blocks.1.hook_resid_post")], CPU, torch.float32)
    vocab = ms.vocab()
    assert len(vocab) == 512 and vocab[ms.bos_token_id] == "<bos>"
    pieces = ms.tokenizer.convert_ids_to_tokens(list(range(512)))
    spaced = [i for i, t in enumerate(pieces) if t.startswith("Ġ") and len(t) > 1]
    assert spaced and all(vocab[i].startswith(" ") for i in spaced)
    assert ms.tokenizer.decode(ms.tokenizer("x = 1 if y")["input_ids"]) == "".join(
        vocab[i] for i in ms.tokenizer("x = 1 if y")["input_ids"])


def test_tokenizer_agreement(tiny_world):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = AutoTokenizer.from_pretrained(tiny_world.tokenizer_dir)
    extended = AutoTokenizer.from_pretrained(tiny_world.tokenizer_dir)
    extended.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})  # a chat model's extra token
    assert _check_same_vocab({"a": base, "b": extended}) is extended

    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.train_from_iterator(["zyx wvu " * 50], trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"],
                                                                      show_progress=False))
    other = PreTrainedTokenizerFast(tokenizer_object=other, bos_token="<s>")
    with pytest.raises(AtlasError, match="different tokenizers"):
        _check_same_vocab({"a": base, "b": other})


def test_missing_models_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AtlasError, match="local path"):
        load_models([Source("someone/not-a-cached-model", "blocks.0.hook_resid_post")], CPU, torch.float32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AtlasError, match="save_pretrained"):
        load_models([Source(str(tmp_path / "empty"), "blocks.0.hook_resid_post")], CPU, torch.float32)


def test_demo_specs_go_through_atlas_demo(tiny_world, monkeypatch):
    import atlas.demo

    calls = []

    def resolve_model(spec, device, dtype):
        calls.append((spec, device, dtype))
        return _hf(tiny_world.llama_dir), AutoTokenizer.from_pretrained(tiny_world.llama_dir)

    monkeypatch.setattr(atlas.demo, "resolve_model", resolve_model, raising=False)
    ms = load_models([Source("demo:tiny", "blocks.0.hook_resid_post")], CPU, torch.float32)
    assert calls == [("demo:tiny", CPU, torch.float32)] and ms.widths == [32]


def test_models_stay_on_the_asked_device_when_cuda_exists(tiny_world, tokens, monkeypatch):
    """transformers' pipeline, which NNsight wraps each model in, defaults to cuda:0 whenever CUDA is
    present; --device cpu (or a torchrun rank's cuda:N) must hold anyway. CUDA is faked here: a move to
    cuda:0 fails on this CPU-only torch ("not compiled with CUDA")."""
    import transformers.pipelines.base as pipeline_base

    monkeypatch.setattr(pipeline_base, "is_torch_cuda_available", lambda: True)
    path = str(tiny_world.llama_dir)
    models = load_models([Source(path, "blocks.1.hook_resid_post")], CPU, torch.float32)
    assert {p.device for p in models.hf_models[path].parameters()} == {CPU}
    x = models.extract(tokens)
    torch.testing.assert_close(x[:, :, 0], resid_post(_hf(path), tokens, 1))
