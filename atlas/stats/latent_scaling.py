"""Latent scaling (Minder et al. 2025, "Overcoming Sparsity Artifacts in Crosscoders to Interpret
Chat-Tuning", arXiv 2504.02922): how much of a two-model crosscoder latent each model really holds.

A latent j whose decoder writes almost only to model B (a "B-only" latent) may still be present in
model A: an L1 crosscoder can shrink its A decoder to zero (Complete Shrinkage) or represent it in A by
other latents (Latent Decoupling). Latent scaling fits, for each model t, the scalar β that best
explains a target y_t with the latent's activation along one of its decoder directions d = d_j^m:

    β = argmin_β Σ_i ‖β f_j(x_i) d − y_{t,i}‖²  =  Σ_i f_j(x_i) ⟨d, y_{t,i}⟩ / (‖d‖² Σ_i f_j(x_i)²)

over the counted tokens i (terms with f_j = 0 vanish), with two targets:

- the reconstruction error with the latent's own contribution added back,
  y = h_t − ĥ_t + f_j d_j^t  (→ β^ε; tests Complete Shrinkage)
- the reconstruction, y = ĥ_t  (→ β^r; tests Latent Decoupling)

h_t is model t's activation as the crosscoder reads it (input normalisation and scale applied) and
ĥ_t = Σ_k f_k d_k^t + b_dec^t the crosscoder's reconstruction from all latents; f are the activations
without any ``act_scale`` (the coefficients the decoder rows are multiplied by).

The ratios compare the other model with the latent's own one (own = the model whose decoder norm is
larger: B for B-only latents, A for A-only ones): ν^ε = β^ε(other) / β^ε(own) and
ν^r = β^r(other) / β^r(own), both fitted along the own decoder. ν near 0: the other model does not
hold the latent (truly model-specific); near 1: it does (a sparsity artifact).

Writer: :mod:`atlas.stats.summaries` (``update`` per batch, mergeable sums); ``finalize`` gives the
``FeatureStats`` fields ``ls_beta_err``, ``ls_beta_rec``, ``ls_nu_err`` and ``ls_nu_rec``.
"""

from __future__ import annotations

import torch

CHUNK = 8192  # active entries per step of the sparse products (bounds the [chunk, S, d] temporaries)


def reconstruct(h: torch.Tensor, tok: torch.Tensor, feat: torch.Tensor, coef: torch.Tensor,
                W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """``ĥ[N, S, d]`` (float32): ``b_dec`` plus ``coef · W_dec[feat]`` added at row ``tok`` for each
    active entry; ``h`` gives the shape and device. Cost: entries × S·d, not N × F × S·d."""
    N = h.shape[0]
    out = b_dec.float().expand(N, *b_dec.shape).clone()
    flat = out.view(N, -1)
    W = W_dec.reshape(W_dec.shape[0], -1)
    for lo in range(0, tok.numel(), CHUNK):
        sl = slice(lo, lo + CHUNK)
        flat.index_add_(0, tok[sl], W.index_select(0, feat[sl]).float() * coef[sl, None])
    return out


class LatentScaling:
    """Mergeable sums over counted tokens for the latent-scaling fits of ``n_features`` latents of a
    crosscoder with ``n_sources`` (= 2) sources: ``f2[F]`` = Σ f², ``num_err[F, S, S]`` =
    Σ f ⟨d^m, h_t − ĥ_t⟩ and ``num_rec[F, S, S]`` = Σ f ⟨d^m, ĥ_t⟩ (decoder of source m on axis 1,
    target model t on axis 2), all float64."""

    FIELDS = ("f2", "num_err", "num_rec")

    def __init__(self, n_features: int, n_sources: int, device=None):
        self.f2 = torch.zeros(n_features, dtype=torch.float64, device=device)
        shape = (n_features, n_sources, n_sources)
        self.num_err = torch.zeros(shape, dtype=torch.float64, device=device)
        self.num_rec = torch.zeros(shape, dtype=torch.float64, device=device)

    def update(self, tok: torch.Tensor, feat: torch.Tensor, coef: torch.Tensor, h: torch.Tensor,
               recon: torch.Tensor, W_dec: torch.Tensor) -> None:
        """Fold a batch: the analysed latents' active entries at counted tokens (row ``tok`` of the
        batch's tokens, latent ``feat`` among the analysed ones, decoder coefficient ``coef``), the
        tokens' inputs ``h[N, S, d]`` and reconstructions ``recon[N, S, d]`` as the crosscoder sees them,
        and the analysed latents' decoder rows ``W_dec[n, S, d]``."""
        coef = coef.float()
        self.f2.index_add_(0, feat, coef.double() ** 2)
        for lo in range(0, tok.numel(), CHUNK):
            sl = slice(lo, lo + CHUNK)
            t, f, c = tok[sl], feat[sl], coef[sl, None, None]
            d = W_dec.index_select(0, f).float()  # [c, S, d]
            rec = recon.index_select(0, t).float()
            err = h.index_select(0, t).float() - rec
            # [c, m, t] = ⟨d^m, y_t⟩ for every pair of sources
            self.num_err.index_add_(0, f, (torch.bmm(d, err.transpose(1, 2)) * c).double())
            self.num_rec.index_add_(0, f, (torch.bmm(d, rec.transpose(1, 2)) * c).double())

    def merge(self, other: "LatentScaling") -> "LatentScaling":
        for name in self.FIELDS:
            mine = getattr(self, name)
            mine += getattr(other, name).to(mine.device)
        return self

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}

    def load_state_dict(self, state: dict) -> None:
        for name in self.FIELDS:
            setattr(self, name, state[name].to(getattr(self, name).device))

    @classmethod
    def from_state(cls, state: dict, device=None) -> "LatentScaling":
        F, S, _ = state["num_err"].shape
        part = cls(F, S, device=device)
        part.load_state_dict(state)
        return part

    def finalize(self, W_dec: torch.Tensor) -> dict:
        """numpy arrays for ``FeatureStats`` from the sums and the latents' decoder rows ``W_dec[F, S, d]``:
        ``ls_beta_err[F, S, S]`` and ``ls_beta_rec[F, S, S]`` (float32; β along the decoder of source m
        (axis 1) for model t (axis 2); NaN for a latent never active or a zero decoder row) and
        ``ls_nu_err[F]``, ``ls_nu_rec[F]`` (float32; β(other)/β(own) along the own decoder; NaN where
        undefined)."""
        W = W_dec.detach().to(device="cpu", dtype=torch.float64)
        gram = torch.einsum("fmd,ftd->fmt", W, W)  # ⟨d^m, d^t⟩
        norm2 = torch.diagonal(gram, dim1=1, dim2=2)  # [F, S]: ‖d^m‖²
        f2 = self.f2.cpu()[:, None, None]
        denom = norm2[:, :, None] * f2
        ok = denom > 0
        safe = torch.where(ok, denom, torch.ones_like(denom))
        nan = torch.full_like(denom, float("nan"))
        beta_err = torch.where(ok, (self.num_err.cpu() + f2 * gram) / safe, nan)
        beta_rec = torch.where(ok, self.num_rec.cpu() / safe, nan)
        own = norm2.argmax(dim=1)  # ties → source 0
        other = 1 - own
        rows = torch.arange(W.shape[0])
        out = {"ls_beta_err": beta_err.float().numpy(), "ls_beta_rec": beta_rec.float().numpy()}
        for name, beta in (("ls_nu_err", beta_err), ("ls_nu_rec", beta_rec)):
            num, den = beta[rows, own, other], beta[rows, own, own]
            nu = torch.where(den != 0, num / den, torch.full_like(num, float("nan")))
            out[name] = nu.float().numpy()
        return out
