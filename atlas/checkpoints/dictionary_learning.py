"""dictionary_learning checkpoints: CrossCoder / BatchTopKCrossCoder and the single-layer SAEs.

Crosscoders (science-of-finetuning fork): a ``.pt`` state dict, or the hub layout ``config.json`` +
``model.safetensors``. Keys (any may carry torch.compile's ``_orig_mod.`` prefix):

- ``encoder.weight[S, d, F]``, ``encoder.bias[F]``, ``decoder.weight[S, F, d]`` (note the axis order),
  ``decoder.bias[S, d]``
- ``code_normalization_id`` (1 CROSSCODER, 2 SAE, 3 MIXED, 4 NONE, 5 DECOUPLED; absent in older files,
  where the library assumes CROSSCODER)
- BatchTopK: ``k`` and the inference ``threshold``
- newer: ``activation_mean[S, d]``, ``activation_std[S, d]``, ``target_rms``, ``activation_global_scale[S]``
  (NaN mean/std mean "no normaliser")

The library's ``get_activations`` (what its dashboards show) is ``encode(x) × code_norm[f]`` with
code_norm = Σ_s ‖W_dec[s, f]‖ for CROSSCODER; the BatchTopK threshold applies to that scaled value. The
normaliser computes ``(x − activation_mean) × activation_global_scale``: the scale becomes
``input_scale`` and the mean is folded into ``b_enc`` (and ``b_dec``).

SAEs (``ae.pt`` + ``config.json`` with a ``trainer`` section): ``AutoEncoder`` (``bias[d]``,
``encoder.weight[F, d]``, ``encoder.bias[F]``, ``decoder.weight[d, F]``; encode relu(W(x − bias) + b)),
``AutoEncoderNew`` (``decoder.bias``; no input offset), ``AutoEncoderTopK`` / ``BatchTopKSAE`` (``b_dec``,
``k``, ``threshold``; input offset ``b_dec``), ``GatedAutoEncoder`` (``decoder_bias``, ``r_mag``,
``gate_bias``, ``mag_bias``; mapped exactly onto a JumpReLU) and ``JumpReluAutoEncoder`` (``W_enc[d, F]``,
``b_enc``, ``W_dec[F, d]``, ``b_dec``, ``threshold``). The model id and layer come from ``config.json``
(``trainer.lm_name``, ``trainer.submodule_name`` / ``trainer.layer``) or from ``--model`` / ``--hook-point``.
"""

from __future__ import annotations

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
    int_scalar,
    scalar,
    site_from_submodule,
)
from .files import RawCheckpoint, find_file, fmt_shape, read_json

NAME = "dictionary_learning"
LABEL = "dictionary_learning CrossCoder"
FILES = "crosscoder .pt state dict, or config.json + model.safetensors (encoder.weight[S,d,F], decoder.weight[S,F,d], ...)"

SAE_NAME = "dictionary_learning_sae"
SAE_LABEL = "dictionary_learning SAE"
SAE_FILES = "ae.pt + config.json (AutoEncoder, AutoEncoderTopK, BatchTopKSAE, GatedAutoEncoder, JumpReluAutoEncoder)"

CODE_NORMS = {1: "CROSSCODER", 2: "SAE", 3: "MIXED", 4: "NONE", 5: "DECOUPLED"}


def sniff(raw: RawCheckpoint) -> bool:
    w = raw.state.get("encoder.weight")
    return w is not None and w.dim() == 3


def sniff_sae(raw: RawCheckpoint) -> bool:
    w = raw.state.get("encoder.weight")
    if w is not None and w.dim() == 2:
        return True
    # JumpReluAutoEncoder uses SAELens-like names; without a SAELens cfg.json it is dictionary_learning's.
    w = raw.state.get("W_enc")
    return w is not None and w.dim() == 2 and "threshold" in raw.state and _saelens_cfg(raw) is None


def _saelens_cfg(raw: RawCheckpoint) -> Path | None:
    p = raw.folder / "cfg.json"
    return p if p.is_file() else None


# --------------------------------------------------------------------------- config


def _config(raw: RawCheckpoint, opts: Options) -> tuple[dict, Path | None]:
    """The run's config: ``config.json`` beside the weights (or one folder up, for ``checkpoints/``)."""
    meta_cfg = raw.meta.get("config")
    if isinstance(meta_cfg, dict):  # dictionary_learning's resumable backup ae.pt stores it inside
        return ({"trainer": meta_cfg} if "trainer" not in meta_cfg else meta_cfg), raw.path
    path = find_file(raw.folder, ("config.json",), up=1)
    if path is None:
        return {}, None
    cfg = read_json(path)
    trainer = cfg.get("trainer") if isinstance(cfg.get("trainer"), dict) else cfg
    keys = {"dict_class", "activation_dim", "dict_size", "trainer_class", "lm_name", "num_layers", "code_normalization"}
    if not keys & set(trainer):
        opts.warnings.append(f"ignored {path}: it is not a dictionary_learning config")
        return {}, None
    opts.notes.append(f"config: {path}")
    return cfg, path


def _trainer(cfg: dict) -> dict:
    t = cfg.get("trainer")
    return t if isinstance(t, dict) else cfg


def _lookup(cfg: dict, *keys):
    """First present key in the trainer section, then the top level, then ``buffer``."""
    for section in (_trainer(cfg), cfg, cfg.get("buffer") if isinstance(cfg.get("buffer"), dict) else {}):
        for k in keys:
            if section.get(k) not in (None, ""):
                return section[k]
    return None


def _cfg_models(cfg: dict) -> list[str]:
    models = _lookup(cfg, "model_names", "models", "lm_names")
    if isinstance(models, list) and all(isinstance(m, str) for m in models):
        return models
    pair = [_lookup(cfg, "base_model", "base_model_name"),
            _lookup(cfg, "chat_model", "instruct_model", "ft_model", "finetuned_model", "chat_model_name")]
    if all(isinstance(p, str) for p in pair):
        return pair
    return []


def _cfg_site(cfg: dict, opts: Options) -> str | None:
    hp = _lookup(cfg, "hook_point", "hook_name")
    if isinstance(hp, str):
        return hp
    sub = _lookup(cfg, "submodule_name")
    if isinstance(sub, str):
        site = site_from_submodule(sub)
        if site != sub:
            opts.notes.append(f"submodule {sub!r} read as {site}")
        return site
    layer = _lookup(cfg, "layer")
    if isinstance(layer, int) and not isinstance(layer, bool):
        site = f"blocks.{layer}.hook_resid_post"
        opts.notes.append(f"layer {layer} from the config read as {site} (the block's output); pass --hook-point otherwise")
        return site
    return None


# --------------------------------------------------------------------------- normaliser


def _normaliser(raw: RawCheckpoint, S: int, d: int, opts: Options):
    """(mean[S, d], scale[S]) of dictionary_learning's NormalizableMixin, or None without one."""
    mean = raw.state.get("activation_mean")
    std = raw.state.get("activation_std")
    if mean is None or std is None:
        return None
    mean = f32(mean).reshape(S, d) if mean.numel() == S * d else None
    std = f32(std).reshape(S, d) if std.numel() == S * d else None
    if mean is None or std is None:
        raise AtlasError(
            f"{raw.path}: activation_mean/activation_std have shapes {fmt_shape(raw.state['activation_mean'].shape)}/"
            f"{fmt_shape(raw.state['activation_std'].shape)}, expected {fmt_shape((S, d))}; the file is inconsistent"
        )
    if torch.isnan(mean).any() or torch.isnan(std).any():
        return None  # the library's marker for "no normaliser"
    g = raw.state.get("activation_global_scale")
    if g is not None:
        g = f32(g).reshape(-1)
        if g.numel() != S:
            raise AtlasError(f"{raw.path}: activation_global_scale has {g.numel()} values for {S} sources; the file is inconsistent")
    else:
        rms = scalar(raw, "target_rms") if "target_rms" in raw.state else 1.0
        g = (rms / torch.sqrt((std.double() ** 2).sum(-1) + 1e-8)).float()
        opts.notes.append("activation_global_scale not stored: computed as target_rms / sqrt(Σ activation_std²)")
    return mean, g


def _fold_mean(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, mean: torch.Tensor, g: torch.Tensor):
    """Fold ``x − mean`` (inputs scaled by g afterwards) into the biases (no copy of ``W_enc``)."""
    offset = mean * g[:, None]  # [S, d]
    b_enc = b_enc - torch.einsum("sd,sdf->f", offset, W_enc)
    b_dec = b_dec + offset
    return b_enc, b_dec


# --------------------------------------------------------------------------- crosscoder


def convert(raw: RawCheckpoint, opts: Options) -> Crosscoder:
    enc_w = require(raw, "encoder.weight", LABEL, 3)
    enc_b = require(raw, "encoder.bias", LABEL, 1)
    dec_w = require(raw, "decoder.weight", LABEL, 3)
    dec_b = require(raw, "decoder.bias", LABEL, 2)
    S_enc, d, F = enc_w.shape
    S = dec_w.shape[0]
    if tuple(dec_w.shape[1:]) != (F, d):
        expect_shape(raw, "decoder.weight", dec_w, (S_enc, F, d),
                     f"encoder.weight {fmt_shape(enc_w.shape)} (decoder.weight is [S, F, d])")
    if S_enc != S:
        raise AtlasError(
            f"{raw.path}: the encoder reads {S_enc} layers but the decoder writes {S} (encoder_layers); "
            "crosscoders whose encoder reads a subset of the decoder's layers are not supported"
        )
    expect_shape(raw, "decoder.weight", dec_w, (S, F, d), f"encoder.weight {fmt_shape(enc_w.shape)} (decoder.weight is [S, F, d])")
    expect_shape(raw, "decoder.bias", dec_b, (S, d), f"encoder.weight {fmt_shape(enc_w.shape)}")
    expect_shape(raw, "encoder.bias", enc_b, (F,), f"encoder.weight {fmt_shape(enc_w.shape)}")

    cfg, cfg_path = _config(raw, opts)
    trainer = _trainer(cfg)
    if cfg_path is not None and cfg_path != raw.path:
        cfg_int(trainer, "activation_dim", cfg_path, d, "d_model")
        cfg_int(trainer, "dict_size", cfg_path, F, "features")
        cfg_int(trainer, "num_layers", cfg_path, S, "sources")

    W_dec_sfd = f32(dec_w)
    code_norm = _code_normalisation(raw, trainer, opts)
    batchtopk = "k" in raw.state or "threshold" in raw.state or "BatchTopK" in str(trainer.get("dict_class", ""))
    if code_norm == "DECOUPLED" and batchtopk:
        raise AtlasError(
            f"{raw.path}: a BatchTopK crosscoder with DECOUPLED code normalisation has one threshold per layer "
            "and per-layer activations, which the atlas does not support"
        )
    act_scale = _code_norm_scale(code_norm, W_dec_sfd, trainer, opts)

    W_enc = f32(enc_w)
    b_enc, b_dec = f32(enc_b), f32(dec_b)
    norm = _normaliser(raw, S, d, opts)
    if norm is not None:
        mean, g = norm
        b_enc, b_dec = _fold_mean(W_enc, b_enc, b_dec, mean, g)
        stored = g
        stored_desc = (f"stored (activation_mean/activation_global_scale): inputs centred on activation_mean and "
                       f"scaled by {[round(float(v), 6) for v in g[:8]]}")
    else:
        stored = torch.ones(S)
        stored_desc = "none needed: the crosscoder reads raw activations (no activation normaliser stored)"

    models, sites = _crosscoder_sources(S, cfg, cfg_path, opts)
    cc = Crosscoder(
        W_enc=W_enc, W_dec=W_dec_sfd.permute(1, 0, 2).contiguous(), b_enc=b_enc, b_dec=b_dec,
        sources=[Source(m, s) for m, s in zip(models, sites)], format=NAME, path=str(raw.path),
        act_scale=act_scale,
    )
    if batchtopk:
        cc.activation = "batchtopk"
        th = raw.state.get("threshold")
        if th is None:
            raise AtlasError(f"{raw.path}: a BatchTopK crosscoder without its inference threshold; save it after training (the threshold buffer)")
        if th.numel() != 1:
            raise AtlasError(f"{raw.path}: threshold has shape {fmt_shape(th.shape)}; one inference threshold expected")
        cc.threshold = f32(th).reshape(())
        if "k" in raw.state:
            cc.extra["k"] = int_scalar(raw, "k")
        if float(cc.threshold) < 0:
            opts.warnings.append(
                f"BatchTopK threshold is {float(cc.threshold):g} (never calibrated): every positive activation counts, "
                "so features are denser than in training"
            )
    cc.extra["code_normalization"] = code_norm
    apply_scale(cc, opts, stored, stored_desc)
    return cc


def _code_normalisation(raw: RawCheckpoint, trainer: dict, opts: Options) -> str:
    if "code_normalization_id" in raw.state:
        cid = int_scalar(raw, "code_normalization_id")
        if cid not in CODE_NORMS:
            raise AtlasError(f"{raw.path}: unknown code_normalization_id {cid}; known: {CODE_NORMS}")
        return CODE_NORMS[cid]
    named = trainer.get("code_normalization")
    if named is None and isinstance(trainer.get("dict_class_kwargs"), dict):
        named = trainer["dict_class_kwargs"].get("code_normalization")
    if isinstance(named, str) and named.upper() in CODE_NORMS.values():
        return named.upper()
    if isinstance(named, int) and named in CODE_NORMS:
        return CODE_NORMS[named]
    opts.notes.append("no code_normalization_id stored: CROSSCODER assumed (as dictionary_learning does for older files)")
    return "CROSSCODER"


def _code_norm_scale(code_norm: str, W_dec_sfd: torch.Tensor, trainer: dict, opts: Options) -> torch.Tensor | None:
    per_source = W_dec_sfd.norm(dim=2)  # [S, F]
    if code_norm in ("CROSSCODER", "DECOUPLED"):
        return per_source.sum(0)
    if code_norm == "SAE":
        return W_dec_sfd.norm(dim=(0, 2))
    if code_norm == "MIXED":
        kw = trainer.get("dict_class_kwargs") if isinstance(trainer.get("dict_class_kwargs"), dict) else trainer
        a_sae = kw.get("code_normalization_alpha_sae", trainer.get("code_normalization_alpha_sae"))
        a_cc = kw.get("code_normalization_alpha_cc", trainer.get("code_normalization_alpha_cc"))
        if a_sae is None or a_cc is None:
            opts.notes.append("MIXED code normalisation weights not in the config: library defaults alpha_sae=1.0, alpha_cc=0.1")
        a_sae = 1.0 if a_sae is None else cfg_number(a_sae, "code_normalization_alpha_sae", "config.json", float)
        a_cc = 0.1 if a_cc is None else cfg_number(a_cc, "code_normalization_alpha_cc", "config.json", float)
        return W_dec_sfd.norm(dim=(0, 2)) * a_sae + per_source.sum(0) * a_cc
    return None  # NONE


def _crosscoder_sources(S: int, cfg: dict, cfg_path, opts: Options) -> tuple[list[str], list[str]]:
    desc = f"its config ({cfg_path.name})" if cfg_path else "the checkpoint (no config.json beside it)"
    hps = opts.hook_points
    if S > 1 and hps is not None and len(hps) == S:  # one model, S layers
        cfg_models = _cfg_models(cfg)[:1] or ([_lookup(cfg, "lm_name")] if isinstance(_lookup(cfg, "lm_name"), str) else [])
        model = complete_models(1, cfg_models, opts, desc)[0]
        return [model] * S, hps
    models = complete_models(S, _cfg_models(cfg), opts, desc)
    site = _cfg_site(cfg, opts)
    sites = complete_sites(1, [site] if site else None, opts, desc)
    return models, sites * S


# --------------------------------------------------------------------------- SAEs


def convert_sae(raw: RawCheckpoint, opts: Options) -> Crosscoder:
    st = raw.state
    cfg, cfg_path = _config(raw, opts)
    trainer = _trainer(cfg)
    dict_class = str(trainer.get("dict_class", "")) + " " + str(trainer.get("trainer_class", ""))
    act, threshold, k = "relu", None, None
    act_scale = None

    if "W_enc" in st:  # JumpReluAutoEncoder
        kind = "JumpReluAutoEncoder"
        W = require(raw, "W_enc", SAE_LABEL, 2)
        d, F = W.shape
        W_enc = f32(W)
        W_dec = f32(require(raw, "W_dec", SAE_LABEL, 2))
        expect_shape(raw, "W_dec", W_dec, (F, d), f"W_enc {fmt_shape(W.shape)}")
        b_enc = f32(require(raw, "b_enc", SAE_LABEL, 1))
        b_dec = f32(require(raw, "b_dec", SAE_LABEL, 1))
        threshold = f32(require(raw, "threshold", SAE_LABEL, (0, 1)))
        act = "jumprelu"
        offset = None
    else:
        W = require(raw, "encoder.weight", SAE_LABEL, 2)
        F, d = W.shape
        W_enc = f32(W).T.contiguous()  # [d, F]
        dec = require(raw, "decoder.weight", SAE_LABEL, 2)
        expect_shape(raw, "decoder.weight", dec, (d, F), f"encoder.weight {fmt_shape(W.shape)} (nn.Linear stores [out, in])")
        W_dec = f32(dec).T.contiguous()  # [F, d]
        enc_b = st.get("encoder.bias")
        b_enc = f32(enc_b) if enc_b is not None else torch.zeros(F)
        expect_shape(raw, "encoder.bias", b_enc, (F,), f"encoder.weight {fmt_shape(W.shape)}")
        if "r_mag" in st:  # GatedAutoEncoder ≡ JumpReLU on the magnitude path
            kind = "GatedAutoEncoder"
            offset = f32(require(raw, "decoder_bias", SAE_LABEL, 1))
            r_mag = f32(require(raw, "r_mag", SAE_LABEL, 1))
            b_gate = f32(require(raw, "gate_bias", SAE_LABEL, 1))
            b_mag = f32(require(raw, "mag_bias", SAE_LABEL, 1))
            for name, t in (("r_mag", r_mag), ("gate_bias", b_gate), ("mag_bias", b_mag)):
                expect_shape(raw, name, t, (F,), f"encoder.weight {fmt_shape(W.shape)}")
            gain = torch.exp(r_mag)
            W_enc = W_enc * gain[None, :]
            b_enc = b_mag
            threshold = b_mag - gain * b_gate
            b_dec = offset
            act = "jumprelu"
            opts.notes.append("gated SAE read as the equivalent JumpReLU: gate (W(x−b)+b_gate > 0) ⇔ magnitude pre-activation > b_mag − e^r_mag·b_gate")
        elif "bias" in st:  # AutoEncoder
            kind = "AutoEncoder"
            offset = f32(require(raw, "bias", SAE_LABEL, 1))
            b_dec = offset
        elif "b_dec" in st:  # AutoEncoderTopK / BatchTopKSAE
            offset = f32(require(raw, "b_dec", SAE_LABEL, 1))
            b_dec = offset
            if "k" not in st:
                raise AtlasError(f"{raw.path}: a TopK SAE without its k buffer; the file is incomplete")
            k = int_scalar(raw, "k")
            if "BatchTopK" in dict_class:
                kind, act = "BatchTopKSAE", "batchtopk"
                threshold = f32(require(raw, "threshold", SAE_LABEL, (0, 1))).reshape(())
                if float(threshold) < 0:
                    opts.warnings.append(f"BatchTopK threshold is {float(threshold):g} (never calibrated): every positive activation counts")
            else:
                kind, act = "AutoEncoderTopK", "topk"
                if "TopK" not in dict_class:
                    opts.notes.append("no config names the SAE class: read as AutoEncoderTopK (k largest per token); "
                                      "a BatchTopKSAE needs its config.json beside it")
        elif "decoder.bias" in st:  # AutoEncoderNew
            kind = "AutoEncoderNew"
            offset = None
            b_dec = f32(require(raw, "decoder.bias", SAE_LABEL, 1))
        else:
            raise AtlasError(
                f"{raw.path}: a dictionary_learning SAE needs a decoder bias (bias, b_dec, decoder_bias or "
                "decoder.bias); the file is incomplete"
            )
        if offset is not None:
            expect_shape(raw, "decoder bias", offset, (d,), f"encoder.weight {fmt_shape(W.shape)}")
            b_enc = b_enc - offset @ W_enc  # encode(x − offset)
    expect_shape(raw, "encoder bias", b_enc, (F,), f"the encoder weight ({F} features)")
    expect_shape(raw, "decoder bias", b_dec, (d,), f"the encoder weight (d_model {d})")
    if cfg_path is not None and cfg_path != raw.path:
        cfg_int(trainer, "activation_dim", cfg_path, d, "d_model")
        cfg_int(trainer, "dict_size", cfg_path, F, "features")

    W_enc3, W_dec3, b_dec2 = W_enc[None], W_dec[:, None, :], b_dec[None]
    b_enc1 = b_enc
    norm = _normaliser(raw, 1, d, opts)
    if norm is not None:
        mean, g = norm
        b_enc1, b_dec2 = _fold_mean(W_enc3, b_enc1, b_dec2, mean, g)
        stored, stored_desc = g, f"stored (activation_mean/activation_global_scale): scaled by {float(g[0]):.6g}"
    elif isinstance(raw.meta.get("norm_factor"), (int, float)) and float(raw.meta["norm_factor"]) > 0:
        # the resumable backup ae.pt holds the weights mid-training, before norm_factor is folded in
        nf = float(raw.meta["norm_factor"])
        stored, stored_desc = torch.tensor([1.0 / nf]), f"stored (training backup norm_factor {nf:.6g}): inputs divided by it"
    else:
        stored = torch.ones(1)
        stored_desc = "none needed: the SAE reads raw activations (dictionary_learning folds its norm_factor into the saved biases)"

    desc = f"its config ({cfg_path.name})" if cfg_path else "the checkpoint (no config.json beside it)"
    lm = _lookup(cfg, "lm_name")
    model = complete_models(1, [lm] if isinstance(lm, str) else [], opts, desc)[0]
    site = _cfg_site(cfg, opts)
    site = complete_sites(1, [site] if site else None, opts, desc)[0]
    cc = Crosscoder(
        W_enc=W_enc3, W_dec=W_dec3, b_enc=b_enc1, b_dec=b_dec2, sources=[Source(model, site)],
        activation=act, threshold=threshold, k=k, act_scale=act_scale, format=SAE_NAME, path=str(raw.path),
    )
    cc.extra["class"] = kind
    apply_scale(cc, opts, stored, stored_desc)
    return cc
