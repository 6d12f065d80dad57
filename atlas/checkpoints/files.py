"""Reading checkpoint files: weights (.pt / .safetensors), configs (.json / .yaml), folders.

Every failure to read becomes an :class:`~atlas.errors.AtlasError` naming the file and the fix; nothing
from torch, safetensors, json or yaml escapes as a traceback.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AtlasError

WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin", ".ckpt")

# Files with a weights suffix that are not checkpoints (SAELens, dictionary_learning, HF trainers).
AUXILIARY_NAMES = {
    "sparsity.safetensors",
    "trainer_state.pt",
    "activations_store_state.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "training_args.bin",
    "scaler.pt",
}
AUXILIARY_PATTERNS = (re.compile(r"^rng_state.*\.pth$"), re.compile(r".*optim.*\.pt$"))

# Wrapper keys under which training code nests a state dict (dictionary_learning's backup ``ae.pt``
# holds {"step", "ae", "optimizer", "config", "norm_factor"}).
NESTED_STATE_KEYS = ("ae", "state_dict", "model_state_dict", "model", "module", "crosscoder", "sae")

# Prefixes added by torch.compile (``_orig_mod.``) and DistributedDataParallel (``module.``).
_STRIP_PREFIXES = ("_orig_mod.", "module.")


@dataclass
class RawCheckpoint:
    """A weights file read into memory, before any format-specific interpretation."""

    path: Path  # the weights file
    state: dict[str, torch.Tensor]  # prefixes stripped, original dtypes
    meta: dict = field(default_factory=dict)  # non-tensor entries stored beside the tensors
    stored_dtypes: tuple[str, ...] = ()
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # every stored tensor's shape

    def __post_init__(self):
        if not self.shapes:
            self.shapes = {k: tuple(v.shape) for k, v in self.state.items()}

    @property
    def folder(self) -> Path:
        return self.path.parent

    def release(self) -> None:
        """Drop the stored tensors once converted (the canonical copies are float32)."""
        self.state = {}


def fmt_shape(shape) -> str:
    return "[" + ", ".join(str(int(n)) for n in shape) + "]"


def is_auxiliary(path: Path) -> bool:
    name = path.name
    return name in AUXILIARY_NAMES or any(p.match(name) for p in AUXILIARY_PATTERNS)


def _natural_key(path: Path):
    parts = re.split(r"(\d+)", str(path))
    return [int(p) if p.isdigit() else p for p in parts]


def newest_checkpoint_in(folder: Path, max_depth: int = 4) -> Path:
    """The newest (by modification time) checkpoint weights file under ``folder``.

    Ties are broken by natural order of the path (``10.pt`` after ``9.pt``). Hidden folders and files
    that only hold training state (optimizer, sparsity, RNG) are skipped.
    """
    candidates: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        try:
            entries = sorted(d.iterdir())
        except OSError as exc:
            raise AtlasError(f"cannot list folder {d}: {exc.strerror or exc}; check its permissions") from None
        for e in entries:
            if e.name.startswith((".", "__")):
                continue
            if e.is_dir():
                if depth < max_depth:
                    walk(e, depth + 1)
            elif e.suffix in WEIGHT_SUFFIXES and not is_auxiliary(e):
                candidates.append(e)

    walk(folder, 0)
    if not candidates:
        raise AtlasError(
            f"no checkpoint file ({', '.join(WEIGHT_SUFFIXES)}) found in folder {folder}; "
            "pass the checkpoint file itself or the folder the training run saved into"
        )

    def key(p: Path):
        try:
            mtime = p.stat().st_mtime
        except OSError:
            mtime = float("-inf")
        return (mtime, _natural_key(p))

    return max(candidates, key=key)


# Config files that name their weights file (a user may pass the config instead of the weights).
_CONFIG_TO_WEIGHTS = {
    "cfg.json": ("sae_weights.safetensors", "cc_weights.pt"),
    "model_cfg.yaml": ("model.pt",),
    "config.json": ("model.safetensors", "ae.pt"),
}


def resolve_path(path: str | Path) -> Path:
    """The weights file a user's path argument designates (a file, a config file, or a folder)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise AtlasError(f"checkpoint not found: {p}; check the path (a .pt/.safetensors file or a folder)")
    if p.is_dir():
        return newest_checkpoint_in(p)
    if p.suffix in (".json", ".yaml", ".yml"):
        names = _CONFIG_TO_WEIGHTS.get(p.name, ())
        if p.name.endswith("_cfg.json"):
            names = (p.name[: -len("_cfg.json")] + ".pt",)
        for n in names:
            if (p.parent / n).is_file():
                return p.parent / n
        raise AtlasError(
            f"{p} is a config file and no weights file was found beside it; pass the checkpoint's "
            ".pt or .safetensors file"
        )
    return p


def _strip(key: str) -> str:
    key = key.replace("_orig_mod.", "")
    while key.startswith(_STRIP_PREFIXES):
        for pre in _STRIP_PREFIXES:
            if key.startswith(pre):
                key = key[len(pre):]
    return key


def _split(obj: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    meta = {k: v for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))}
    return tensors, meta


def read_weights(path: Path) -> RawCheckpoint:
    """Read a state dict from a ``.safetensors`` file or a ``torch.save`` file (weights only)."""
    if not path.is_file():
        raise AtlasError(f"checkpoint not found: {path}; check the path")
    size = path.stat().st_size
    if size == 0:
        raise AtlasError(f"checkpoint file {path} is empty (0 bytes); the save was interrupted: use another checkpoint")
    if path.suffix == ".safetensors":
        obj = _read_safetensors(path)
    else:
        obj = _read_torch(path)
    if not isinstance(obj, dict):
        raise AtlasError(
            f"{path} holds a {type(obj).__name__}, not a state dict; save the weights with "
            "torch.save(model.state_dict(), path)"
        )
    tensors, meta = _split(obj)
    if not tensors:
        for key in NESTED_STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict):
                t2, m2 = _split(inner)
                if t2:
                    tensors = t2
                    meta = {k: v for k, v in obj.items() if k != key}
                    meta.update({f"{key}.{k}": v for k, v in m2.items()})
                    break
    if not tensors:
        raise AtlasError(
            f"{path} holds no tensors (keys: {', '.join(map(str, list(obj)[:8])) or 'none'}); "
            "pass a checkpoint file that contains the crosscoder's state dict"
        )
    state: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        sk = _strip(k)
        if sk in state:
            raise AtlasError(f"{path} has the key {sk!r} twice (with and without a prefix); re-save the state dict")
        state[sk] = v
    dtypes = tuple(sorted({str(v.dtype).replace("torch.", "") for v in state.values() if v.is_floating_point()}))
    return RawCheckpoint(path=path, state=state, meta=meta, stored_dtypes=dtypes)


def _read_safetensors(path: Path) -> dict:
    try:
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises SafetensorError, OSError, ValueError...
        raise AtlasError(
            f"cannot read {path} as safetensors ({_short(exc)}): the file is truncated or corrupt; "
            "download or copy it again"
        ) from None


def _read_torch(path: Path):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        if "Weights only load failed" in str(exc):
            raise AtlasError(
                f"{path} contains Python objects besides tensors and cannot be loaded safely; re-save it "
                "with torch.save(model.state_dict(), path)"
            ) from None
        raise AtlasError(
            f"cannot read {path} as a PyTorch checkpoint ({_short(exc)}): the file is truncated or "
            "corrupt, or not a checkpoint; copy it again or pick another checkpoint"
        ) from None


def _short(exc: BaseException, limit: int = 120) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise AtlasError(f"cannot read config {path}: {_short(exc)}; check the file") from None
    except json.JSONDecodeError as exc:
        raise AtlasError(
            f"config {path} is not valid JSON (line {exc.lineno}: {exc.msg}); fix or restore the file"
        ) from None
    if not isinstance(data, dict):
        raise AtlasError(f"config {path} holds a JSON {type(data).__name__}, not an object; restore the file")
    return data


def read_yaml(path: Path) -> dict:
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    # crosscode writes tuples with the python/tuple tag.
    _Loader.add_constructor(
        "tag:yaml.org,2002:python/tuple", lambda loader, node: tuple(loader.construct_sequence(node))
    )
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except (OSError, UnicodeDecodeError) as exc:
        raise AtlasError(f"cannot read config {path}: {_short(exc)}; check the file") from None
    except yaml.YAMLError as exc:
        raise AtlasError(f"config {path} is not valid YAML ({_short(exc)}); fix or restore the file") from None
    if not isinstance(data, dict):
        raise AtlasError(f"config {path} does not hold a mapping; restore the file")
    return data


def find_file(folder: Path, names: tuple[str, ...], up: int = 1) -> Path | None:
    """The first of ``names`` that exists in ``folder`` or up to ``up`` parents above it."""
    d = folder
    for _ in range(up + 1):
        for n in names:
            if (d / n).is_file():
                return d / n
        if d.parent == d:
            break
        d = d.parent
    return None
