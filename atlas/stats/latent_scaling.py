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

import warnings

import torch

BLOCK = 2**24  # float32 elements of the per-block temporaries (decoder rows, or per-latent sums)


def sparse_rows(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """The ``[n_rows, n_cols]`` float32 CSR matrix with ``vals`` at (``rows``, ``cols``) (no repeated pair)."""
    if rows.numel() > 1 and not bool((rows[1:] >= rows[:-1]).all()):
        order = torch.argsort(rows, stable=True)
        rows, cols, vals = rows[order], cols[order], vals[order]
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n_rows), 0)
    with warnings.catch_warnings():  # torch calls its CSR layout beta; it is used only for this product
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, cols.to(torch.int64), vals.float(), size=(n_rows, n_cols),
                                       check_invariants=False)


def latent_blocks(feat: torch.Tensor, n: int, width: int):
    """``(lo, hi, pick)`` for blocks of latents ``lo..hi-1`` of at most ``BLOCK // width`` rows (``width``:
    float32 elements per latent of the block's temporaries); ``pick`` selects the active entries whose
    latent ``feat`` lies in the block (everything when one block holds all ``n``)."""
    rows = max(1, BLOCK // max(width, 1))
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        yield lo, hi, (slice(None) if hi - lo == n else (feat >= lo) & (feat < hi))


def reconstruct(h: torch.Tensor, tok: torch.Tensor, feat: torch.Tensor, coef: torch.Tensor,
                W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """``ĥ[N, S, d]`` (float32): ``b_dec`` plus ``coef · W_dec[feat]`` added at row ``tok`` for each
    active entry; ``h`` gives the shape and device. One sparse [N, F] × dense [F, S·d] product per block
    of decoder rows: the cost is entries × S·d, not N × F × S·d."""
    N = h.shape[0]
    F = W_dec.shape[0]
    out = b_dec.float().expand(N, *b_dec.shape).clone()
    flat = out.view(N, -1)
    W = W_dec.reshape(F, -1)
    for lo, hi, pick in latent_blocks(feat, F, W.shape[1]):
        A = sparse_rows(tok[pick], feat[pick] - lo, coef[pick], N, hi - lo)
        flat += A @ W[lo:hi].float()
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
        and the analysed latents' decoder rows ``W_dec[n, S, d]``.

        The decoder row is the same at every token of a latent, so Σ_i f_i ⟨d^m, y_i⟩ = ⟨d^m, Σ_i f_i y_i⟩:
        one sparse [latents, N] × dense [N, 2·S·d] product sums the targets (errors and reconstructions)
        per latent, then one ⟨d^m, ·⟩ per latent and pair of sources."""
        F, S, d = W_dec.shape
        N = h.shape[0]
        coef = coef.float()
        self.f2.index_add_(0, feat, coef.double() ** 2)
        if feat.numel() == 0:
            return
        targets = torch.cat([h.float() - recon.float(), recon.float()], dim=1).view(N, 2 * S * d)
        for lo, hi, pick in latent_blocks(feat, F, 2 * S * d):
            A = sparse_rows(feat[pick] - lo, tok[pick], coef[pick], hi - lo, N)
            sums = (A @ targets).view(hi - lo, 2 * S, d)  # Σ_i f_i y_i per latent
            # [n, m, target] = ⟨d^m, Σ f y_target⟩, targets: the S errors, then the S reconstructions
            p = torch.einsum("fmd,ftd->fmt", W_dec[lo:hi].float(), sums).double()
            self.num_err[lo:hi] += p[:, :, :S]
            self.num_rec[lo:hi] += p[:, :, S:]

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
        F, S, d = W_dec.shape
        gram = torch.empty(F, S, S, dtype=torch.float64)  # ⟨d^m, d^t⟩, a block of rows at a time
        rows = max(1, BLOCK // max(S * d, 1))
        for lo in range(0, F, rows):
            w = W_dec[lo:lo + rows].detach().double()
            gram[lo:lo + rows] = torch.einsum("fmd,ftd->fmt", w, w).cpu()
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
        rows = torch.arange(F)
        out = {"ls_beta_err": beta_err.float().numpy(), "ls_beta_rec": beta_rec.float().numpy()}
        for name, beta in (("ls_nu_err", beta_err), ("ls_nu_rec", beta_rec)):
            num, den = beta[rows, own, other], beta[rows, own, own]
            nu = torch.where(den != 0, num / den, torch.full_like(num, float("nan")))
            out[name] = nu.float().numpy()
        return out
