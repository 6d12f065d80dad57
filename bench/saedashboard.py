"""SAEDashboard 0.8.0 and ``atlas build`` side by side on the fixture of ``bench/fixed_costs.py``.

Both get the same random 4-layer d=256 Llama, the same 4,096-latent SAELens SAE on
``blocks.2.hook_resid_post`` and the same token sequences (SAEDashboard reads the ``tokens.npy`` that
``atlas build`` cut from the corpus, so the inputs are identical), and each runs in a fresh process,
timed as a user sees it (imports included):

- ``atlas build <sae> -n F -s N --seq-len 128 --dataset corpus.jsonl -o <tmp>/site`` (this environment);
- SAEDashboard's ``SaeVisRunner`` on a ``HookedSAETransformer`` holding the same weights, then
  ``save_feature_centric_vis`` to one HTML file, in a *separate* virtualenv (SAEDashboard pins its own
  transformer-lens / sae-lens / transformers)::

      python3 -m venv /tmp/saed
      /tmp/saed/bin/pip install torch==2.13.0
      /tmp/saed/bin/pip install torch==2.13.0 sae-dashboard==0.8.0 "pyarrow<18"
      /tmp/saed/bin/pip uninstall -y torchvision torchaudio   # CUDA builds that no longer match torch

The model is rebuilt in that environment from the fixture's ``config.json`` and ``model.safetensors``
(its transformers is older than the one that saved them) and converted with transformer-lens' own
``convert_llama_weights``. The last line is parseable:
``saedashboard: X.XX s, atlas: Y.YY s, ratio Z.ZZx``.

    python bench/saedashboard.py                          # the issue-14 comparison: 4,096 features, 512 × 128
    python bench/saedashboard.py --features 64 --sequences 16   # a quick check that both run

The full comparison takes minutes of CPU (SAEDashboard alone ~150 s on 2 cores): run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

HOOK = "blocks.2.hook_resid_post"
SEQ_LEN = 128


def run_atlas(folder: Path, out: Path, n_features: int, n_sequences: int) -> float:
    """Wall seconds of ``atlas build`` in a fresh process; its cache lands in ``out/site.atlas-data``."""
    from fixed_costs import _env

    argv = [sys.executable, "-m", "atlas.cli", "build", str(folder / "sae"), "-n", str(n_features),
            "-s", str(n_sequences), "--seq-len", str(SEQ_LEN), "--dataset", str(folder / "corpus.jsonl"),
            "-o", str(out / "site")]
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=_env(), cwd=out, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"atlas build failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return wall


def run_saedashboard(python: str, folder: Path, tokens: Path, out: Path, n_features: int) -> float:
    """Wall seconds of SAEDashboard (``--child`` of this script under ``python``) in a fresh process."""
    argv = [python, str(Path(__file__).resolve()), "--child", "--folder", str(folder), "--tokens", str(tokens),
            "--out", str(out / "saedashboard.html"), "--features", str(n_features)]
    t0 = time.perf_counter()
    r = subprocess.run(argv, cwd=out, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                            "HOME": str(Path.home())})
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"SAEDashboard failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return wall


# --------------------------------------------------------------------------- inside the SAEDashboard venv


def saedashboard_child(folder: Path, tokens_path: Path, out: Path, n_features: int) -> None:
    import numpy as np
    import torch
    from safetensors.torch import load_file
    from sae_dashboard.data_writing_fns import save_feature_centric_vis
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner
    from sae_lens import SAE, HookedSAETransformer
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    model_dir = folder / "model"
    hf_cfg = json.loads((model_dir / "config.json").read_text())
    theta = hf_cfg.get("rope_theta", hf_cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    config = LlamaConfig(
        vocab_size=hf_cfg["vocab_size"], hidden_size=hf_cfg["hidden_size"],
        intermediate_size=hf_cfg["intermediate_size"], num_hidden_layers=hf_cfg["num_hidden_layers"],
        num_attention_heads=hf_cfg["num_attention_heads"], num_key_value_heads=hf_cfg["num_key_value_heads"],
        head_dim=hf_cfg["head_dim"], rms_norm_eps=hf_cfg["rms_norm_eps"], rope_theta=theta,
        max_position_embeddings=hf_cfg["max_position_embeddings"], tie_word_embeddings=hf_cfg["tie_word_embeddings"],
        bos_token_id=hf_cfg["bos_token_id"], eos_token_id=hf_cfg["eos_token_id"])
    hf = LlamaForCausalLM(config)
    hf.load_state_dict(load_file(str(model_dir / "model.safetensors")))  # strict: every weight, no other
    hf.eval()

    tl_cfg = HookedTransformerConfig(
        d_model=config.hidden_size, d_head=config.head_dim, n_heads=config.num_attention_heads,
        d_mlp=config.intermediate_size, n_layers=config.num_hidden_layers, n_ctx=SEQ_LEN,
        d_vocab=config.vocab_size, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
        rotary_dim=config.head_dim, rotary_base=int(theta), final_rms=True, gated_mlp=True,
        eps=config.rms_norm_eps, n_key_value_heads=config.num_key_value_heads,
        original_architecture="LlamaForCausalLM", default_prepend_bos=True, device="cpu")
    # the fixture's tokenizer_config.json names a class this transformers lacks: the same tokenizer.json,
    # saved again here so that transformer-lens can reload it by path
    fast = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    fast.bos_token = fast.convert_ids_to_tokens(config.bos_token_id)
    fast.eos_token = fast.convert_ids_to_tokens(config.eos_token_id)
    tok_dir = out.parent / "saedashboard-tokenizer"
    fast.save_pretrained(str(tok_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    model = HookedSAETransformer(tl_cfg, tokenizer=tokenizer)
    model.load_and_process_state_dict(convert_llama_weights(hf, tl_cfg), fold_ln=False,
                                      center_writing_weights=False, center_unembed=False)
    tokens = torch.from_numpy(np.load(tokens_path)).long()
    # the same model: the hooked activations agree with the original's on the first sequence
    layer = int(HOOK.split(".")[1])
    with torch.no_grad():
        want = hf(tokens[:1], output_hidden_states=True).hidden_states[layer + 1]
        _, cache = model.run_with_cache(tokens[:1], names_filter=HOOK)
    err = (cache[HOOK] - want).abs().max().item()
    if err > 1e-3 * want.abs().max().item():
        sys.exit(f"the transformer-lens model differs from the fixture's (max |diff| {err:.3g} at {HOOK})")
    del hf, cache

    sae = SAE.load_from_disk(str(folder / "sae"), device="cpu")
    cfg = SaeVisConfig(hook_point=HOOK, features=list(range(n_features)), device="cpu", dtype="float32")
    data = SaeVisRunner(cfg).run(encoder=sae, model=model, tokens=tokens)
    save_feature_centric_vis(sae_vis_data=data, filename=str(out))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "atlas-fixed-costs"),
                   help="the fixture of bench/fixed_costs.py (built there when missing)")
    p.add_argument("--saed-python", default="/tmp/saed/bin/python",
                   help="python of the virtualenv holding sae-dashboard 0.8.0 (default: /tmp/saed/bin/python)")
    p.add_argument("--features", type=int, default=4096, help="features analysed by both (default: 4096)")
    p.add_argument("--sequences", type=int, default=512, help="sequences of 128 tokens (default: 512)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # runs inside the SAEDashboard venv
    p.add_argument("--tokens", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    folder = Path(args.folder)
    if args.child:
        saedashboard_child(folder, Path(args.tokens), Path(args.out), args.features)
        return

    from fixed_costs import build_fixture

    build_fixture(folder)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        atlas = run_atlas(folder, out, args.features, args.sequences)
        print(f"atlas build: {atlas:.2f} s", flush=True)
        saed = run_saedashboard(args.saed_python, folder, out / "site.atlas-data" / "tokens.npy", out, args.features)
        print(f"SAEDashboard: {saed:.2f} s", flush=True)
    print(f"saedashboard: {saed:.2f} s, atlas: {atlas:.2f} s, ratio {saed / atlas:.2f}x")


if __name__ == "__main__":
    main()
