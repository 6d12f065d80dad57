"""The canonical crosscoder every checkpoint format is mapped onto.

Shapes (S sources, d model width, F features):

- ``W_enc[S, d, F]``, ``W_dec[F, S, d]``, ``b_enc[F]``, ``b_dec[S, d]``
- ``input_scale[S]``: multiply a source's activation by it before encoding (normalisation). ``None`` means
  the checkpoint expects normalised inputs but does not store the factor: the analysis estimates it over
  the corpus (``sqrt(d) / mean‖x‖`` per source, the convention of the training code that omits it).
  A checkpoint that reads raw activations has ``input_scale`` all ones.
- ``input_norm``: ``None``, or a per-token normalisation applied to each source's activation before
  ``input_scale`` (SAELens ``normalize_activations``): ``"constant_norm_rescale"`` (x · sqrt(d) / ‖x‖) or
  ``"layer_norm"`` ((x − mean) / (std + 1e-5) over d).
- ``act_scale[F]``: multiply encoded activations by it before showing them (dictionary_learning's code
  normalisation; ``None`` = ones)
- activation: ``relu``, ``jumprelu`` (``threshold[F]``: relu(pre) where pre > threshold, else 0), ``topk``
  (``k``: the k largest pre-activations, the negative ones among them 0), ``batchtopk`` (inference: ``threshold`` applied to the scaled value)

Encode: ``f = act(einsum("bsd,sdf->bf", x * input_scale, W_enc) + b_enc)`` (times ``act_scale``).
Input offsets that some formats subtract before encoding (SAELens ``apply_b_dec_to_input``, dictionary_learning
``activation_mean``) are folded into ``b_enc`` at load time, so every format encodes with this one formula.
``W_dec`` and ``b_dec`` live in the normalised input space: :meth:`Crosscoder.decode` divides by
``input_scale`` to return model units (a decoder direction in model units is ``W_dec[f, s] / input_scale[s]``).
A plain SAE is the case S = 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ACTIVATIONS = ("relu", "jumprelu", "topk", "batchtopk")
INPUT_NORMS = ("constant_norm_rescale", "layer_norm")


@dataclass(frozen=True)
class Source:
    """One place the crosscoder reads: a model (HF id or local path) and a site in it.

    ``site`` is a TransformerLens-style hook name (``blocks.6.hook_resid_post``) or an explicit module
    path of the model.
    """

    model: str
    site: str

    def label(self) -> str:
        return f"{self.model} · {self.site}"


@dataclass
class Crosscoder:
    """Weights and metadata of a crosscoder in canonical axis order (see the module docstring)."""

    W_enc: torch.Tensor
    W_dec: torch.Tensor
    b_enc: torch.Tensor
    b_dec: torch.Tensor
    sources: list[Source]
    activation: str = "relu"
    threshold: torch.Tensor | None = None  # [F] for jumprelu; scalar tensor for batchtopk
    k: int | None = None  # topk
    input_scale: torch.Tensor | None = None  # [S]; None = not stored, estimated by the analysis
    act_scale: torch.Tensor | None = None  # [F]
    format: str = "unknown"
    path: str = ""
    extra: dict = field(default_factory=dict)
    input_norm: str | None = None  # per-token normalisation before input_scale (see INPUT_NORMS)

    @property
    def n_sources(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[1]

    @property
    def n_features(self) -> int:
        return self.W_enc.shape[2]

    def to(self, device=None, dtype=None) -> "Crosscoder":
        def mv(t):
            if t is None:
                return None
            if t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold", "input_scale", "act_scale"):
            setattr(self, name, mv(getattr(self, name)))
        return self

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x[B, S, d]`` as the encoder reads it and the decoder reconstructs it: input normalisation and
        scale applied."""
        if self.input_norm == "constant_norm_rescale":
            x = x * (x.shape[-1] ** 0.5 / x.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        elif self.input_norm == "layer_norm":
            x = x - x.mean(dim=-1, keepdim=True)
            x = x / (x.std(dim=-1, keepdim=True) + 1e-5)
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)[None, :, None]
        return x

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """``x[B, S, d]`` → pre-activations ``[B, F]`` (input normalisation and scale applied)."""
        x = self.model_input(x)
        return torch.einsum("bsd,sdf->bf", x.to(self.W_enc.dtype), self.W_enc) + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x[B, S, d]`` → feature activations ``[B, F]`` as the atlas shows them."""
        pre = self.pre_activation(x)
        scale = self.act_scale
        if self.activation == "relu":
            f = torch.relu(pre)
        elif self.activation == "jumprelu":
            f = torch.where(pre > self.threshold, torch.relu(pre), torch.zeros_like(pre))
        elif self.activation == "topk":  # the k largest pre-activations, negative ones shown as 0
            vals, idx = pre.topk(min(self.k, pre.shape[-1]), dim=-1, sorted=False)
            f = torch.zeros_like(pre).scatter_(-1, idx, vals.relu_())
        elif self.activation == "batchtopk":
            # Inference mode: a fixed threshold on the code-normalised activation.
            f = torch.relu(pre)
            scaled = f * scale if scale is not None else f
            f = torch.where(scaled > self.threshold, f, torch.zeros_like(f))
        else:  # pragma: no cover - validated at load time
            raise ValueError(self.activation)
        if scale is not None:
            f = f * scale
        return f

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """``f[B, F]`` (as returned by :meth:`encode`) → reconstruction ``[B, S, d]`` in model units.

        With a per-token ``input_norm`` the reconstruction stays in the normalised space (undoing it needs
        each token's own norm, which ``f`` does not carry).
        """
        if self.act_scale is not None:
            f = f / self.act_scale.clamp_min(1e-12)
        out = torch.einsum("bf,fsd->bsd", f.to(self.W_dec.dtype), self.W_dec) + self.b_dec
        if self.input_scale is not None:
            out = out / self.input_scale.to(out.dtype)[None, :, None]
        return out
