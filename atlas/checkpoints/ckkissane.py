"""ckkissane / Neel Nanda crosscoders and SAEs: ``N.pt`` (state dict) + ``N_cfg.json`` beside it.

Tensors ``W_enc[S, d, F]``, ``W_dec[F, S, d]``, ``b_enc[F]``, ``b_dec[S, d]`` are already in canonical
order; encode is ``relu(einsum(x, W_enc) + b_enc)``. The cfg (``d_in, dict_size, enc_dtype, model_name,
site, hook_point, seq_len, ...``) names one model:

- model diffing (ckkissane): S models at ``hook_point``; the second model comes from ``--model``;
- cross-layer (Neel's GPT-2 variant): ``site: resid_post`` and no ``hook_point``: source i reads
  ``blocks.i.hook_resid_post`` of ``model_name``.

The cfg may also carry ``model_names`` (one id per model) and ``input_scale`` (one factor per source), as
the demo checkpoint does. The training scripts do not save their normalisation factors, so without
``input_scale`` or ``--scale`` the analysis estimates them. The Hugging Face layout of the same format
(``<hook>/cc_weights.pt`` + ``<hook>/cfg.json``) is read too.

The SAEs of the same lineage (Neel Nanda's 1L-Sparse-Autoencoder, Kissane et al.'s attention SAEs on
``hook_z``) store ``W_enc[d, F]``, ``W_dec[F, d]``, ``b_enc[F]``, ``b_dec[d]`` with a cfg naming the width
``act_size``, the site as ``act_name`` or ``layer`` + ``site`` (TransformerLens short names: ``z``,
``post``, ``resid_post``, ...), and encode ``relu((x - b_dec) @ W_enc + b_enc)``: one source, the
centring folded into ``b_enc``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..crosscoder import Crosscoder, Source
from ..errors import AtlasError
from .common import (
    UNKNOWN_MODEL,
    UNKNOWN_SITE,
    Options,
    apply_scale,
    cfg_int,
    cfg_number,
    complete_models,
    complete_sites,
    f32,
    layer_site,
    require,
)
from .files import RawCheckpoint, fmt_shape, read_json

NAME = "ckkissane"
LABEL = "ckkissane / Neel Nanda crosscoder"
FILES = ("N.pt (state dict: W_enc[S,d,F], W_dec[F,S,d], b_enc[F], b_dec[S,d]; or an SAE's W_enc[d,F], "
         "W_dec[F,d], b_enc[F], b_dec[d]) + N_cfg.json")


def sniff(raw: RawCheckpoint) -> bool:
    w = raw.state.get("W_enc")
    if w is None or "W_dec" not in raw.state:
        return False
    if w.dim() == 3:
        return True
    # an SAE of the same lineage: 2-D weights with N_cfg.json (SAELens writes cfg.json)
    cfg = raw.path.with_name(raw.path.stem + "_cfg.json")
    return w.dim() == 2 and cfg.is_file()


def cfg_path_for(weights: Path) -> Path | None:
    for cand in (weights.with_name(weights.stem + "_cfg.json"), weights.with_name("cfg.json")):
        if cand.is_file():
            return cand
    return None


def convert(raw: RawCheckpoint, opts: Options) -> Crosscoder:
    sae = raw.state["W_enc"].dim() == 2
    W_enc = require(raw, "W_enc", LABEL, 2 if sae else 3)
    W_dec = require(raw, "W_dec", LABEL, 2 if sae else 3)
    b_enc = require(raw, "b_enc", LABEL, 1)
    b_dec = require(raw, "b_dec", LABEL, 1 if sae else 2)
    if sae:  # relu((x - b_dec) @ W_enc + b_enc): one source, the centring folded into b_enc
        W_enc, W_dec, b_dec = W_enc[None], W_dec[:, None, :], b_dec[None]
        if W_enc.shape[1] != b_dec.shape[1] or W_dec.shape[2] != b_dec.shape[1]:
            raise AtlasError(f"{raw.path}: W_enc {fmt_shape(W_enc.shape[1:])}, W_dec {fmt_shape(W_dec.shape[::2])} "
                             f"and b_dec {fmt_shape(b_dec.shape[1:])} disagree on the width; the file is damaged")
        b_enc = f32(b_enc) - f32(b_dec[0]) @ f32(W_enc[0])
        opts.notes.append("SAE (2-D weights): encode relu((x - b_dec) @ W_enc + b_enc), the centring folded "
                          "into b_enc")
    S, d, F = W_enc.shape

    cfg_file = cfg_path_for(raw.path)
    cfg: dict = read_json(cfg_file) if cfg_file else {}
    cfg_desc = f"its cfg ({cfg_file.name})" if cfg_file else f"the checkpoint (no {raw.path.stem}_cfg.json beside it)"
    if cfg_file is None:
        opts.warnings.append(f"no {raw.path.stem}_cfg.json beside {raw.path.name}: model ids and hook point come from the options")
    else:
        opts.notes.append(f"config: {cfg_file}")
        cfg_int(cfg, "d_in", cfg_file, d, "d_model (W_enc.shape[1])")
        cfg_int(cfg, "act_size", cfg_file, d, "the input width (W_enc.shape[0])")
        cfg_int(cfg, "dict_size", cfg_file, F, "features (W_enc.shape[2])")

    sources = _sources(S, cfg, cfg_file, cfg_desc, raw, opts)

    cc = Crosscoder(
        W_enc=f32(W_enc), W_dec=f32(W_dec), b_enc=f32(b_enc), b_dec=f32(b_dec),
        sources=sources, activation="relu", format=NAME, path=str(raw.path),
    )
    stored = _cfg_scale(cfg, cfg_file, S)
    if stored is None and sae:  # these SAEs were trained on the raw activations
        apply_scale(cc, opts, torch.ones(1), "none needed: an SAE of this lineage reads raw activations")
    else:
        apply_scale(cc, opts, stored, f"stored in the cfg (input_scale): {stored.tolist() if stored is not None else ''}")
    if cfg.get("enc_dtype"):
        cc.extra["cfg_dtype"] = str(cfg["enc_dtype"])
    return cc


def _sources(S: int, cfg: dict, cfg_file, cfg_desc: str, raw: RawCheckpoint, opts: Options) -> list[Source]:
    names = cfg.get("model_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise AtlasError(f"{cfg_file}: model_names must be a list of model ids; fix the cfg")
    cfg_models: list[str] = list(names) if names else ([str(cfg["model_name"])] if cfg.get("model_name") else [])
    hps = opts.hook_points
    cfg_hp = cfg.get("hook_point") or cfg.get("act_name")
    if not cfg_hp and cfg.get("layer") is not None and cfg.get("site"):
        cfg_hp = layer_site(cfg_number(cfg["layer"], "layer", cfg_file), str(cfg["site"]))
    n_given = len(opts.models or [])

    if S > 1 and hps is not None and len(hps) == S:
        # one model, one hook point per source (cross-layer with explicit sites)
        model = complete_models(1, cfg_models[:1], opts, cfg_desc)[0]
        opts.notes.append(f"cross-layer crosscoder: {S} hook points of one model")
        return [Source(model, h) for h in hps]
    if hps or cfg_hp or S == 1 or (S > 1 and (len(cfg_models) == S or n_given == S)):
        if names and len(names) != S:
            raise AtlasError(
                f"{cfg_file}: model_names lists {len(names)} models but the weights have {S} sources "
                f"(W_enc {fmt_shape(raw.state['W_enc'].shape)}); fix model_names or pass --model {S} times"
            )
        models = complete_models(S, cfg_models, opts, cfg_desc)
        site = complete_sites(1, [cfg_hp] if cfg_hp else None, opts, cfg_desc)[0]
        if S > 1:
            opts.notes.append(f"model-diffing crosscoder: {S} models at {site}")
        return [Source(m, site) for m in models]
    if cfg.get("site"):
        model = complete_models(1, cfg_models[:1], opts, cfg_desc)[0]
        opts.notes.append(
            f"cross-layer crosscoder (cfg has site {cfg['site']!r} and no hook_point): source i reads "
            f"{layer_site(0, str(cfg['site'])).replace('.0.', '.i.')}"
        )
        return [Source(model, layer_site(i, str(cfg["site"]))) for i in range(S)]
    if not opts.strict:
        return [Source(UNKNOWN_MODEL, UNKNOWN_SITE) for _ in range(S)]
    if cfg_file is None:
        raise AtlasError(
            f"{raw.path.name} has no {raw.path.stem}_cfg.json beside it, so its {S} sources are unknown; put "
            f"the cfg beside the weights, or pass --model ID ({S} times) and --hook-point NAME"
        )
    raise AtlasError(
        f"{cfg_file} has neither hook_point nor site, so its {S} sources are unknown; pass --model ID "
        f"({S} times) and --hook-point NAME for a model-diffing crosscoder, or --model ID and "
        f"--hook-point NAME,NAME,... ({S} names) for a cross-layer one"
    )


def _cfg_scale(cfg: dict, cfg_file, S: int) -> torch.Tensor | None:
    value = cfg.get("input_scale")
    if value is None:
        return None
    if isinstance(value, (int, float)):
        value = [value] * S
    if not isinstance(value, list) or len(value) != S:
        raise AtlasError(f"{cfg_file}: input_scale must list {S} numbers (one per source); fix the cfg or pass --scale")
    try:
        vals = [float(v) for v in value]
    except (TypeError, ValueError):
        raise AtlasError(f"{cfg_file}: input_scale holds a non-number; fix the cfg or pass --scale") from None
    if not all(math.isfinite(v) and v > 0 for v in vals):
        raise AtlasError(f"{cfg_file}: input_scale must be positive numbers (got {vals}); fix the cfg or pass --scale")
    return torch.tensor(vals, dtype=torch.float32)
