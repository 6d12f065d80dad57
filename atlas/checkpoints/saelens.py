"""SAELens SAEs: a folder with ``cfg.json`` + ``sae_weights.safetensors`` (S = 1).

Tensors ``W_enc[d, F]``, ``W_dec[F, d]``, ``b_enc[F]``, ``b_dec[d]``; JumpReLU adds ``threshold[F]``;
gated SAEs have ``b_gate``, ``b_mag``, ``r_mag`` instead of ``b_enc`` (read as the equivalent JumpReLU);
training-time BatchTopK files store ``topk_threshold``. The cfg names the ``architecture`` (``standard``,
``jumprelu``, ``topk``, ``batchtopk``, ``matryoshka_batchtopk``, ``gated``), ``d_in``, ``d_sae``, ``k``,
``apply_b_dec_to_input`` (encode ``x − b_dec``; folded into ``b_enc``), ``normalize_activations``
(``none``; ``expected_average_only_in``: a factor kept in ``activation_scaler.json`` when the trainer saved
one, otherwise estimated; ``constant_norm_rescale`` / ``layer_norm``: per-token, kept as ``input_norm``)
and ``rescale_acts_by_decoder_norm`` (TopK; folded into the weights). The hook point and model are in
``metadata.hook_name`` / ``metadata.model_name`` since SAELens 6, at the top level (``hook_name`` or
``hook_point``) before.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..crosscoder import Crosscoder, Source
from ..errors import AtlasError
from .common import (
    Options,
    apply_scale,
    cfg_int,
    cfg_number,
    complete_models,
    complete_sites,
    expect_shape,
    f32,
    require,
)
from .files import RawCheckpoint, fmt_shape, read_json

NAME = "saelens"
LABEL = "SAELens SAE"
FILES = "cfg.json + sae_weights.safetensors (W_enc[d,F], W_dec[F,d], b_enc[F], b_dec[d], threshold[F])"

SUPPORTED = ("standard", "jumprelu", "topk", "batchtopk", "matryoshka_batchtopk", "gated")


def sniff(raw: RawCheckpoint) -> bool:
    w = raw.state.get("W_enc")
    return w is not None and w.dim() == 2 and (raw.folder / "cfg.json").is_file()


def _get(cfg: dict, key: str):
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    for section in (meta, cfg):
        if section.get(key) not in (None, ""):
            return section[key]
    return None


def _architecture(cfg: dict, raw: RawCheckpoint) -> tuple[str, int | float | None]:
    arch = cfg.get("architecture")
    k = cfg.get("k")
    act_fn = cfg.get("activation_fn") or cfg.get("activation_fn_str")
    kwargs = cfg.get("activation_fn_kwargs") if isinstance(cfg.get("activation_fn_kwargs"), dict) else {}
    if arch is None:  # before SAELens 6: the activation function decides
        arch = "topk" if act_fn == "topk" else ("jumprelu" if "threshold" in raw.state else "standard")
    if arch == "topk" and k is None:
        k = kwargs.get("k")
    if k is not None:
        k = cfg_number(k, "k", raw.folder / "cfg.json", float)
        if arch == "topk":
            k = cfg_number(k, "k", raw.folder / "cfg.json", int)
    return str(arch), k


def convert(raw: RawCheckpoint, opts: Options) -> Crosscoder:
    cfg_path = raw.folder / "cfg.json"
    if not cfg_path.is_file():
        raise AtlasError(
            f"{raw.path} looks like a SAELens SAE but has no cfg.json beside it; put the cfg.json that SAELens "
            "saved with it in the same folder"
        )
    cfg = read_json(cfg_path)
    opts.notes.append(f"config: {cfg_path}")
    arch, k = _architecture(cfg, raw)
    if arch not in SUPPORTED:
        raise AtlasError(
            f"{cfg_path}: SAELens architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED)}"
        )
    st = raw.state
    W_enc = f32(require(raw, "W_enc", LABEL, 2))
    d, F = W_enc.shape
    W_dec = f32(require(raw, "W_dec", LABEL, 2))
    expect_shape(raw, "W_dec", W_dec, (F, d), f"W_enc {fmt_shape(W_enc.shape)}")
    b_dec = f32(require(raw, "b_dec", LABEL, 1))
    expect_shape(raw, "b_dec", b_dec, (d,), f"W_enc {fmt_shape(W_enc.shape)}")
    cfg_int(cfg, "d_in", cfg_path, d, "d_in (W_enc.shape[0])")
    cfg_int(cfg, "d_sae", cfg_path, F, "features (W_enc.shape[1])")

    act, threshold = "relu", None
    if arch == "gated":
        r_mag = f32(require(raw, "r_mag", LABEL, 1))
        b_gate = f32(require(raw, "b_gate", LABEL, 1))
        b_mag = f32(require(raw, "b_mag", LABEL, 1))
        for name, t in (("r_mag", r_mag), ("b_gate", b_gate), ("b_mag", b_mag)):
            expect_shape(raw, name, t, (F,), f"W_enc {fmt_shape(W_enc.shape)}")
        gain = torch.exp(r_mag)
        W_enc = W_enc * gain[None, :]
        b_enc = b_mag
        threshold = b_mag - gain * b_gate
        act = "jumprelu"
        opts.notes.append("gated SAE read as the equivalent JumpReLU (gate > 0 ⇔ magnitude pre-activation > b_mag − e^r_mag·b_gate)")
    else:
        b_enc = f32(require(raw, "b_enc", LABEL, 1))
        expect_shape(raw, "b_enc", b_enc, (F,), f"W_enc {fmt_shape(W_enc.shape)}")
    if arch == "jumprelu":
        act = "jumprelu"
        if "threshold" in st:
            threshold = f32(require(raw, "threshold", LABEL, (0, 1)))
        elif "log_threshold" in st:
            threshold = torch.exp(f32(require(raw, "log_threshold", LABEL, (0, 1))))
        else:
            raise AtlasError(f"{raw.path}: a JumpReLU SAE without threshold (or log_threshold); the file is incomplete")
    elif arch in ("topk",):
        act = "topk"
        if k is None:
            raise AtlasError(f"{cfg_path}: a TopK SAE cfg without k; add \"k\" to cfg.json")
    elif arch in ("batchtopk", "matryoshka_batchtopk"):
        act = "batchtopk"
        if "topk_threshold" in st:
            threshold = f32(st["topk_threshold"])
            if threshold.numel() != 1:
                raise AtlasError(f"{raw.path}: topk_threshold has shape {fmt_shape(threshold.shape)}; one value expected")
            threshold = threshold.reshape(())
        elif "threshold" in st:  # saved for inference: the same value for every feature
            threshold = f32(st["threshold"]).reshape(-1)
            if threshold.numel() == 0 or not bool((threshold == threshold[0]).all()):
                raise AtlasError(f"{raw.path}: a BatchTopK SAE with per-feature thresholds; set architecture to jumprelu in cfg.json")
            threshold = threshold[0].reshape(())
        else:
            raise AtlasError(f"{raw.path}: a BatchTopK SAE without topk_threshold; save it with save_inference_model")
        if float(threshold) <= 0:
            opts.warnings.append(f"BatchTopK threshold is {float(threshold):g}: every positive activation counts")

    if cfg.get("finetuning_scaling_factor") and "scaling_factor" in st:
        sf = f32(st["scaling_factor"])
        expect_shape(raw, "scaling_factor", sf, (F,), f"W_enc {fmt_shape(W_enc.shape)}")
        W_dec = W_dec * sf[:, None]
        opts.notes.append("finetuning scaling_factor folded into W_dec")

    if cfg.get("rescale_acts_by_decoder_norm") and act in ("topk", "batchtopk"):
        n = W_dec.norm(dim=-1)
        # encode: (x W_enc + b_enc) · ‖W_dec‖; decode: (f / ‖W_dec‖) W_dec. Thresholds already apply to
        # the rescaled value.
        W_enc, b_enc, W_dec = W_enc * n[None, :], b_enc * n, W_dec / n.clamp_min(1e-12)[:, None]
        opts.notes.append("rescale_acts_by_decoder_norm folded into the weights")

    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if apply_b_dec:
        b_enc = b_enc - b_dec @ W_enc
        opts.notes.append("apply_b_dec_to_input: encode(x − b_dec) folded into b_enc")

    model_name = _get(cfg, "model_name")
    hook = _get(cfg, "hook_name") or _get(cfg, "hook_point")
    head = _get(cfg, "hook_head_index")
    if head is not None:  # one head of hook_z: its d_head columns (atlas.models ``hook_z.headH``)
        head = cfg_number(head, "hook_head_index", cfg_path)
        if isinstance(hook, str) and re.fullmatch(r"blocks\.\d+\.(attn\.)?hook_z", hook) and head >= 0:
            hook = f"{hook}.head{head}"
            opts.notes.append(f"hook_head_index {head}: reads head {head} of {hook.rsplit('.', 1)[0]}")
        else:
            msg = f"the SAE reads one attention head (hook_head_index {head}) of {hook!r}; only hook_z heads are supported"
            if opts.strict:
                raise AtlasError(f"{cfg_path}: {msg}: use an SAE trained on a supported hook")
            opts.warnings.append(msg)
    desc = f"its cfg ({cfg_path.name})"
    model = complete_models(1, [model_name] if isinstance(model_name, str) else [], opts, desc)[0]
    site = complete_sites(1, [hook] if isinstance(hook, str) else None, opts, desc)[0]

    cc = Crosscoder(
        W_enc=W_enc[None].contiguous(), W_dec=W_dec[:, None, :].contiguous(), b_enc=b_enc, b_dec=b_dec[None],
        sources=[Source(model, site)], activation=act, threshold=threshold,
        k=int(k) if act == "topk" else None, format=NAME, path=str(raw.path),
    )
    cc.extra["architecture"] = arch
    if act == "batchtopk" and k is not None:
        cc.extra["k"] = k
    if cfg.get("reshape_activations") == "hook_z" or (isinstance(hook, str) and hook.endswith("hook_z")):
        cc.extra["reshape"] = "hook_z"
        opts.notes.append("reads hook_z flattened over heads ([n_heads × d_head])")

    norm = cfg.get("normalize_activations")
    if isinstance(norm, bool):
        norm = "expected_average_only_in" if norm else "none"
    norm = norm or "none"
    if norm == "none":
        apply_scale(cc, opts, torch.ones(1), "none needed: the SAE reads raw activations (normalize_activations: none)")
    elif norm == "expected_average_only_in":
        factor = _scaler_factor(raw.folder)
        if factor is not None:
            apply_scale(cc, opts, torch.tensor([factor]), f"stored in activation_scaler.json: {factor:.6g}")
        else:
            apply_scale(cc, opts, None, "", "not stored (normalize_activations: expected_average_only_in, no "
                        "activation_scaler.json): estimated over the corpus at analysis time (average norm "
                        "sqrt(d)); pass --scale to set it")
    elif norm in ("constant_norm_rescale", "layer_norm"):
        cc.input_norm = norm
        apply_scale(cc, opts, torch.ones(1), f"per token ({norm}), applied before encoding")
    else:
        raise AtlasError(f"{cfg_path}: normalize_activations {norm!r} is not supported; supported: none, "
                         "expected_average_only_in, constant_norm_rescale, layer_norm")
    return cc


def _scaler_factor(folder: Path) -> float | None:
    p = folder / "activation_scaler.json"
    if not p.is_file():
        return None
    data = read_json(p)
    v = data.get("scaling_factor")
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise AtlasError(f"{p}: scaling_factor {v!r} is not a number; fix the file or pass --scale") from None
    if not v > 0:
        raise AtlasError(f"{p}: scaling_factor {v} is not positive; fix the file or pass --scale")
    return v
