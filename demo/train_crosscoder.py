"""Train the demo crosscoder: demo:smollm2 vs demo:smollm2-python, the same layer of both.

1. Extraction. The demo corpus (Brown excerpts + Python documentation) is tokenised into windows of
   ``--seq-len`` tokens, each starting with SmolLM2's document separator ``<|endoftext|>``. The same token
   ids go through both models (loaded with ``atlas.demo.resolve_model``, float32, exactly as ``atlas build``
   loads them); the residual stream after block L (``blocks.L.hook_resid_post`` = the output of
   ``model.layers[L]``) is read with a forward hook that stops the forward pass there. Separator positions
   (the first of every window, and document boundaries) are left out.
2. Normalisation. Each source is multiplied by ``sqrt(d) / mean ||x||`` (stored as ``input_scale``).
3. Training. A ReLU crosscoder ``f = relu(sum_s x_s W_enc[s] + b_enc)``, ``x̂_s = f W_dec[:, s] + b_dec[s]``,
   loss = ``sum_s ||x_s - x̂_s||²`` + ``λ · sum_f f · sum_s ||W_dec[f, s]||`` (the Anthropic / ckkissane
   recipe: decoder initialised with norm ``--dec-init-norm`` per source and W_enc = W_decᵀ, λ warmed up
   over the first 5 % of steps, Adam, learning rate decayed linearly over the last 20 %).
4. Output. ``atlas/demo/demo_crosscoder.pt`` (state dict W_enc[S,d,F], W_dec[F,S,d], b_enc[F], b_dec[S,d],
   float16) and ``demo_crosscoder_cfg.json`` (ckkissane keys plus ``model_names`` and ``input_scale``); the
   ``crosscoder`` section of demo/provenance.json with the loss curve, variance explained per source on
   held-out tokens, dead features and the histogram of relative decoder norms.

    python demo/train_crosscoder.py                  # CPU: ~10 min extraction + ~10 min training on 2 idle cores
    python demo/train_crosscoder.py --device cuda

Activations are cached (``--acts-cache``) so that training can be rerun without extracting again.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from atlas.demo import (  # noqa: E402
    BASE_SPEC,
    CFG_NAME,
    CHECKPOINT_NAME,
    DEMO_DELTA,
    DEMO_DIR,
    VARIANT_SPEC,
    cache_root,
    resolve_model,
)

SPECS = [BASE_SPEC, VARIANT_SPEC]


class _Stop(Exception):
    pass


@torch.inference_mode()
def extract(spec: str, windows: torch.Tensor, layer: int, batch_size: int, device, log) -> torch.Tensor:
    """Residual stream after block ``layer`` for every window position: ``[N, T, d]`` float16 on cpu."""
    model, _ = resolve_model(spec, device=device)
    block = model.model.layers[layer]
    captured = {}

    def hook(_module, _inputs, output):
        captured["x"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handle = block.register_forward_hook(hook)
    out = []
    t0 = time.time()
    try:
        for i in range(0, len(windows), batch_size):
            ids = windows[i : i + batch_size].to(device)
            try:
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            except _Stop:
                pass
            x = captured.pop("x")
            assert x.shape[:2] == ids.shape, x.shape
            out.append(x.to("cpu", torch.float16))
            if (i // batch_size) % 20 == 0:
                done = i + len(ids)
                log(f"  {spec}: {done}/{len(windows)} windows, {done * windows.shape[1] / (time.time() - t0):.0f} tok/s")
    finally:
        handle.remove()
    del model
    return torch.cat(out)


def build_dataset(args, log) -> dict:
    """Token windows of both domains and the activations of both models (cached on disk)."""
    cache = Path(args.acts_cache or cache_root() / f"demo-acts-L{args.layer}-T{args.seq_len}-v1.pt")
    delta_bytes = DEMO_DELTA.read_bytes()
    key = {"layer": args.layer, "seq_len": args.seq_len, "brown_windows": args.brown_windows,
           "pydoc_windows": args.pydoc_windows, "delta_size": len(delta_bytes),
           "delta_sum": int(torch.frombuffer(bytearray(delta_bytes), dtype=torch.uint8).sum())}
    if cache.is_file() and not args.reextract:
        data = torch.load(cache, weights_only=True)
        if data.get("key") == json.dumps(key, sort_keys=True):
            log(f"activations from {cache}")
            return data
    from transformers import AutoTokenizer

    from atlas.demo import base_model_dir

    tok = AutoTokenizer.from_pretrained(base_model_dir())
    docs = common.load_corpus()
    brown = common.windows(common.token_stream(tok, [d for d in docs if d["source"] == "brown"]), args.seq_len)
    pydoc = common.windows(common.token_stream(tok, [d for d in docs if d["source"] == "pydoc"]), args.seq_len)
    gen = torch.Generator().manual_seed(args.seed)
    brown = brown[torch.randperm(len(brown), generator=gen)[: args.brown_windows].sort().values]
    pydoc = pydoc[torch.randperm(len(pydoc), generator=gen)[: args.pydoc_windows].sort().values]
    windows = torch.cat([brown, pydoc])
    domain = torch.cat([torch.zeros(len(brown), dtype=torch.uint8), torch.ones(len(pydoc), dtype=torch.uint8)])
    log(f"{len(brown)} Brown + {len(pydoc)} pydoc windows of {args.seq_len} tokens")
    t0 = time.time()
    acts = [extract(spec, windows, args.layer, args.model_batch_size, args.device, log) for spec in SPECS]
    data = {"key": json.dumps(key, sort_keys=True), "windows": windows, "domain": domain,
            "acts": torch.stack(acts, dim=2),  # [N, T, S, d]
            "extract_seconds": torch.tensor(time.time() - t0)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save(data, tmp)
    tmp.replace(cache)
    return data


class CrossCoder(torch.nn.Module):
    def __init__(self, n_sources: int, d: int, n_features: int, dec_init_norm: float, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(n_features, n_sources, d, generator=gen)
        w = w / w.norm(dim=-1, keepdim=True) * dec_init_norm
        self.W_dec = torch.nn.Parameter(w)
        self.W_enc = torch.nn.Parameter(w.permute(1, 2, 0).clone())  # [S, d, F]
        self.b_enc = torch.nn.Parameter(torch.zeros(n_features))
        self.b_dec = torch.nn.Parameter(torch.zeros(n_sources, d))

    def encode(self, x):
        return torch.relu(torch.einsum("bsd,sdf->bf", x, self.W_enc) + self.b_enc)

    def decode(self, f):
        return torch.einsum("bf,fsd->bsd", f, self.W_dec) + self.b_dec

    def decoder_norms(self):
        return self.W_dec.norm(dim=-1)  # [F, S]


@torch.no_grad()
def evaluate(cc: CrossCoder, x: torch.Tensor, batch: int = 4096) -> dict:
    """Fraction of variance explained per source, L0, and per-feature firing counts over ``x[N, S, d]``."""
    S = x.shape[1]
    sq_err = torch.zeros(S, dtype=torch.float64)
    l0 = 0.0
    fired = torch.zeros(cc.W_dec.shape[0], dtype=torch.long)
    mean = x.float().mean(0)
    total_var = ((x.float() - mean) ** 2).sum(dim=(0, 2)).double()
    for i in range(0, len(x), batch):
        xb = x[i : i + batch].float()
        f = cc.encode(xb)
        sq_err += ((cc.decode(f) - xb) ** 2).sum(dim=(0, 2)).double()
        l0 += (f > 0).sum().item()
        fired += (f > 0).sum(0)
    n = max(1, len(x))
    return {"fve": (1 - sq_err / total_var.clamp_min(1e-12)).tolist(), "l0": l0 / n, "fired": fired}


def relative_norm_histogram(r: torch.Tensor, alive: torch.Tensor, bins: int = 20) -> dict:
    counts = torch.histc(r[alive], bins=bins, min=0.0, max=1.0).long().tolist()
    ra = r[alive]
    return {
        "bins": bins, "range": [0.0, 1.0], "counts": counts, "features": int(alive.sum()),
        "base_only_r_lt_0.1": int((ra < 0.1).sum()), "base_leaning_0.1_0.3": int(((ra >= 0.1) & (ra < 0.3)).sum()),
        "shared_0.3_0.7": int(((ra >= 0.3) & (ra <= 0.7)).sum()),
        "variant_leaning_0.7_0.9": int(((ra > 0.7) & (ra <= 0.9)).sum()),
        "variant_only_r_gt_0.9": int((ra > 0.9).sum()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--brown-windows", type=int, default=1100)
    ap.add_argument("--pydoc-windows", type=int, default=1000, help="at most this many (all there are by default)")
    ap.add_argument("--model-batch-size", type=int, default=16)
    ap.add_argument("--acts-cache", default=None, help="activation cache file (default: in the user cache dir)")
    ap.add_argument("--reextract", action="store_true")
    ap.add_argument("--dict-size", type=int, default=3072)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--l1-coeff", type=float, default=3.0)
    ap.add_argument("--dec-init-norm", type=float, default=0.08)
    ap.add_argument("--holdout", type=float, default=0.05, help="fraction of windows held out for evaluation")
    ap.add_argument("--no-bf16", action="store_true", help="train in float32 instead of bfloat16 autocast")
    ap.add_argument("--out-dir", type=Path, default=DEMO_DIR)
    ap.add_argument("--no-provenance", action="store_true")
    args = ap.parse_args(argv)

    common.offline()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    args.device = device
    start = time.time()

    def log(msg):
        print(f"[{time.time() - start:7.1f}s] {msg}", flush=True)

    data = build_dataset(args, log)
    windows, domain, acts = data["windows"], data["domain"], data["acts"]
    N, T, S, d = acts.shape

    # Hold out whole windows; keep every non-separator position.
    gen = torch.Generator().manual_seed(args.seed + 1)
    perm = torch.randperm(N, generator=gen)
    n_eval = max(1, int(round(args.holdout * N)))
    eval_w, train_w = perm[:n_eval].sort().values, perm[n_eval:].sort().values

    def flat(idx):
        keep = windows[idx] != common.DOC_SEP_ID  # [n, T]
        x = acts[idx][keep]  # [tokens, S, d] float16
        dom = domain[idx][:, None].expand(-1, T)[keep]
        return x, dom

    x_train, dom_train = flat(train_w)
    x_eval, dom_eval = flat(eval_w)
    log(f"train tokens {len(x_train):,} (pydoc {int(dom_train.sum()):,}), eval tokens {len(x_eval):,}")

    norms = x_train.float().norm(dim=-1)  # [tokens, S]
    mean_norm = norms.mean(0)
    scale = (math.sqrt(d) / mean_norm).tolist()
    log(f"mean norms {mean_norm.tolist()}, max norms {norms.max(0).values.tolist()}, scales {scale}")
    # How much the fine-tune moved this layer, per domain (relative to the base activation's norm).
    diff = (x_train[:, 1].float() - x_train[:, 0].float()).norm(dim=-1) / norms[:, 0]
    rel_change = {"brown": diff[dom_train == 0].mean().item(), "pydoc": diff[dom_train == 1].mean().item()}
    log(f"relative change base -> variant at this layer: {rel_change}")
    del norms, diff

    scale_t = torch.tensor(scale)[None, :, None]
    x_train_n = (x_train.float() * scale_t).to(device)
    x_eval_n = (x_eval.float() * scale_t).to(device)

    cc = CrossCoder(S, d, args.dict_size, args.dec_init_norm, args.seed).to(device)
    opt = torch.optim.Adam(cc.parameters(), lr=args.lr, betas=(0.9, 0.999))
    warm_l1 = max(1, int(0.05 * args.steps))
    decay_start = int(0.8 * args.steps)
    autocast = not args.no_bf16
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 2)
    curve = []
    n_train = len(x_train_n)
    order = torch.randperm(n_train, generator=gen)
    cursor = 0
    t_train = time.time()
    log_every = max(1, args.steps // 40)
    for step in range(args.steps):
        if cursor + args.batch_size > n_train:
            order = torch.randperm(n_train, generator=gen)
            cursor = 0
        xb = x_train_n[order[cursor : cursor + args.batch_size].to(device)]
        cursor += args.batch_size
        lr = args.lr * (1.0 if step < decay_start else (args.steps - step) / (args.steps - decay_start))
        l1c = args.l1_coeff * min(1.0, (step + 1) / warm_l1)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            f = torch.relu(torch.einsum("bsd,sdf->bf", xb, cc.W_enc) + cc.b_enc)
            recon = torch.einsum("bf,fsd->bsd", f, cc.W_dec) + cc.b_dec
        f = f.float()
        l2 = ((recon.float() - xb) ** 2).sum(dim=(1, 2)).mean()
        l1 = (f * cc.decoder_norms().sum(-1)).sum(-1).mean()
        loss = l2 + l1c * l1
        loss.backward()
        torch.nn.utils.clip_grad_norm_(cc.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == args.steps - 1:
            l0 = (f > 0).float().sum(-1).mean().item()
            point = {"step": step, "loss": round(loss.item(), 3), "l2": round(l2.item(), 3),
                     "l1": round(l1.item(), 3), "l0": round(l0, 1), "l1_coeff": round(l1c, 3), "lr": lr}
            curve.append(point)
            log(f"step {step:5d} loss {loss.item():8.3f} l2 {l2.item():8.3f} l1 {l1.item():7.3f} "
                f"l0 {l0:6.1f} ({(time.time() - t_train) / (step + 1):.2f}s/step)")
    train_seconds = time.time() - t_train
    cc = cc.float().cpu()

    # Evaluate on held-out tokens (and count firing over all tokens for the dead fraction).
    ev = evaluate(cc, x_eval_n.cpu())
    ev_dom = {name: evaluate(cc, x_eval_n.cpu()[dom_eval == k])["fve"] for k, name in ((0, "brown"), (1, "pydoc"))}
    fired = ev["fired"] + evaluate(cc, x_train_n.cpu())["fired"]
    alive = fired > 0
    dn = cc.decoder_norms().detach()
    r = dn[:, 1] / (dn[:, 0] + dn[:, 1]).clamp_min(1e-12)
    hist = relative_norm_histogram(r, alive)
    cos = torch.nn.functional.cosine_similarity(cc.W_dec[:, 0], cc.W_dec[:, 1], dim=-1).detach()
    shared = alive & (r >= 0.3) & (r <= 0.7)
    log(f"held-out FVE {ev['fve']} (brown {ev_dom['brown']}, pydoc {ev_dom['pydoc']}), L0 {ev['l0']:.1f}, "
        f"dead {1 - alive.float().mean().item():.3f}")
    log(f"relative decoder norm histogram (20 bins over [0,1], alive features): {hist['counts']}")
    log(f"base-only {hist['base_only_r_lt_0.1']}, shared {hist['shared_0.3_0.7']}, "
        f"variant-only {hist['variant_only_r_gt_0.9']}; median cosine of shared {cos[shared].median().item():.3f}")

    # Ship float16 weights in ckkissane layout + cfg.
    state = {
        "W_enc": cc.W_enc.detach().to(torch.float16).contiguous(),
        "W_dec": cc.W_dec.detach().to(torch.float16).contiguous(),
        "b_enc": cc.b_enc.detach().to(torch.float16).contiguous(),
        "b_dec": cc.b_dec.detach().to(torch.float16).contiguous(),
    }
    cfg = {
        "d_in": d, "dict_size": args.dict_size, "model_name": BASE_SPEC, "model_names": SPECS,
        "site": "resid_post", "layer": args.layer, "hook_point": f"blocks.{args.layer}.hook_resid_post",
        "seq_len": args.seq_len, "enc_dtype": "fp16", "input_scale": [round(s, 6) for s in scale],
        "seed": args.seed, "batch_size": args.batch_size, "lr": args.lr, "l1_coeff": args.l1_coeff,
        "beta1": 0.9, "beta2": 0.999, "dec_init_norm": args.dec_init_norm,
        "num_tokens": args.steps * args.batch_size, "activation": "relu",
        "excluded_tokens": "<|endoftext|> (id 0): the first position of every window and document boundaries",
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = args.out_dir / CHECKPOINT_NAME
    cfg_path = args.out_dir / CFG_NAME
    tmp = ckpt.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(ckpt)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    log(f"wrote {ckpt} ({common.file_size(ckpt):,} bytes) and {cfg_path}")

    if not args.no_provenance:
        n_pydoc = int(dom_train.sum())
        common.update_provenance("crosscoder", {
            "checkpoint": f"atlas/demo/{CHECKPOINT_NAME}", "cfg": f"atlas/demo/{CFG_NAME}",
            "sources": [{"model": s, "hook_point": cfg["hook_point"]} for s in SPECS],
            "data": {
                "corpus": "atlas/demo/corpus_english.jsonl + corpus_python.jsonl (interleaved)",
                "windows": {"brown": int((domain == 0).sum()), "pydoc": int((domain == 1).sum()),
                            "seq_len": args.seq_len},
                "train_tokens": len(x_train), "train_tokens_brown": len(x_train) - n_pydoc,
                "train_tokens_pydoc": n_pydoc, "eval_tokens": len(x_eval),
                "excluded": cfg["excluded_tokens"],
                "epochs": round(args.steps * args.batch_size / len(x_train), 2),
            },
            "normalisation": {"input_scale": cfg["input_scale"],
                              "mean_norm": [round(v, 4) for v in mean_norm.tolist()],
                              "rule": "scale_s = sqrt(d) / mean ||x_s|| over the training tokens"},
            "fine_tune_effect_at_layer": {k: round(v, 4) for k, v in rel_change.items()},
            "hyperparameters": {
                "dict_size": args.dict_size, "activation": "relu", "steps": args.steps,
                "batch_size": args.batch_size, "lr": args.lr, "l1_coeff": args.l1_coeff,
                "l1_warmup_steps": warm_l1, "lr_decay": f"linear to 0 over the last {args.steps - decay_start} steps",
                "optimizer": "Adam(betas=(0.9, 0.999))", "grad_clip": 1.0, "dec_init_norm": args.dec_init_norm,
                "init": "W_enc = W_dec^T, biases zero", "precision": "bfloat16 autocast" if autocast else "float32",
                "seed": args.seed,
                "loss": "sum_s ||x_s - x̂_s||^2 + l1_coeff * sum_f f_f * sum_s ||W_dec[f, s]||",
            },
            "loss_curve": curve,
            "results": {
                "fve_heldout": dict(zip(SPECS, [round(v, 4) for v in ev["fve"]])),
                "fve_heldout_brown": dict(zip(SPECS, [round(v, 4) for v in ev_dom["brown"]])),
                "fve_heldout_pydoc": dict(zip(SPECS, [round(v, 4) for v in ev_dom["pydoc"]])),
                "l0_heldout": round(ev["l0"], 2),
                "dead_fraction": round(1 - alive.float().mean().item(), 4),
                "dead_definition": "never active on any train or held-out token",
                "relative_decoder_norm_histogram": hist,
                "shared_features_median_cosine": round(cos[shared].median().item(), 4) if shared.any() else None,
            },
            "extract_seconds": round(float(data["extract_seconds"]), 1),
            "train_seconds": round(train_seconds, 1),
            "device": str(device),
            "machine": common.machine(),
            "sizes_bytes": {CHECKPOINT_NAME: common.file_size(ckpt), CFG_NAME: common.file_size(cfg_path),
                            DEMO_DELTA.name: common.file_size(DEMO_DELTA),
                            "total_weights": common.file_size(ckpt) + common.file_size(DEMO_DELTA)},
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
