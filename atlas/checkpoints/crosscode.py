"""crosscode (oli-clive-griffin/crosscode, formerly model-diffing): ``model.pt`` + ``model_cfg.yaml``.

Tensors ``_W_enc_XiDiL[*Xi, d, F]``, ``_W_dec_LXoDo[F, *Xo, d]``, ``b_enc_L[F]`` (absent without encoder
bias), ``_b_dec_XoDo[*Xo, d]`` (absent without decoder bias), the JumpReLU log-threshold ``[F]`` (threshold =
exp; its key differs between versions: :data:`LOG_THRESHOLD_KEYS`), and the buffers
``folded_scaling_factors_in_Xi``, ``folded_scaling_factors_out_Xo``, ``is_folded``. The crosscoding dims
``Xi`` are ``(M, P)`` for a models × hookpoints crosscoder (S = M·P, model-major), ``()`` for an SAE. The
trainer saves checkpoints with the normalisation factors folded into the weights (``is_folded``); they are
unfolded here into ``input_scale`` so that ``W_dec`` stays in the space the crosscoder was trained in.
``model_cfg.yaml`` names the activation function (``ReLUActivation``, ``AnthropicSTEJumpReLUActivation``,
``TopkActivation`` ``{k}``, ``BatchTopkActivation`` ``{k_per_example}``: no inference threshold is saved, the
analysis estimates it) and the dims; model ids and hook points come from the run's ``experiment_config.yaml``
(``data.activations_harvester.llms[].name``, ``hookpoints``) one or two folders up, or from the options.
"""

from __future__ import annotations

import math

import torch

from ..crosscoder import Crosscoder
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
    grid_sources,
    require,
    scalar,
)
from .files import RawCheckpoint, find_file, fmt_shape, read_yaml

NAME = "crosscode"
LABEL = "crosscode crosscoder"
FILES = "model.pt + model_cfg.yaml (_W_enc_XiDiL, _W_dec_LXoDo, b_enc_L, _b_dec_XoDo)"

JUMPRELU_CLASSES = ("AnthropicSTEJumpReLUActivation", "JumpReLUActivationFunction")

#: The JumpReLU log-threshold's state-dict key, in the order tried. crosscode's JumpReLU module is the
#: crosscoder's ``_activation_fn`` since 31 March 2025, ``activation_fn`` before that and
#: ``hidden_activation`` in its first versions; its parameter is ``log_threshold_L`` since the ``_W_enc_XiDiL``
#: weights (28 March 2025), ``log_threshold_H`` before, and plain ``log_threshold`` in some saved files.
#: Every combination is accepted; ``atlas inspect`` names the key found (a note ``JumpReLU threshold =
#: exp(KEY)``).
LOG_THRESHOLD_KEYS = tuple(f"{module}.{param}" for module in ("_activation_fn", "activation_fn", "hidden_activation")
                           for param in ("log_threshold_L", "log_threshold", "log_threshold_H"))


def sniff(raw: RawCheckpoint) -> bool:
    return "_W_enc_XiDiL" in raw.state


def convert(raw: RawCheckpoint, opts: Options) -> Crosscoder:
    st = raw.state
    W_enc_x = require(raw, "_W_enc_XiDiL", LABEL)
    W_dec_x = require(raw, "_W_dec_LXoDo", LABEL)
    if W_enc_x.dim() < 2 or W_dec_x.dim() < 2:
        raise AtlasError(f"{raw.path}: _W_enc_XiDiL {fmt_shape(W_enc_x.shape)} / _W_dec_LXoDo {fmt_shape(W_dec_x.shape)} have too few dimensions")
    Xi, d, F = tuple(W_enc_x.shape[:-2]), W_enc_x.shape[-2], W_enc_x.shape[-1]
    Xo, d_out = tuple(W_dec_x.shape[1:-1]), W_dec_x.shape[-1]
    if W_dec_x.shape[0] != F:
        raise AtlasError(
            f"{raw.path}: _W_dec_LXoDo {fmt_shape(W_dec_x.shape)} has {W_dec_x.shape[0]} latents but "
            f"_W_enc_XiDiL {fmt_shape(W_enc_x.shape)} has {F}; the tensors do not belong together"
        )
    if Xi != Xo or d != d_out:
        raise AtlasError(
            f"{raw.path}: reads {fmt_shape(Xi + (d,))} but writes {fmt_shape(Xo + (d_out,))}: a transcoder or "
            "cross-layer transcoder, not a crosscoder; only crosscoders and SAEs are supported"
        )
    S = math.prod(Xi) if Xi else 1

    cfg_path = raw.folder / "model_cfg.yaml"
    cfg = read_yaml(cfg_path) if cfg_path.is_file() else {}
    if cfg:
        opts.notes.append(f"config: {cfg_path}")
        cfg_int(cfg, "d_model", cfg_path, d, "d_model")
        cfg_int(cfg, "n_latents", cfg_path, F, "latents")

    W_enc = f32(W_enc_x).reshape(S, d, F)
    W_dec = f32(W_dec_x).reshape(F, S, d)
    b_enc = f32(require(raw, "b_enc_L", LABEL, 1)) if "b_enc_L" in st else torch.zeros(F)
    b_dec = f32(require(raw, "_b_dec_XoDo", LABEL)).reshape(-1) if "_b_dec_XoDo" in st else torch.zeros(S * d)
    if b_dec.numel() != S * d:
        raise AtlasError(f"{raw.path}: _b_dec_XoDo {fmt_shape(st['_b_dec_XoDo'].shape)} does not match {fmt_shape(Xi + (d,))}")
    b_dec = b_dec.reshape(S, d)
    expect_shape(raw, "b_enc_L", b_enc, (F,), f"_W_enc_XiDiL {fmt_shape(W_enc_x.shape)}")

    act, threshold, k = _activation(raw, cfg, cfg_path, F, opts)

    # unfold the normalisation factors the trainer folded in before saving
    stored, stored_desc = None, ""
    folded = "is_folded" in st and bool(scalar(raw, "is_folded"))
    if folded:
        s_in = f32(st.get("folded_scaling_factors_in_Xi", torch.ones(Xi))).reshape(-1)
        s_out = f32(st.get("folded_scaling_factors_out_Xo", s_in)).reshape(-1)
        if s_in.numel() != S or s_out.numel() != S or not bool(torch.isfinite(s_in).all()) or bool((s_in <= 0).any()):
            raise AtlasError(f"{raw.path}: folded_scaling_factors have an unexpected shape or non-positive values; re-save the checkpoint")
        if torch.allclose(s_in, s_out, rtol=1e-5):
            W_enc = W_enc / s_in[:, None, None]
            W_dec = W_dec * s_out[None, :, None]
            b_dec = b_dec * s_out[:, None]
            stored = s_in
            stored_desc = f"stored (folded_scaling_factors, unfolded here): {[round(float(v), 6) for v in s_in[:8]]}"
        else:
            stored = torch.ones(S)
            stored_desc = "folded into the weights (input and output factors differ): reads raw activations"
    else:
        stored_desc = ""
        opts.notes.append("is_folded is false: the weights expect normalised activations whose factors were not saved")

    models, sites = _sources(raw, cfg, Xi, opts)
    cc = Crosscoder(
        W_enc=W_enc.contiguous(), W_dec=W_dec.contiguous(), b_enc=b_enc, b_dec=b_dec.contiguous(),
        sources=grid_sources(models, sites), activation=act, threshold=threshold, k=k,
        format=NAME, path=str(raw.path),
    )
    cc.extra["grid"] = [len(models), len(sites)]
    apply_scale(cc, opts, stored, stored_desc)
    return cc


def _activation(raw: RawCheckpoint, cfg: dict, cfg_path, F: int, opts: Options):
    spec = cfg.get("activation_fn") if isinstance(cfg.get("activation_fn"), dict) else None
    th_key = next((key for key in LOG_THRESHOLD_KEYS if key in raw.state), None)
    log_th = raw.state.get(th_key) if th_key is not None else None
    if spec is None:
        if not cfg and log_th is None:
            raise AtlasError(
                f"{raw.path}: no model_cfg.yaml beside it, and it names the activation function; put the "
                "model_cfg.yaml that crosscode saved with the weights in the same folder"
            )
        cls = JUMPRELU_CLASSES[0] if log_th is not None else "ReLUActivation"
        params: dict = {}
        opts.notes.append(f"activation function not in a config: {cls} inferred from the tensors")
    else:
        cls = str(spec.get("classname", ""))
        params = spec.get("cfg") if isinstance(spec.get("cfg"), dict) else {}
    if cls == "ReLUActivation":
        return "relu", None, None
    if cls in JUMPRELU_CLASSES:
        if log_th is None:
            raise AtlasError(f"{raw.path}: a JumpReLU crosscoder without its log-threshold (none of the keys "
                             f"{', '.join(LOG_THRESHOLD_KEYS)}); the file is incomplete: re-save the crosscoder's "
                             "whole state dict")
        if log_th.numel() != F:
            raise AtlasError(f"{raw.path}: {th_key} has {log_th.numel()} values for {F} latents; the file is damaged")
        opts.notes.append(f"JumpReLU threshold = exp({th_key})")
        return "jumprelu", torch.exp(f32(log_th)).reshape(F), None
    if cls == "TopkActivation":
        if params.get("k") is None:
            raise AtlasError(f"{cfg_path}: TopkActivation without k; fix model_cfg.yaml")
        opts.notes.append("TopK: crosscode keeps the k largest pre-activations even when negative; the atlas shows those as 0")
        return "topk", None, cfg_number(params["k"], "activation_fn.cfg.k", cfg_path)
    if cls == "BatchTopkActivation":
        k = params.get("k_per_example")
        if k is None:
            raise AtlasError(f"{cfg_path}: BatchTopkActivation without k_per_example; fix model_cfg.yaml")
        opts.notes.append(
            f"BatchTopK (k = {k} per token on average) saved without an inference threshold: the analysis "
            "estimates one over the corpus's first batches, as BatchTopK trainers do"
        )
        return "batchtopk", None, cfg_number(k, "activation_fn.cfg.k_per_example", cfg_path)
    raise AtlasError(
        f"{cfg_path}: activation function {cls!r} is not supported; supported: ReLUActivation, "
        "AnthropicSTEJumpReLUActivation, TopkActivation, BatchTopkActivation"
    )


def _experiment_config(raw: RawCheckpoint, opts: Options) -> dict:
    path = find_file(raw.folder, ("experiment_config.yaml",), up=2)
    if path is None:
        return {}
    opts.notes.append(f"run config: {path}")
    return read_yaml(path)


def _sources(raw: RawCheckpoint, cfg: dict, Xi: tuple[int, ...], opts: Options) -> tuple[list[str], list[str]]:
    exp = _experiment_config(raw, opts)
    data = exp.get("data") if isinstance(exp.get("data"), dict) else {}
    harvester = data.get("activations_harvester") if isinstance(data.get("activations_harvester"), dict) else {}
    llms = harvester.get("llms")
    cfg_models: list[str] = []
    if isinstance(llms, list):
        for llm in llms:
            if isinstance(llm, dict) and llm.get("name"):
                cfg_models.append(str(llm["name"]))
                if llm.get("revision"):
                    opts.notes.append(f"model {llm['name']} was trained at revision {llm['revision']}")
            elif isinstance(llm, str):
                cfg_models.append(llm)
    hookpoints = cfg.get("hookpoints") if isinstance(cfg.get("hookpoints"), list) else exp.get("hookpoints")
    hookpoints = [str(h) for h in hookpoints] if isinstance(hookpoints, list) else None

    if len(Xi) == 2:
        M, P = Xi
    elif len(Xi) == 1:  # a single crosscoding dim: hookpoints if the configs say so, else models
        n_hp = cfg.get("n_hookpoints", len(hookpoints) if hookpoints else None)
        if n_hp == Xi[0] and cfg.get("n_models", 1) == 1:
            M, P = 1, Xi[0]
        else:
            M, P = Xi[0], 1
    elif len(Xi) == 0:
        M, P = 1, 1
    else:
        raise AtlasError(f"{raw.path}: {len(Xi)} crosscoding dims {fmt_shape(Xi)}; only models × hookpoints grids are supported")
    if cfg.get("n_models") is not None and len(Xi) == 2:
        cfg_int(cfg, "n_models", raw.folder / "model_cfg.yaml", M, "models (dim 0)")
    desc = "the run's experiment_config.yaml" if exp else "the checkpoint (no experiment_config.yaml found)"
    models = complete_models(M, cfg_models[:M] if len(cfg_models) >= M else cfg_models, opts, desc)
    sites = complete_sites(P, hookpoints if hookpoints and len(hookpoints) == P else None, opts, desc)
    return models, sites
