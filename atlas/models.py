"""Language models through NNsight: loading, hook-name resolution, activation extraction, unembeddings.

Every NNsight call of the project lives in this module. Readers: :mod:`atlas.build` (``pick_device``,
``load_models``), :mod:`atlas.analyze` (``ModelSet.extract``, ``ModelSet.unembeddings``,
``ModelSet.vocab``) and :mod:`atlas.corpus` (``ModelSet.tokenizer``).

Hook names (a crosscoder source's ``site``):

- TransformerLens style ``blocks.L.hook_X``: ``resid_pre`` (input of block L), ``resid_post`` (output
  of block L), ``resid_mid`` (the residual stream between attention and MLP, where the architecture has
  one), ``attn_out`` / ``mlp_out`` (output of the block's attention / MLP module), and
  ``blocks.L.attn.hook_z`` (or ``blocks.L.hook_z``): the attention heads' outputs before the output
  projection, flattened over heads (``[n_heads × d_head]``, head-major, as TransformerLens flattens
  ``hook_z``), read as the input of that projection (``o_proj``, ``c_proj``, ``out_proj`` or ``dense``);
  ``blocks.L.attn.hook_z.headH`` reads head H's ``d_head`` columns of it (SAELens ``hook_head_index``).
  A decoder direction there reaches the residual stream through the projection, so the logit effects of
  such a source go through it (:meth:`ModelSet.unembeddings`).
- ``blocks.L.mlp.hook_post``: the MLP's hidden activations (after the nonlinearity, and the gate where
  there is one), read as the input of its output projection (``down_proj``, ``c_proj``,
  ``dense_4h_to_h``, ``fc2``), whose weights likewise carry the logit effects.
- An explicit module path of the Hugging Face model (``model.layers.3``, ``transformer.h.2.mlp``):
  its output; append ``.input`` to read its (first positional) input instead.

Blocks are found at ``transformer.h`` (GPT-2, GPT-J), ``gpt_neox.layers`` (GPT-NeoX/Pythia),
``model.layers`` (Llama, Mistral, Qwen, Gemma, SmolLM2, ...), ``model.decoder.layers`` (OPT), or else
at the model's only ``ModuleList`` as long as ``config.num_hidden_layers``.

A module's output may be a tensor (decoder blocks under transformers ≥ 5) or a tuple whose first element
is the hidden states (attention modules): the type is checked, and the value must be ``[B, T, d]``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from .errors import AtlasError

HOOK_PATTERN = re.compile(
    r"^blocks\.(\d+)\.(?:hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)|(?:attn\.)?hook_(z)(?:\.head(\d+))?"
    r"|mlp\.hook_(post))$")
HOOK_EXAMPLES = ("blocks.6.hook_resid_post, blocks.6.hook_resid_pre, blocks.6.hook_mlp_out, blocks.6.attn.hook_z, "
                 "model.layers.6")

# block list path → names of the attention module, the MLP module and the module whose input is resid_mid
_FAMILIES = {
    "transformer.h": ("attn", "mlp", ("ln_2",)),
    "gpt_neox.layers": ("attention", "mlp", ()),  # parallel residual: no resid_mid
    "model.layers": ("self_attn", "mlp", ("pre_feedforward_layernorm", "post_attention_layernorm")),
    "model.language_model.layers": ("self_attn", "mlp", ("pre_feedforward_layernorm",
                                                         "post_attention_layernorm")),
    "model.decoder.layers": ("self_attn", None, ("final_layer_norm",)),
}
# the attention's output projection (heads' outputs → residual stream), by family
_OUT_PROJECTIONS = ("o_proj", "c_proj", "out_proj", "dense")
# the MLP's output projection (hidden activations → residual stream), under the MLP module or, where the
# family has none (OPT), under the block
_DOWN_PROJECTIONS = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "fc_out")
_FINAL_NORMS = ("transformer.ln_f", "gpt_neox.final_layer_norm", "model.norm", "model.language_model.norm",
                "model.decoder.final_layer_norm")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype to run on: cuda when available else cpu; bfloat16 on cuda, else float32."""
    if device is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise AtlasError(f"unknown device {device!r}: pass --device cpu, cuda or cuda:N") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise AtlasError(f"--device {device} was asked for but CUDA is not available here: "
                             "pass --device cpu (or leave --device out)")
    if dtype is None:
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif dtype in _DTYPES:
        dt = _DTYPES[dtype]
    else:
        raise AtlasError(f"unknown dtype {dtype!r}: pass --dtype float32, float16 or bfloat16")
    return dev, dt


# --------------------------------------------------------------------------- hook resolution


@dataclass(frozen=True)
class ResolvedSite:
    """Where a source's activation is read: ``port`` (``input``/``output``) of the module at ``module_path``.

    ``to_residual``: for a site outside the residual stream's space (``hook_z``, ``mlp.hook_post``), the
    module path of the linear map that carries it there (the attention's or MLP's output projection);
    None for the others, whose activations are added to the residual stream as they are. ``columns``:
    the part of that value a source reads, for one attention head's ``hook_z`` (``[h·d_head, (h+1)·d_head)``).
    """

    hook: str
    module_path: str
    port: str
    to_residual: str | None = None
    columns: tuple[int, int] | None = None  # [lo, hi) of the value's last dim read (one head of hook_z)


def _has_module(model: torch.nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def find_blocks(model: torch.nn.Module) -> str:
    """Path of the model's list of decoder blocks (see the module docstring)."""
    for path in _FAMILIES:
        if _has_module(model, path) and isinstance(model.get_submodule(path), torch.nn.ModuleList):
            return path
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [name for name, m in model.named_modules()
                  if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers]
    if len(candidates) == 1:
        return candidates[0]
    raise AtlasError(
        f"cannot find the decoder blocks of {type(model).__name__}: give an explicit module path as "
        f"--hook-point (one of: {', '.join(_module_path_examples(model))})"
    )


def _head_columns(model: torch.nn.Module, projection: str, head: int, hook: str) -> tuple[int, int]:
    """Columns ``[head·d_head, (head+1)·d_head)`` of the attention output projection's input (heads flattened
    head-major), with the number of heads from the model's config."""
    cfg = getattr(model, "config", None)
    n_heads = next((getattr(cfg, k) for k in ("num_attention_heads", "n_head", "num_heads")
                    if isinstance(getattr(cfg, k, None), int)), None)
    width = _into_residual(model.get_submodule(projection), projection).shape[0]
    if not n_heads or width % n_heads:
        raise AtlasError(f"{hook}: cannot tell the attention heads of {type(model).__name__} apart (heads: "
                         f"{n_heads}, projection input: {width}): pass --hook-point with the whole hook_z")
    if head >= n_heads:
        raise AtlasError(f"hook point {hook!r} names head {head} but the model has {n_heads} heads "
                         f"(0..{n_heads - 1}): pass another --hook-point")
    d_head = width // n_heads
    return head * d_head, (head + 1) * d_head


def _module_path_examples(model: torch.nn.Module, n: int = 5) -> list[str]:
    lists = [name for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
    return [f"{name}.0" for name in lists[:n]] or ["model.layers.0"]


def resolve_hook(model: torch.nn.Module, hook: str) -> ResolvedSite:
    """Map a hook name (TransformerLens style or module path) onto a module of ``model``."""
    m = HOOK_PATTERN.match(hook)
    if m:
        layer, kind = int(m.group(1)), m.group(2) or m.group(3) or m.group(5)
        blocks = find_blocks(model)
        n = len(model.get_submodule(blocks))
        if layer >= n:
            raise AtlasError(f"hook point {hook!r} names layer {layer} but the model has {n} layers "
                             f"(0..{n - 1}): pass another --hook-point, or the --model the crosscoder was trained on")
        block = f"{blocks}.{layer}"
        attn, mlp, mids = _FAMILIES.get(blocks, ("self_attn", "mlp", ()))
        if kind == "resid_post":
            return ResolvedSite(hook, block, "output")
        if kind == "resid_pre":
            return ResolvedSite(hook, block, "input")
        if kind == "attn_out" and attn and _has_module(model, f"{block}.{attn}"):
            return ResolvedSite(hook, f"{block}.{attn}", "output")
        if kind == "mlp_out" and mlp and _has_module(model, f"{block}.{mlp}"):
            return ResolvedSite(hook, f"{block}.{mlp}", "output")
        if kind == "z" and attn:
            for proj in _OUT_PROJECTIONS:
                path = f"{block}.{attn}.{proj}"
                if _has_module(model, path):
                    columns = None if m.group(4) is None else _head_columns(model, path, int(m.group(4)), hook)
                    return ResolvedSite(hook, path, "input", to_residual=path, columns=columns)
        if kind == "post":
            for proj in _DOWN_PROJECTIONS:
                path = f"{block}.{mlp}.{proj}" if mlp else f"{block}.{proj}"
                if _has_module(model, path):
                    return ResolvedSite(hook, path, "input", to_residual=path)
        if kind == "resid_mid":
            for mid in mids:
                if _has_module(model, f"{block}.{mid}"):
                    return ResolvedSite(hook, f"{block}.{mid}", "input")
        raise AtlasError(f"hook point {hook!r} is not available in {type(model).__name__}: pass an "
                         f"explicit module path as --hook-point (e.g. {block}, {block}.mlp)")
    path, port = hook, "output"
    if hook.endswith(".input") or hook.endswith(".output"):
        path, port = hook.rsplit(".", 1)
    if path and _has_module(model, path):
        return ResolvedSite(hook, path, port)
    raise AtlasError(f"unknown hook point {hook!r} for {type(model).__name__}: pass --hook-point with a "
                     f"name such as {HOOK_EXAMPLES} (TransformerLens style) or a module path of the model")


def _first_tensor(value):
    if isinstance(value, (tuple, list)):
        value = value[0]
    return value


def _first_input(args, kwargs):
    if args:
        return args[0]
    return next(iter(kwargs.values()), None)


def probe_sites(model: torch.nn.Module, sites: list[ResolvedSite], input_ids: torch.Tensor) -> list[tuple[int, int]]:
    """Run one tiny forward with plain hooks; return each site's (execution order, width).

    The order decides the order of reads inside a trace (NNsight requires execution order) and where
    the forward can stop; the width is checked against the crosscoder's ``d_model``.
    """
    fired: dict[tuple[str, str], tuple[int, int]] = {}
    counter = [0]
    handles = []

    def record(key, value):
        if key not in fired:
            value = _first_tensor(value)
            width = value.shape[-1] if isinstance(value, torch.Tensor) and value.ndim == 3 else -1
            fired[key] = (counter[0], width)
            counter[0] += 1

    for site in {(s.module_path, s.port) for s in sites}:
        module = model.get_submodule(site[0])
        if site[1] == "input":
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, kwargs, key=site: record(key, _first_input(args, kwargs)), with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(lambda _m, _a, out, key=site: record(key, out)))
    try:
        with torch.inference_mode():
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    finally:
        for h in handles:
            h.remove()
    result = []
    for s in sites:
        if (s.module_path, s.port) not in fired:
            raise AtlasError(f"hook point {s.hook!r} ({s.module_path}) is never reached in a forward pass: "
                             f"pass another --hook-point such as {HOOK_EXAMPLES}")
        result.append(fired[(s.module_path, s.port)])
    return result


# --------------------------------------------------------------------------- loading


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def load_hf_model(spec: str, device: torch.device, dtype: torch.dtype):
    """(Hugging Face causal LM, tokenizer) for a model spec: ``demo:...``, a local folder, or a hub id."""
    if spec.startswith("demo:"):
        from .demo import resolve_model

        return resolve_model(spec, device, dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = os.path.isdir(os.path.expanduser(spec))
    path = os.path.expanduser(spec) if local else spec
    offline = _offline()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline or local)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=offline or local)
    except (OSError, ValueError) as exc:
        if local:
            raise AtlasError(f"cannot load the model in {spec!r} ({exc.__class__.__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}): pass with --model a folder "
                             "written by save_pretrained (config.json, weights, tokenizer)") from exc
        how = "the Hugging Face hub is offline (HF_HUB_OFFLINE=1)" if offline else \
            "it is neither a local folder nor reachable on the Hugging Face hub"
        raise AtlasError(f"model {spec!r} cannot be found: {how}; pass --model with a local path "
                         "(a save_pretrained folder), or allow network access and unset HF_HUB_OFFLINE") from exc
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer


def _check_same_vocab(tokenizers: dict[str, object]):
    """The tokenizer with the larger vocabulary, after checking that every vocabulary agrees on shared ids."""
    items = list(tokenizers.items())
    base_spec, base = items[0]
    base_vocab = base.get_vocab()
    for spec, tok in items[1:]:
        vocab = tok.get_vocab()
        small, large = (vocab, base_vocab) if len(vocab) <= len(base_vocab) else (base_vocab, vocab)
        if any(large.get(t) != i for t, i in small.items()):
            raise AtlasError(
                f"models {base_spec!r} and {spec!r} have different tokenizers; a crosscoder reads the same "
                "token ids through every model, so pass --model with models that share a tokenizer"
            )
        if len(vocab) > len(base_vocab):
            base_spec, base, base_vocab = spec, tok, vocab
    return base


@dataclass
class ModelSet:
    """The models a crosscoder reads, one NNsight model per distinct model id, and their shared tokenizer.

    ``sources`` are the crosscoder's sources in order; ``sites[i]`` where source i is read and
    ``widths[i]`` its width (from a probe forward).
    """

    sources: list
    models: dict  # model id → nnsight TransformersModel
    hf_models: dict  # model id → transformers model
    tokenizer: object
    sites: list[ResolvedSite]
    widths: list[int]
    device: torch.device
    dtype: torch.dtype
    _order: list[int] = field(default_factory=list)  # execution order of each source's site in its model
    _unembed_cache: dict = field(default_factory=dict, repr=False)
    remote: bool | str = False  # NNsight remote execution (see load_models): traces run on NDIF

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def special_ids(self) -> set[int]:
        return set(self.tokenizer.all_special_ids)

    @property
    def vocab_size(self) -> int:
        """Token ids the corpus can hold and the logit effects cover (the tokenizer's, capped by lm_head)."""
        rows = min(m.get_output_embeddings().weight.shape[0] for m in self.hf_models.values())
        return min(len(self.tokenizer), rows)

    def vocab(self) -> list[str]:
        """Display string of every token id (each decoded alone, so leading spaces show).

        A token that holds only part of a character's UTF-8 bytes (byte-level BPE splits emoji and many
        non-Latin characters) decodes to U+FFFD on its own; its bytes are shown instead, the ones that are
        not valid UTF-8 as ``\\xNN`` (see :func:`token_display`).
        """
        return [token_display(self.tokenizer, i) for i in range(self.vocab_size)]

    def check_compatible(self, crosscoder) -> None:
        """Raise :class:`AtlasError` unless every source exists and has the crosscoder's width."""
        if crosscoder.n_sources != len(self.sources):
            raise AtlasError(f"the crosscoder reads {crosscoder.n_sources} sources but {len(self.sources)} "
                             "were given: pass --model once per model (or --hook-point) to match")
        for i, (src, width) in enumerate(zip(self.sources, self.widths)):
            if width != crosscoder.d_model:
                raise AtlasError(
                    f"source {i} ({src.model} at {src.site}) has width {width} but the crosscoder expects "
                    f"d_in={crosscoder.d_model}: pass the right --model or --hook-point"
                )

    def extract(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Activations of every source: ``x[B, T, S, d]`` in source order, in the models' dtype.

        ``input_ids`` must be unpadded, equal-length rows; each model's forward stops after the last
        site it needs.
        """
        where = "cpu" if self.remote else self.device  # a remote trace ships its inputs from here
        input_ids = input_ids.to(where)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(where)
        out: list[torch.Tensor | None] = [None] * len(self.sources)
        for model_id, nn_model in self.models.items():
            idx = [i for i, s in enumerate(self.sources) if s.model == model_id]
            reads = sorted({(self._order[i], self.sites[i].module_path, self.sites[i].port) for i in idx})
            values = _trace_sites(nn_model, input_ids, attention_mask, [(p, port) for _, p, port in reads],
                                  remote=self.remote)
            by_site = {(p, port): v for (_, p, port), v in zip(reads, values)}
            for i in idx:
                out[i] = _columns(by_site[(self.sites[i].module_path, self.sites[i].port)], self.sites[i])
        return torch.stack(out, dim=2).to(self.device)

    def unembeddings(self) -> list[torch.Tensor]:
        """Per source, ``[d, V]`` float32: the final norm's weight γ folded into ``lm_head``: γ[:, None] * W_U^T.

        γ is the ``weight`` of a LayerNorm; for other norms (RMSNorm, Gemma's ``1 + weight``) it is
        read off the norm's output for a large constant input, where the normalisation divides it
        away. Models without a recognised final norm use γ = 1.

        For a ``hook_z`` or ``mlp.hook_post`` source (:class:`ResolvedSite` ``to_residual``) the output
        projection W is folded in too: ``[d_in, V]`` = ``W @ (γ[:, None] * W_U^T)``, so that a decoder direction there
        gets the effect it has once projected into the residual stream (the projection's bias, the same
        for every feature, is left out, as the decoder bias is).
        """
        result = []
        for src, site in zip(self.sources, self.sites):
            if src.model not in self._unembed_cache:
                if self.remote:
                    self._unembed_cache[src.model] = _remote_unembedding(
                        self.models[src.model], self.hf_models[src.model], self.vocab_size, self.remote)
                else:
                    self._unembed_cache[src.model] = _unembedding(self.hf_models[src.model], self.vocab_size)
            U = self._unembed_cache[src.model]
            if site.to_residual is not None:
                key = (src.model, site.to_residual, site.columns)
                if key not in self._unembed_cache:  # local models only (load_remote_models refuses these sites)
                    proj = self.hf_models[src.model].get_submodule(site.to_residual)
                    W = _into_residual(proj, site.to_residual)
                    if site.columns is not None:  # one head: the rows of the projection it feeds
                        W = W[site.columns[0]:site.columns[1]]
                    self._unembed_cache[key] = (W.to(U.device) @ U).contiguous()
                U = self._unembed_cache[key]
            result.append(U)
        return result


_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece byte fallback
_BYTE_LEVEL_DECODER: dict[str, int] = {}


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable character standing for each byte → the byte."""
    if not _BYTE_LEVEL_DECODER:
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_LEVEL_DECODER.update({chr(c): b for b, c in zip(bs, cs)})
    return _BYTE_LEVEL_DECODER


def token_bytes(tokenizer, token_id: int) -> bytes | None:
    """The raw bytes of a byte-level BPE or byte-fallback token; None when the tokenizer has neither."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if not isinstance(piece, str) or not piece:
        return None
    m = _BYTE_TOKEN.match(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    table = _byte_level_decoder()
    if all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    return None


def token_display(tokenizer, token_id: int) -> str:
    """The string of one token as the site shows it: its decoded text, or, when that holds U+FFFD from
    a partial UTF-8 sequence, its bytes with the invalid ones written ``\\xNN`` (``\\xf0\\x9f``)."""
    text = tokenizer.decode([int(token_id)])
    if "\ufffd" not in text:
        return text
    raw = token_bytes(tokenizer, token_id)
    if raw is None or raw.decode("utf-8", "replace") != text:  # not the bytes this token decodes from
        return text
    return raw.decode("utf-8", "backslashreplace")


def _final_norm_weight(model: torch.nn.Module, d: int) -> torch.Tensor:
    for path in _FINAL_NORMS:
        if _has_module(model, path):
            norm = model.get_submodule(path)
            if isinstance(norm, torch.nn.LayerNorm):
                w = norm.weight
                return w.detach().float() if w is not None else torch.ones(d)
            param = next(norm.parameters(), None)
            dtype = param.dtype if param is not None else torch.float32
            device = param.device if param is not None else "cpu"
            with torch.inference_mode():
                probe = torch.full((1, 1, d), 1e3, dtype=dtype, device=device)
                return norm(probe).float().reshape(d)
    return torch.ones(d)


def _columns(value: torch.Tensor, site: ResolvedSite) -> torch.Tensor:
    """The part of a site's value its source reads (:attr:`ResolvedSite.columns`), or all of it."""
    return value if site.columns is None else value[..., site.columns[0]:site.columns[1]]


def _into_residual(module: torch.nn.Module, path: str) -> torch.Tensor:
    """``[d_in, d_model]`` float32: the matrix of a linear output projection acting on row vectors
    (``torch.nn.Linear`` stores ``[out, in]``, GPT-2's ``Conv1D`` ``[in, out]``)."""
    weight = getattr(module, "weight", None)
    if isinstance(module, torch.nn.Linear):
        return weight.detach().float().T
    if type(module).__name__ == "Conv1D" and weight is not None and weight.ndim == 2:
        return weight.detach().float()
    raise AtlasError(f"{path} ({type(module).__name__}) is not a linear projection, so the logit effects of a "
                     "source read at its input cannot go through it: pass --hook-point with another site")


def _unembedding(model: torch.nn.Module, vocab_size: int) -> torch.Tensor:
    W_U = model.get_output_embeddings().weight.detach().float()[:vocab_size]  # [V, d]
    gamma = _final_norm_weight(model, W_U.shape[1]).to(W_U.device)
    return (gamma[:, None] * W_U.T).contiguous()


def _trace_sites(nn_model, input_ids, attention_mask, reads: list[tuple[str, str]],
                 remote: bool | str = False) -> list[torch.Tensor]:
    """One NNsight trace reading ``(module_path, port)`` pairs in execution order, stopping after the last.

    ``remote``: NNsight's ``remote=`` (True: run on NDIF; ``"local"``: NNsight's local simulation of it).
    """
    import nnsight

    saved: list = []  # filled inside the trace (a list made outside survives the trace's scope)
    how = {"remote": remote} if remote else {}
    with torch.inference_mode(), _remote_errors(remote):
        with nn_model.trace(input_ids=input_ids, attention_mask=attention_mask, **how) as tracer:
            for path, port in reads:
                envoy = _envoy(nn_model, path)
                value = envoy.input if port == "input" else envoy.output
                saved.append(nnsight.save(_first_tensor(value)))
            tracer.stop()
    for (path, port), value in zip(reads, saved):
        if not isinstance(value, torch.Tensor) or value.ndim != 3 or value.shape[:2] != input_ids.shape:
            raise AtlasError(f"the {port} of {path} is not a [batch, tokens, width] tensor "
                             f"(got {type(value).__name__}): pass another --hook-point")
    return saved


def _envoy(nn_model, path: str):
    env = nn_model
    for part in path.split("."):
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


def load_models(sources: list, device: torch.device, dtype: torch.dtype, remote: bool | str = False) -> ModelSet:
    """Load one NNsight model per distinct model id of ``sources``; resolve and probe every source's site.

    ``remote`` (``--remote``): the models run on NDIF (NNsight's remote execution); see :func:`load_remote_models`.
    """
    from nnsight.modeling.transformers import TransformersModel

    if remote:
        return load_remote_models(sources, device, dtype, remote)
    hf_models, tokenizers = {}, {}
    for src in sources:
        if src.model not in hf_models:
            hf_models[src.model], tokenizers[src.model] = load_hf_model(src.model, device, dtype)
    tokenizer = _check_same_vocab(tokenizers)
    # ``device``: the pipeline NNsight wraps a module in otherwise moves it to cuda:0 whenever CUDA exists
    # (transformers' default pipeline device), whatever --device or the torchrun rank asked for.
    models = {spec: TransformersModel(hf, task="text-generation", tokenizer=tokenizers[spec], device=device)
              for spec, hf in hf_models.items()}
    sites = [resolve_hook(hf_models[s.model], s.site) for s in sources]
    probe_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
    probe = torch.full((1, 2), probe_id, dtype=torch.long, device=device)
    order, widths = [0] * len(sources), [0] * len(sources)
    for spec, hf in hf_models.items():
        idx = [i for i, s in enumerate(sources) if s.model == spec]
        for i, (o, w) in zip(idx, probe_sites(hf, [sites[i] for i in idx], probe)):
            order[i], widths[i] = o, (w if sites[i].columns is None else sites[i].columns[1] - sites[i].columns[0])
    return ModelSet(sources=list(sources), models=models, hf_models=hf_models, tokenizer=tokenizer,
                    sites=sites, widths=widths, device=device, dtype=dtype, _order=order)


# --------------------------------------------------------------------------- remote execution (NDIF)
#
# ``--remote`` runs every trace with NNsight's ``remote=True``: NDIF (https://ndif.us) holds the weights and
# runs the forward passes; this machine holds only each model's structure (weights on the meta device),
# its tokenizer and config from the Hugging Face hub, and the crosscoder. The few weights the analysis
# needs (lm_head and the final norm, for logit effects) are fetched by a trace that saves them. Sites
# are probed by a remote trace too (a forward on meta weights cannot run): their order is the order
# modules are entered and left in a depth-first walk of the model (``_site_order``), their width the
# saved value's. The API key is NNsight's: ``NDIF_API_KEY`` or NNsight's config file.
# ``remote="local"`` is NNsight's local simulation of the same path (used by the tests).

NDIF_KEY_HELP = ("set NDIF_API_KEY to your NDIF API key (create one at https://login.ndif.us), or save it once "
                 "with python -c \"from nnsight import CONFIG; CONFIG.set_default_api_key('KEY')\"")


class _remote_errors:
    """Turns NNsight's remote-execution failures into AtlasError (a context manager)."""

    def __init__(self, remote):
        self.remote = remote

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if not self.remote or exc is None or isinstance(exc, (AtlasError, KeyboardInterrupt)):
            return False
        from nnsight.intervention.backends.remote import RemoteError

        if isinstance(exc, RemoteError):
            text = " ".join(str(exc).split())[:300]
            if "401" in text or "403" in text or "key" in text.lower():
                raise AtlasError(f"NDIF refused the request ({text}): {NDIF_KEY_HELP}") from exc
            raise AtlasError(f"the remote job failed on NDIF ({text}): check https://ndif.us for the service "
                             "status and the models it hosts, or run without --remote") from exc
        if type(exc).__module__.split(".")[0] in ("httpx", "httpcore", "websocket"):
            raise AtlasError(f"cannot reach NDIF ({type(exc).__name__}: {exc}): check the network connection "
                             "(and NDIF_HOST), or run without --remote") from exc
        return False


def check_remote(sources: list) -> None:
    """Raise AtlasError unless remote execution can work: an API key, hub model ids, NDIF reachable."""
    from nnsight import CONFIG

    if not CONFIG.API.APIKEY:
        raise AtlasError(f"--remote needs an NDIF API key and none is configured: {NDIF_KEY_HELP}")
    for spec in dict.fromkeys(s.model for s in sources):
        if spec.startswith("demo:") or os.path.exists(os.path.expanduser(spec)):
            raise AtlasError(f"--remote runs models that NDIF hosts, named by Hugging Face id, but {spec!r} is a "
                             "local model: pass --model with a hub id (e.g. meta-llama/Llama-3.1-8B), or run "
                             "without --remote")
    if _offline():
        raise AtlasError("--remote needs the network, but HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE (each "
                         "model's config and tokenizer come from the Hugging Face hub), or run without --remote")
    import httpx

    try:
        httpx.get(f"{CONFIG.API.HOST}/status", timeout=httpx.Timeout(10.0, read=30.0)).raise_for_status()
    except httpx.HTTPError as exc:
        raise AtlasError(f"cannot reach NDIF at {CONFIG.API.HOST} ({type(exc).__name__}: {exc}): check the "
                         "network connection (and NDIF_HOST), or run without --remote") from exc


def _site_order(model: torch.nn.Module, sites: list[ResolvedSite]) -> list[int]:
    """Execution rank of each site: a module's input when it is entered, its output when it is left
    (after all its submodules), in the order modules are registered (a depth-first walk)."""
    enter, leave, clock = {}, {}, [0]

    def walk(name: str, module: torch.nn.Module) -> None:
        enter[name] = clock[0]
        clock[0] += 1
        for child, sub in module.named_children():
            walk(f"{name}.{child}" if name else child, sub)
        leave[name] = clock[0]
        clock[0] += 1

    walk("", model)
    keys = sorted({(enter[s.module_path] if s.port == "input" else leave[s.module_path], s.module_path, s.port)
                   for s in sites})
    rank = {(p, port): i for i, (_, p, port) in enumerate(keys)}
    return [rank[(s.module_path, s.port)] for s in sites]


def load_remote_models(sources: list, device: torch.device, dtype: torch.dtype, remote: bool | str = True) -> ModelSet:
    """The models of ``sources`` for remote execution: structure and tokenizer here, weights on NDIF."""
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoTokenizer

    if remote is True:
        check_remote(sources)
    models, hf_models, tokenizers = {}, {}, {}
    for src in sources:
        if src.model in models:
            continue
        try:
            tok = AutoTokenizer.from_pretrained(src.model, local_files_only=_offline())
            nn_model = TransformersModel(src.model, task="text-generation", tokenizer=tok)
        except (OSError, ValueError) as exc:
            raise AtlasError(f"cannot load the config and tokenizer of {src.model!r} for --remote "
                             f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): pass "
                             "--model with a Hugging Face model id that NDIF hosts") from exc
        models[src.model], hf_models[src.model], tokenizers[src.model] = nn_model, nn_model._module, tok
    tokenizer = _check_same_vocab(tokenizers)
    sites = [resolve_hook(hf_models[s.model], s.site) for s in sources]
    for site in sites:
        if site.to_residual is not None:  # its logit effects need the projection's weights, which stay remote
            raise AtlasError(f"{site.hook} with --remote is not supported (its logit effects need the output "
                             "projection's weights): run the model locally, without --remote")
    order, widths = [0] * len(sources), [0] * len(sources)
    probe_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
    probe = torch.full((1, 2), probe_id, dtype=torch.long)
    for spec, nn_model in models.items():
        idx = [i for i, s in enumerate(sources) if s.model == spec]
        ranks = _site_order(hf_models[spec], [sites[i] for i in idx])
        reads = sorted({(r, sites[i].module_path, sites[i].port) for r, i in zip(ranks, idx)})
        values = _trace_sites(nn_model, probe, torch.ones_like(probe), [(p, port) for _, p, port in reads],
                              remote=remote)
        width = {(p, port): v.shape[-1] for (_, p, port), v in zip(reads, values)}
        for r, i in zip(ranks, idx):
            order[i], widths[i] = r, width[(sites[i].module_path, sites[i].port)]
    return ModelSet(sources=list(sources), models=models, hf_models=hf_models, tokenizer=tokenizer,
                    sites=sites, widths=widths, device=device, dtype=dtype, _order=order, remote=remote)


def _remote_unembedding(nn_model, meta_model: torch.nn.Module, vocab_size: int, remote) -> torch.Tensor:
    """:func:`_unembedding` with ``lm_head`` and the final norm's weights fetched by a remote trace."""
    import copy

    import nnsight

    head = meta_model.get_output_embeddings()
    head_path = next(name for name, m in meta_model.named_modules() if m is head)
    norm_path = next((p for p in _FINAL_NORMS if _has_module(meta_model, p)), None)
    names = [f"{head_path}.weight"]
    if norm_path is not None:
        names += [f"{norm_path}.{n}" for n, _ in meta_model.get_submodule(norm_path).named_parameters()]
    probe = torch.zeros((1, 1), dtype=torch.long)
    saved: list = []
    with torch.inference_mode(), _remote_errors(remote):
        with nn_model.trace(input_ids=probe, attention_mask=torch.ones_like(probe), remote=remote) as tracer:
            for name in names:
                path, attr = name.rsplit(".", 1)
                saved.append(nnsight.save(getattr(_envoy(nn_model, path), attr)))
            tracer.stop()
    values = {n: torch.as_tensor(v).detach().cpu() for n, v in zip(names, saved)}
    # a CPU copy of the output layer and the final norm, holding the fetched weights, for _unembedding
    local = torch.nn.Module()
    local.get_output_embeddings = lambda: _Head(values[f"{head_path}.weight"])
    if norm_path is not None:
        norm = copy.deepcopy(meta_model.get_submodule(norm_path)).to_empty(device="cpu")
        with torch.no_grad():
            for n, p in norm.named_parameters():
                p.copy_(values[f"{norm_path}.{n}"].to(p.dtype))
        parent, _, leaf = norm_path.rpartition(".")
        holder = local
        for part in parent.split(".") if parent else []:
            if not hasattr(holder, part):
                holder.add_module(part, torch.nn.Module())
            holder = getattr(holder, part)
        holder.add_module(leaf, norm)
    return _unembedding(local, vocab_size)


class _Head:
    def __init__(self, weight: torch.Tensor):
        self.weight = weight
