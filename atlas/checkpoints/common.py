"""Helpers shared by the format readers: options, tensor checks, sources and normalisation."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from ..crosscoder import Crosscoder, Source
from ..errors import AtlasError
from .files import RawCheckpoint, fmt_shape

#: Placeholder model id shown by ``atlas inspect`` when the checkpoint does not name a model.
UNKNOWN_MODEL = "unknown: pass --model"
#: Placeholder site shown by ``atlas inspect`` when the checkpoint does not name a hook point.
UNKNOWN_SITE = "unknown: pass --hook-point"


@dataclass
class Options:
    """What the user passed on the command line, plus whether missing facts are fatal.

    ``strict=False`` (``atlas inspect``) fills unknown model ids and sites with placeholders instead of
    raising, so a checkpoint can be described before the user knows every option.
    """

    models: list[str] | None = None
    hook_point: str | None = None
    scale: list[float] | None = None
    strict: bool = True
    notes: list[str] = field(default_factory=list)  # facts about how the checkpoint was read
    warnings: list[str] = field(default_factory=list)  # things the user should look at

    @property
    def hook_points(self) -> list[str] | None:
        """``--hook-point`` split on commas (several sites for a grid or cross-layer crosscoder)."""
        if self.hook_point is None:
            return None
        parts = [p.strip() for p in self.hook_point.split(",")]
        if not all(parts):
            raise AtlasError(f"--hook-point {self.hook_point!r} has an empty name; pass e.g. blocks.6.hook_resid_post")
        return parts


def f32(t: torch.Tensor) -> torch.Tensor:
    """A float32, contiguous copy-free view where possible (fp16/bf16/fp64 are converted)."""
    return t.detach().to(torch.float32).contiguous()


def require(raw: RawCheckpoint, key: str, fmt: str, ndim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    t = raw.state.get(key)
    if t is None:
        raise AtlasError(
            f"{raw.path}: the {fmt} checkpoint has no {key!r} tensor; the file is incomplete or not a "
            f"{fmt} checkpoint (keys: {', '.join(sorted(raw.state)[:10])})"
        )
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            raise AtlasError(
                f"{raw.path}: {key} has shape {fmt_shape(t.shape)} but a {fmt} checkpoint stores it with "
                f"{' or '.join(map(str, allowed))} dimensions; the file is not a consistent {fmt} checkpoint"
            )
    if not t.is_floating_point() and key not in ("k", "code_normalization_id", "is_folded"):
        raise AtlasError(f"{raw.path}: {key} has integer dtype {t.dtype}; expected floating-point weights")
    return t


def expect_shape(raw: RawCheckpoint, name: str, t: torch.Tensor | None, shape: tuple[int, ...], because: str) -> None:
    if t is not None and tuple(t.shape) != tuple(shape):
        raise AtlasError(
            f"{raw.path}: {name} has shape {fmt_shape(t.shape)} but {because} implies {fmt_shape(shape)}; "
            "the tensors do not belong to one crosscoder (re-export the checkpoint from its training code)"
        )


def cfg_int(cfg: dict, key: str, cfg_path, actual: int, what: str) -> None:
    """Check that an integer cfg entry agrees with the tensors (when the cfg has it)."""
    if key not in cfg or cfg[key] is None:
        return
    value = cfg[key]
    try:
        value = int(value)
    except (TypeError, ValueError, OverflowError):
        raise AtlasError(f"{cfg_path}: {key} = {cfg[key]!r} is not a whole number; fix the config") from None
    if value != actual:
        raise AtlasError(
            f"{cfg_path} says {key} = {value} but the weights have {what} = {actual}; the config belongs to "
            "another checkpoint: put the matching config beside the weights"
        )


def cfg_number(value, what: str, cfg_path, kind=int):
    """A number from a config (AtlasError naming the entry when it is not one)."""
    try:
        if isinstance(value, bool) or value is None:
            raise TypeError
        out = kind(value)
        if kind is int and float(value) != out:
            raise ValueError
        if kind is float and not math.isfinite(out):
            raise ValueError
        return out
    except (TypeError, ValueError, OverflowError):
        raise AtlasError(f"{cfg_path}: {what} = {value!r} is not {'an integer' if kind is int else 'a number'}; fix the config") from None


def scalar(raw: RawCheckpoint, key: str) -> float:
    """A one-element tensor's value (AtlasError when the tensor is not a finite scalar)."""
    t = raw.state[key]
    if t.numel() != 1:
        raise AtlasError(f"{raw.path}: {key} has shape {fmt_shape(t.shape)}; a single value is expected")
    v = float(t.detach().to(torch.float64).reshape(-1)[0])
    if v != v or v in (float("inf"), float("-inf")):
        raise AtlasError(f"{raw.path}: {key} is {v}; the file is damaged, use another checkpoint")
    return v


def int_scalar(raw: RawCheckpoint, key: str) -> int:
    v = scalar(raw, key)
    if v != int(v):
        raise AtlasError(f"{raw.path}: {key} is {v}, not an integer; the file is damaged")
    return int(v)


# --------------------------------------------------------------------------- model ids

# TransformerLens names (which training configs store) → Hugging Face ids.
_TL_TO_HF = {
    "gpt2-small": "gpt2",
    "gpt2-medium": "gpt2-medium",
    "gpt2-large": "gpt2-large",
    "gpt2-xl": "gpt2-xl",
    "distilgpt2": "distilgpt2",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.1",
    "tiny-stories-1M": "roneneldan/TinyStories-1M",
    "tiny-stories-3M": "roneneldan/TinyStories-3M",
    "tiny-stories-8M": "roneneldan/TinyStories-8M",
    "tiny-stories-28M": "roneneldan/TinyStories-28M",
    "tiny-stories-33M": "roneneldan/TinyStories-33M",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-0.5b-instruct": "Qwen/Qwen2.5-0.5B-Instruct",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
}
_TL_PREFIXES = (("pythia-", "EleutherAI/"), ("gemma-", "google/"))


def hf_model_id(name: str, opts: Options | None = None) -> str:
    """Map a TransformerLens model name from a training cfg to its Hugging Face id (others unchanged)."""
    name = str(name)
    hf = _TL_TO_HF.get(name)
    if hf is None and "/" not in name and ":" not in name:
        for prefix, org in _TL_PREFIXES:
            if name.startswith(prefix):
                hf = org + name
                break
    if hf is None or hf == name:
        return name
    if opts is not None:
        opts.notes.append(f"model {name!r} from the checkpoint's config read as Hugging Face id {hf}")
    return hf


def complete_models(n_models: int, from_cfg: list[str], opts: Options, cfg_desc: str) -> list[str]:
    """The ``n_models`` model ids, from the cfg completed or overridden by ``--model``.

    ``--model`` given ``n_models`` times replaces the cfg's ids; given fewer times it completes them (a
    ckkissane two-model cfg names only the first model, ``--model`` gives the second).
    """
    given = [str(m) for m in (opts.models or [])]
    cfg_ids = [hf_model_id(m, opts) for m in from_cfg if m]
    if len(given) > n_models:
        raise AtlasError(
            f"{len(given)} --model options for a checkpoint that reads {_n(n_models, 'model')}; "
            f"pass --model {n_models} time(s), in source order"
        )
    if len(given) == n_models:
        return given
    if len(cfg_ids) + len(given) == n_models:
        return cfg_ids + given
    if len(cfg_ids) == n_models and given:
        raise AtlasError(
            f"{cfg_desc} names {_n(n_models, 'model')} ({', '.join(cfg_ids)}) and --model was given "
            f"{len(given)} time(s); to replace them pass --model {n_models} times, in source order"
        )
    if not opts.strict:
        known = (cfg_ids + given)[:n_models]
        return known + [UNKNOWN_MODEL] * (n_models - len(known))
    if n_models == 2:
        named = f" and {cfg_desc} names only {cfg_ids[0]!r}" if len(cfg_ids) == 1 else ""
        if len(cfg_ids) == 1 and len(given) == 1:
            raise AtlasError(
                f"this is a two-model crosscoder{named}; pass one --model for the second model, or both "
                "models with --model ID --model ID"
            )
        raise AtlasError(f"this is a two-model crosscoder{named}; pass both models with --model ID --model ID")
    if n_models == 1:
        raise AtlasError(f"{cfg_desc} does not name the model this SAE reads; pass it with --model ID_OR_PATH")
    raise AtlasError(
        f"this crosscoder reads {n_models} models and {cfg_desc} names {len(cfg_ids)}; pass all of them in "
        f"source order with --model ID ({n_models} times)"
    )


def complete_sites(n_sites: int, from_cfg: list[str] | None, opts: Options, cfg_desc: str) -> list[str]:
    """The ``n_sites`` hook points, from ``--hook-point`` (comma-separated for several) or the cfg."""
    given = opts.hook_points
    if given is not None:
        if len(given) == n_sites:
            return given
        if len(given) == 1 and n_sites > 1 and from_cfg is None:
            raise AtlasError(
                f"this crosscoder reads {n_sites} hook points per model but --hook-point names one; pass all "
                f"{n_sites} separated by commas, e.g. --hook-point blocks.4.hook_resid_post,blocks.8.hook_resid_post"
            )
        raise AtlasError(
            f"--hook-point names {len(given)} hook point(s) but this crosscoder reads {n_sites} per model; "
            f"pass {n_sites}, separated by commas"
        )
    if from_cfg is not None and len(from_cfg) == n_sites and all(from_cfg):
        return [str(s) for s in from_cfg]
    if not opts.strict:
        return [UNKNOWN_SITE] * n_sites
    if n_sites == 1:
        raise AtlasError(f"{cfg_desc} does not name the hook point; pass it with --hook-point NAME (e.g. blocks.6.hook_resid_post)")
    raise AtlasError(
        f"{cfg_desc} does not name the {n_sites} hook points; pass them with --hook-point NAME,NAME,... "
        "(comma-separated, in source order)"
    )


def grid_sources(models: list[str], sites: list[str]) -> list[Source]:
    """Sources of a models × sites grid, model-major (``S = M·P``, index ``m * P + p``)."""
    return [Source(m, s) for m in models for s in sites]


# TransformerLens short names (``utils.get_act_name``) of the sites inside a block's attention and MLP
_SUBLAYER_SITES = {"z": "attn.hook_z", "post": "mlp.hook_post"}


def layer_site(layer: int, site: str) -> str:
    """TransformerLens hook name of ``site`` (e.g. ``resid_post``, ``z``, ``post``) at block ``layer``."""
    site = site[len("hook_"):] if site.startswith("hook_") else site
    if site in _SUBLAYER_SITES:
        return f"blocks.{int(layer)}.{_SUBLAYER_SITES[site]}"
    return f"blocks.{int(layer)}.hook_{site}"


_SUBMODULE_PATTERNS = (
    (re.compile(r"^(resid_post|resid_pre|resid_mid|mlp_out|attn_out)_layer_(\d+)$"), lambda m: layer_site(int(m[2]), m[1])),
    (re.compile(r"^layer_(\d+)_out$"), lambda m: layer_site(int(m[1]), "resid_post")),
    (re.compile(r"^layer_(\d+)$"), lambda m: layer_site(int(m[1]), "resid_post")),
)


def site_from_submodule(name: str) -> str:
    """dictionary_learning submodule names (``resid_post_layer_3``, ``layer_13_out``) → hook names."""
    for pat, make in _SUBMODULE_PATTERNS:
        m = pat.match(name)
        if m:
            return make(m)
    return name  # an explicit module path (``model.layers.3``) or a hook name already


# --------------------------------------------------------------------------- normalisation


def scale_from_option(opts: Options, n_sources: int) -> torch.Tensor | None:
    """``--scale``: one value per source or one for all, as a ``[S]`` tensor (None when not given)."""
    if not opts.scale:
        return None
    vals = [float(v) for v in opts.scale]
    if len(vals) == 1:
        vals = vals * n_sources
    if len(vals) != n_sources:
        raise AtlasError(
            f"--scale was given {len(opts.scale)} times but this crosscoder reads {_n(n_sources, 'source')}; "
            f"pass --scale once (same factor for all) or {n_sources} times (one per source, in order)"
        )
    for v in vals:
        if not math.isfinite(v) or v <= 0:
            raise AtlasError(f"--scale {v} is not a positive number; pass the factor inputs are multiplied by")
    return torch.tensor(vals, dtype=torch.float32)


def apply_scale(cc: Crosscoder, opts: Options, stored: torch.Tensor | None, stored_desc: str,
                missing_desc: str | None = None) -> None:
    """Set ``cc.input_scale`` from ``--scale``, else the checkpoint's own factor, and describe it.

    ``stored`` is the checkpoint's factor (``ones`` for a checkpoint that reads raw activations, ``None``
    when the factor was not saved and the analysis must estimate it).
    """
    S = cc.n_sources
    given = scale_from_option(opts, S)
    if given is not None:
        cc.input_scale = given
        desc = "from --scale: " + _fmt_scale(given)
        if stored is not None and not torch.allclose(stored, torch.ones_like(stored)):
            desc += f" (replaces the stored {_fmt_scale(stored)})"
        cc.extra["normalisation"] = desc
        return
    if stored is not None:
        if stored.shape != (S,):
            stored = stored.reshape(-1)
        cc.input_scale = f32(stored)
        cc.extra["normalisation"] = stored_desc
        return
    cc.input_scale = None
    cc.extra["normalisation"] = missing_desc or (
        "not stored: estimated over the corpus at analysis time (each source scaled to average norm "
        "sqrt(d)); pass --scale to set it"
    )


def _fmt_scale(t: torch.Tensor) -> str:
    vals = [f"{float(v):.6g}" for v in t.reshape(-1)[:8]]
    more = ", …" if t.numel() > 8 else ""
    return "[" + ", ".join(vals) + more + "]"


def _n(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


# --------------------------------------------------------------------------- checks


def validate(cc: Crosscoder, raw: RawCheckpoint) -> None:
    """Check the canonical tensors agree with each other (shapes, activation parameters)."""
    S, d, F = cc.W_enc.shape
    expect_shape(raw, "W_dec", cc.W_dec, (F, S, d), f"W_enc {fmt_shape(cc.W_enc.shape)}")
    expect_shape(raw, "b_enc", cc.b_enc, (F,), f"W_enc {fmt_shape(cc.W_enc.shape)}")
    expect_shape(raw, "b_dec", cc.b_dec, (S, d), f"W_enc {fmt_shape(cc.W_enc.shape)}")
    if cc.act_scale is not None:
        expect_shape(raw, "code normalisation", cc.act_scale, (F,), f"W_enc {fmt_shape(cc.W_enc.shape)}")
    if cc.input_scale is not None:
        expect_shape(raw, "input scale", cc.input_scale, (S,), f"W_enc {fmt_shape(cc.W_enc.shape)}")
    if len(cc.sources) != S:
        raise AtlasError(f"{raw.path}: {len(cc.sources)} sources for {S} encoder inputs; pass one --model/--hook-point per source")
    if F == 0 or d == 0 or S == 0:
        raise AtlasError(f"{raw.path}: the crosscoder has an empty dimension (W_enc {fmt_shape(cc.W_enc.shape)}); use a trained checkpoint")
    if cc.activation == "jumprelu":
        if cc.threshold is None:
            raise AtlasError(f"{raw.path}: a JumpReLU checkpoint needs a threshold tensor; the file is incomplete")
        if cc.threshold.dim() == 0:
            cc.threshold = cc.threshold.expand(F).clone()
        expect_shape(raw, "threshold", cc.threshold, (F,), f"W_enc {fmt_shape(cc.W_enc.shape)}")
    elif cc.activation == "batchtopk":
        if cc.threshold is None:  # estimated by the analysis from k (crosscode saves no threshold)
            if not isinstance(cc.k, int) or cc.k <= 0:
                raise AtlasError(f"{raw.path}: a BatchTopK checkpoint needs its inference threshold, or its k to "
                                 "estimate one; this one has neither")
        elif cc.threshold.numel() != 1:
            raise AtlasError(
                f"{raw.path}: a BatchTopK checkpoint needs one inference threshold; this one has "
                f"{fmt_shape(cc.threshold.shape)}"
            )
        else:
            cc.threshold = cc.threshold.reshape(())
    elif cc.activation == "topk":
        try:
            k = int(cc.k)
        except (TypeError, ValueError, OverflowError):
            k = 0
        if k <= 0 or k != cc.k:
            raise AtlasError(f"{raw.path}: a TopK checkpoint needs a whole k > 0 (found {cc.k}); set k in its config")
        cc.k = k
        if cc.k > F:
            raise AtlasError(f"{raw.path}: k = {cc.k} exceeds the dictionary size {F}; the config belongs to another checkpoint")
    for src in cc.sources:
        if not src.model or not src.site:
            raise AtlasError(f"{raw.path}: a source has an empty model id or site ({src}); pass --model and --hook-point")


def weight_problems(cc: Crosscoder) -> list[str]:
    """Non-finite values in any tensor (a load error; a warning in ``atlas inspect``)."""
    problems = []
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold", "input_scale", "act_scale"):
        t = getattr(cc, name)
        if t is None or not t.is_floating_point() or t.numel() == 0:
            continue
        if bool(torch.isfinite(t.sum())):  # fast path: NaN/inf propagate through the sum
            continue
        bad = ~torch.isfinite(t)
        n_bad = int(bad.sum())
        if n_bad:
            n_nan = int(torch.isnan(t).sum())
            kind = "NaN" if n_nan == n_bad else ("inf" if n_nan == 0 else "NaN/inf")
            problems.append(f"{name} has {n_bad:,} {kind} value(s) of {t.numel():,}")
    return problems


def zero_decoder_features(cc: Crosscoder) -> list[int]:
    """Features whose decoder vectors are exactly zero in every source."""
    norms = cc.W_dec.norm(dim=-1)  # [F, S], no full-size temporary
    return torch.nonzero((norms == 0).all(dim=1)).reshape(-1).tolist()
