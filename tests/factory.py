"""Deterministic tiny test material: tokenizer, models, corpus and crosscoder checkpoints.

Everything is built offline in a few seconds from a fixed seed (same seed → identical files), from the
standard library's ``pydoc_data.topics`` text. Use it through the session-scoped pytest fixtures of
``tests/conftest.py``:

``tiny_world`` (:class:`TinyWorld`)
    every path below, built once per test session under ``tmp_path_factory``.
``tiny_tokenizer_dir``
    a byte-level BPE tokenizer (vocab 512, special tokens ``<bos>`` id 0, ``<eos>`` id 1, no pad token),
    saved as a ``PreTrainedTokenizerFast``. It does not add BOS by itself (GPT-2 style).
``tiny_gpt2_dir``
    random-weight GPT-2 (3 layers, d=32, 2 heads, n_positions=256, untied lm_head), saved with
    ``save_pretrained`` together with the tokenizer.
``tiny_llama_dir`` / ``tiny_llama_chat_dir``
    random-weight Llama (3 layers, d=32, 4 heads, 2 kv heads, untied lm_head, final RMSNorm weight not
    all ones) and a "fine-tuned" copy of it (weights perturbed), both with the tokenizer. Same tokenizer
    and width, so a two-model crosscoder reads both.
``tiny_corpus_txt`` / ``tiny_corpus_jsonl``
    the same ~60 KB of text as a ``.txt`` (one paragraph per line) and as ``.jsonl`` (``{"text": ...}``
    per line, one document per topic).
``tiny_sae_ckpt``
    ckkissane-format SAE (S=1) on ``tiny_gpt2_dir`` at ``blocks.1.hook_resid_post``: ``sae.pt``
    (state dict ``W_enc[1,32,F]``, ``W_dec[F,1,32]``, ``b_enc[F]``, ``b_dec[1,32]``) + ``sae_cfg.json``
    (``d_in, dict_size, model_name, hook_point, site, seq_len, enc_dtype``); F = 48.
``tiny_crosscoder_ckpt``
    ckkissane-format two-model crosscoder (S=2) on ``tiny_llama_dir`` and ``tiny_llama_chat_dir`` at
    ``blocks.1.hook_resid_post`` (``crosscoder.pt`` + ``crosscoder_cfg.json``; F = 64). As in the real
    format, the cfg names only the first model; the second model's path is in ``TinyWorld``.
    Features come in kinds: shared (same decoder in both models), model-A-only, model-B-only (decoder
    of the other source ~0.05× as long); feature 0 is dead (never fires).

Encoder biases are calibrated on the corpus (with inputs scaled by ``sqrt(d) / mean‖x‖``, the scale the
analysis estimates when the checkpoint has none) so that live features fire on roughly 0.5%–30% of
tokens: not all dead, not all dense.

:func:`crosscoder_from_ckkissane` turns a checkpoint of this factory into an
:class:`atlas.crosscoder.Crosscoder` without going through ``atlas.checkpoints``.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

SEED = 0
VOCAB_SIZE = 512
D_MODEL = 32
N_LAYERS = 3
HOOK_POINT = "blocks.1.hook_resid_post"
SAE_FEATURES = 48
CROSSCODER_FEATURES = 64


@dataclass(frozen=True)
class TinyWorld:
    """Paths of everything :func:`build_tiny_world` writes (see the module docstring)."""

    root: Path
    tokenizer_dir: Path
    gpt2_dir: Path
    llama_dir: Path
    llama_chat_dir: Path
    corpus_txt: Path
    corpus_jsonl: Path
    sae_ckpt: Path
    crosscoder_ckpt: Path
    hook_point: str = HOOK_POINT


# --------------------------------------------------------------------------- text


def corpus_documents(max_chars: int = 60_000) -> list[str]:
    """Deterministic documents from ``pydoc_data.topics`` (sorted topics, up to ``max_chars``)."""
    from pydoc_data.topics import topics

    docs, total = [], 0
    for name in sorted(topics):
        text = " ".join(topics[name].split())  # one line per document
        if total + len(text) > max_chars:
            text = text[: max_chars - total]
        if text:
            docs.append(text)
            total += len(text)
        if total >= max_chars:
            break
    return docs


def write_corpus(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    docs = corpus_documents()
    txt, jsonl = folder / "corpus.txt", folder / "corpus.jsonl"
    txt.write_text("\n".join(docs) + "\n", encoding="utf-8")
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return txt, jsonl


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(folder: Path, vocab_size: int = VOCAB_SIZE):
    """Train a byte-level BPE on ``pydoc_data.topics`` and save it as a ``PreTrainedTokenizerFast``."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")
    fast.save_pretrained(folder)
    return fast


# --------------------------------------------------------------------------- models


def _seeded(seed: int):
    torch.manual_seed(seed)


def build_gpt2(folder: Path, tokenizer, seed: int = SEED + 1):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=len(tokenizer), n_positions=256, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        _seeded(seed)
        model = GPT2LMHeadModel(cfg).eval()
        with torch.no_grad():  # a final norm with a non-trivial weight
            model.transformer.ln_f.weight.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def build_llama(folder: Path, tokenizer, seed: int = SEED + 2, perturb_from=None, perturb: float = 0.3):
    """A tiny Llama; with ``perturb_from`` a copy of that model with weights moved by ``perturb``×std."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=D_MODEL, intermediate_size=2 * D_MODEL,
        num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        _seeded(seed)
        model = LlamaForCausalLM(cfg).eval()
        with torch.no_grad():
            if perturb_from is not None:
                model.load_state_dict(perturb_from.state_dict())
                for p in model.parameters():
                    if p.ndim >= 2:
                        p.add_(torch.randn_like(p) * p.std() * perturb)
            model.model.norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def _block(model, layer: int):
    if hasattr(model, "transformer"):
        return model.transformer.h[layer]
    return model.model.layers[layer]


def resid_post(model, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Output of block ``layer`` (``[B, T, d]``) by a plain forward hook: the reference for tests."""
    seen = {}

    def hook(_module, _inputs, output):
        seen["x"] = output if isinstance(output, torch.Tensor) else output[0]

    handle = _block(model, layer).register_forward_hook(hook)
    try:
        with torch.inference_mode():
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    finally:
        handle.remove()
    return seen["x"].float()


def calibration_tokens(tokenizer, seq_len: int = 64, n: int = 24) -> torch.Tensor:
    """BOS + corpus tokens cut into ``n`` sequences of ``seq_len`` (for bias calibration)."""
    ids = []
    for doc in corpus_documents():
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
    body = seq_len - 1
    rows = [[tokenizer.bos_token_id] + ids[i * body:(i + 1) * body] for i in range(n)]
    return torch.tensor(rows, dtype=torch.long)


# --------------------------------------------------------------------------- crosscoders


def _crosscoder_weights(acts: torch.Tensor, n_features: int, seed: int, kinds: list[str] | None = None):
    """Random crosscoder weights with encoder biases calibrated on ``acts[N, S, d]`` (scaled inputs).

    Feature f's bias puts its firing rate at a quantile spread log-uniformly in [0.5%, 30%]; feature 0
    gets a bias that keeps it dead.
    """
    n_tok, S, d = acts.shape
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(S, d, n_features, generator=g) / math.sqrt(S * d)
    W_dec = torch.randn(n_features, S, d, generator=g) / math.sqrt(d)
    if kinds is not None:
        for f, kind in enumerate(kinds):
            if kind == "shared":
                W_dec[f, 1] = W_dec[f, 0]
            elif kind == "a_only":
                W_dec[f, 1] *= 0.05
            elif kind == "b_only":
                W_dec[f, 0] *= 0.05
    pre = torch.einsum("nsd,sdf->nf", acts, W_enc)
    rates = torch.logspace(math.log10(0.005), math.log10(0.3), n_features)
    rates = rates[torch.randperm(n_features, generator=g)]
    b_enc = torch.empty(n_features)
    for f in range(n_features):
        b_enc[f] = -torch.quantile(pre[:, f], 1 - rates[f].item())
    b_enc[0] = -(pre[:, 0].max() + 10.0)
    b_dec = torch.zeros(S, d)
    return {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}


def _scaled(x: torch.Tensor) -> torch.Tensor:
    """``x[N, d]`` scaled by ``sqrt(d) / mean‖x‖``."""
    return x * (math.sqrt(x.shape[-1]) / x.norm(dim=-1).mean())


def _save_ckkissane(path: Path, weights: dict, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in weights.items()}, path)
    path.with_name(path.stem + "_cfg.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return path


def _cfg(model_name: str, n_features: int, seq_len: int) -> dict:
    return {
        "d_in": D_MODEL, "dict_size": n_features, "model_name": model_name, "hook_point": HOOK_POINT,
        "site": "resid_post", "layer": 1, "seq_len": seq_len, "enc_dtype": "fp32", "seed": SEED,
        "batch_size": 4096, "lr": 5e-5, "l1_coeff": 2, "dec_init_norm": 0.08,
    }


def build_tiny_world(root: Path) -> TinyWorld:
    """Write every piece of test material under ``root`` (deterministic; a few seconds)."""
    root = Path(root)
    tok_dir = root / "tokenizer"
    tokenizer = build_tokenizer(tok_dir)
    gpt2 = build_gpt2(root / "gpt2", tokenizer)
    llama = build_llama(root / "llama", tokenizer)
    llama_chat = build_llama(root / "llama-chat", tokenizer, seed=SEED + 3, perturb_from=llama)
    txt, jsonl = write_corpus(root / "corpus")

    calib = calibration_tokens(tokenizer)
    layer = 1
    x_g = resid_post(gpt2, calib, layer)[:, 1:].reshape(-1, D_MODEL)
    sae = _crosscoder_weights(_scaled(x_g)[:, None], SAE_FEATURES, seed=SEED + 10)
    sae_path = _save_ckkissane(root / "sae" / "sae.pt", sae, _cfg(str(root / "gpt2"), SAE_FEATURES, 64))

    xa = resid_post(llama, calib, layer)[:, 1:].reshape(-1, D_MODEL)
    xb = resid_post(llama_chat, calib, layer)[:, 1:].reshape(-1, D_MODEL)
    acts = torch.stack([_scaled(xa), _scaled(xb)], dim=1)
    kinds = [("shared", "a_only", "b_only", "shared")[f % 4] for f in range(CROSSCODER_FEATURES)]
    cc = _crosscoder_weights(acts, CROSSCODER_FEATURES, seed=SEED + 11, kinds=kinds)
    cc_path = _save_ckkissane(root / "crosscoder" / "crosscoder.pt", cc,
                              _cfg(str(root / "llama"), CROSSCODER_FEATURES, 64))
    return TinyWorld(root=root, tokenizer_dir=tok_dir, gpt2_dir=root / "gpt2", llama_dir=root / "llama",
                     llama_chat_dir=root / "llama-chat", corpus_txt=txt, corpus_jsonl=jsonl,
                     sae_ckpt=sae_path, crosscoder_ckpt=cc_path)


def crosscoder_from_ckkissane(path: Path, models: list[str | Path], hook_point: str = HOOK_POINT,
                              input_scale: torch.Tensor | None = None):
    """Load a checkpoint written by this factory as a canonical ``Crosscoder`` (one model per source)."""
    from atlas.crosscoder import Crosscoder, Source

    sd = torch.load(path, map_location="cpu", weights_only=True)
    return Crosscoder(
        W_enc=sd["W_enc"].float(), W_dec=sd["W_dec"].float(), b_enc=sd["b_enc"].float(),
        b_dec=sd["b_dec"].float(), sources=[Source(str(m), hook_point) for m in models],
        activation="relu", input_scale=input_scale, format="ckkissane", path=str(path),
    )


def small_analysis_options():
    """Analysis options sized for the tiny world (few examples, short windows, no progress bar)."""
    from atlas.analyze import AnalysisOptions

    return AnalysisOptions(n_features=0, batch_size=5, top_k=5, seed=3, dataset="tiny", n_intervals=4,
                           interval_k=3, window_before=4, window_after=2, logit_k=6, logit_hist_bins=9,
                           n_neighbours=3, scale_batches=2, progress=False)


@contextlib.contextmanager
def interrupted_at_update(monkeypatch, n: int, after: bool = False):
    """Inside the block, the ``n``-th call of ``FeatureSummaries.update`` raises KeyboardInterrupt (Ctrl-C
    in the middle of that batch): before changing the summaries, or ``after`` changing them."""
    from atlas.stats import FeatureSummaries

    real_update, calls = FeatureSummaries.update, []

    def update(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            if after:
                real_update(self, *args, **kwargs)
            raise KeyboardInterrupt
        return real_update(self, *args, **kwargs)

    monkeypatch.setattr(FeatureSummaries, "update", update)
    try:
        yield
    finally:
        monkeypatch.setattr(FeatureSummaries, "update", real_update)
