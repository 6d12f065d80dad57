"""The text ``atlas inspect`` prints for a checkpoint."""

from __future__ import annotations

from ..crosscoder import Crosscoder
from .common import UNKNOWN_MODEL, UNKNOWN_SITE
from .files import RawCheckpoint, fmt_shape

_MAX_TENSORS = 14


def _activation(cc: Crosscoder) -> str:
    if cc.activation == "relu":
        return "relu"
    if cc.activation == "jumprelu":
        t = cc.threshold.reshape(-1)
        return (f"jumprelu (per-feature threshold: min {float(t.min()):.4g}, median {float(t.median()):.4g}, "
                f"max {float(t.max()):.4g})")
    if cc.activation == "topk":
        return f"topk (k = {cc.k} per token)"
    if cc.activation == "batchtopk":
        k = cc.extra.get("k")
        ktxt = f"trained with k = {k}; " if k is not None else ""
        on = "the code-normalised activation" if cc.act_scale is not None else "the activation"
        if cc.threshold is None:
            return (f"batchtopk (k = {cc.k} per token on average; no inference threshold saved: the analysis "
                    f"estimates it over the corpus's first batches, on {on})")
        return f"batchtopk ({ktxt}inference threshold {float(cc.threshold):.4g} on {on})"
    return cc.activation


def _grid(cc: Crosscoder) -> tuple[int, int]:
    """(models, sites) of the source list, placeholders counted as distinct models."""
    if cc.extra.get("grid"):
        M, P = cc.extra["grid"]
        return int(M), int(P)
    S = len(cc.sources)
    models = [s.model for s in cc.sources]
    sites = {s.site for s in cc.sources}
    if len(sites) == 1:
        return S, 1
    if len(set(models)) == 1 and models[0] != UNKNOWN_MODEL:
        return 1, S
    return len(set(models)), len(sites)


def _dtype(cc: Crosscoder, raw: RawCheckpoint) -> str:
    stored = list(raw.stored_dtypes)
    if not stored or stored == ["float32"]:
        text = "float32"
    else:
        text = f"{', '.join(stored)} (converted to float32 on load)"
    if cc.extra.get("cfg_dtype"):
        text += f"; cfg enc_dtype {cc.extra['cfg_dtype']}"
    return text


def describe(cc: Crosscoder, raw: RawCheckpoint, label: str, warnings: list[str]) -> str:
    S, d, F = cc.W_enc.shape
    lines = [
        f"Checkpoint     {raw.path}",
        f"Format         {label}",
    ]
    cls = cc.extra.get("class") or cc.extra.get("architecture")
    if cls:
        lines[-1] += f" ({cls})"
    kind = "SAE (one source)" if S == 1 else f"crosscoder, {S} sources"
    if S > 1:
        M, P = _grid(cc)
        kind += f" ({M} model{'s' if M != 1 else ''} × {P} site{'s' if P != 1 else ''})"
    lines.append(f"Kind           {kind}")
    lines.append("Sources")
    width = max(len(s.model) for s in cc.sources)
    for i, s in enumerate(cc.sources):
        lines.append(f"  {i:>3}  {s.model:<{width}}  {s.site}")
    lines.append(f"Dictionary     {F:,} features, d_model {d}")
    lines.append(f"Shapes         W_enc {fmt_shape(cc.W_enc.shape)}  W_dec {fmt_shape(cc.W_dec.shape)}  "
                 f"b_enc {fmt_shape(cc.b_enc.shape)}  b_dec {fmt_shape(cc.b_dec.shape)}")
    stored = sorted(raw.shapes.items())
    tensors = ", ".join(f"{k} {fmt_shape(v)}" for k, v in stored[:_MAX_TENSORS])
    if len(stored) > _MAX_TENSORS:
        tensors += f", … ({len(stored)} tensors)"
    lines.append(f"Stored         {tensors}")
    lines.append(f"Dtype          {_dtype(cc, raw)}")
    lines.append(f"Activation     {_activation(cc)}")
    if cc.act_scale is not None:
        norm = cc.extra.get("code_normalization", "")
        lines.append(f"Shown value    encoded activation × code normalisation {norm} per feature "
                     f"(range {float(cc.act_scale.min()):.4g}–{float(cc.act_scale.max()):.4g})")
    lines.append(f"Normalisation  {cc.extra.get('normalisation', 'unknown')}")
    if cc.input_norm:
        lines.append(f"Per token      {cc.input_norm}")
    dec_norms = cc.W_dec.norm(dim=-1)  # [F, S]
    per_source = ", ".join(f"{float(v):.4g}" for v in dec_norms.mean(0)[:8])
    lines.append(f"Decoder norms  mean per source: {per_source}{', …' if S > 8 else ''}")
    missing = [o for o, bad in (("--model", any(s.model == UNKNOWN_MODEL for s in cc.sources)),
                                ("--hook-point", any(s.site == UNKNOWN_SITE for s in cc.sources))) if bad]
    if missing:
        lines.append(f"Needs          {' and '.join(missing)} before `atlas build` can run this checkpoint")
    notes = cc.extra.get("notes", [])
    if notes:
        lines.append("Notes")
        lines += [f"  - {n}" for n in notes]
    lines.append("Warnings" + ("" if warnings else "       none"))
    lines += [f"  - {w}" for w in warnings]
    return "\n".join(lines)
