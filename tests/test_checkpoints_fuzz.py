"""Fuzz: random shapes, dtypes, damaged tensors, damaged configs, truncated files and random options
never produce anything but a loaded crosscoder or an AtlasError (no traceback from torch or json)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_checkpoints_formats import SAE_KINDS, write_ckkissane, write_crosscode, write_dl_crosscoder, write_dl_sae, write_saelens

from atlas.checkpoints import describe_checkpoint, load_checkpoint
from atlas.crosscoder import Crosscoder
from atlas.errors import AtlasError

torch.set_num_threads(1)

FORMATS = ["ckkissane", "dl_crosscoder", "dl_sae", "crosscode", "saelens"]
SAELENS_ARCHS = ["standard", "jumprelu", "topk", "batchtopk", "gated"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 5000) | st.floats(allow_nan=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def write(fmt: str, folder: Path, seed: int, S: int, d: int, F: int, dtype: str, variant: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    if fmt == "ckkissane":
        return write_ckkissane(folder, g, S=S, d=d, F=F, dtype=dtype)
    if fmt == "dl_crosscoder":
        return write_dl_crosscoder(folder, g, S=S, d=d, F=F, dtype=dtype, batchtopk=variant % 2 == 1,
                                   normaliser=[False, True, "nan"][variant % 3], hub=variant % 4 == 0,
                                   prefix="_orig_mod." if variant % 5 == 0 else "",
                                   config={"model_names": ["a"] * S, "layer": 2} if variant % 2 else None)
    if fmt == "dl_sae":
        return write_dl_sae(folder, g, SAE_KINDS[variant % len(SAE_KINDS)], d=d, F=F, dtype=dtype)
    if fmt == "crosscode":
        M, P = (S, 1) if variant % 2 else (1, S)
        return write_crosscode(folder, g, M=M, P=P, d=d, F=F, dtype=dtype if dtype != "bf16" else "fp32",
                               activation=["jumprelu", "relu", "topk", "batchtopk"][variant % 4],
                               folded=variant % 3 != 0, experiment=variant % 2 == 0)
    return write_saelens(folder, g, SAELENS_ARCHS[variant % len(SAELENS_ARCHS)], d=d, F=F, dtype=dtype,
                         version="6.1.0" if variant % 2 else "4.0.0", apply_b_dec=variant % 3 != 0)


def damage(path: Path, kind: str, data) -> None:
    if kind == "none":
        return
    if kind == "truncate":
        raw = path.read_bytes()
        path.write_bytes(raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)))])
    elif kind == "flip_bytes":
        raw = bytearray(path.read_bytes())
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= data.draw(st.integers(1, 255))
        path.write_bytes(bytes(raw))
    elif kind in ("drop_key", "reshape_key", "nan_key", "retype_key"):
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file, save_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, weights_only=True)
        key = data.draw(st.sampled_from(sorted(sd)))
        if kind == "drop_key":
            del sd[key]
        elif kind == "reshape_key":
            shape = data.draw(st.lists(st.integers(0, 5), min_size=0, max_size=4))
            sd[key] = torch.randn(tuple(shape))
        elif kind == "nan_key" and sd[key].is_floating_point() and sd[key].numel():
            t = sd[key].clone()
            t.view(-1)[0] = float("nan")
            sd[key] = t
        elif kind == "retype_key":
            sd[key] = torch.zeros(sd[key].shape, dtype=torch.int64)
        if path.suffix == ".safetensors":
            save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        else:
            torch.save(sd, path)
    elif kind == "cfg_value":
        cfgs = [p for p in path.parent.parent.rglob("*") if p.suffix in (".json", ".yaml") and p.is_file()]
        if not cfgs:
            return
        cfg_path = data.draw(st.sampled_from(sorted(cfgs)))
        text = cfg_path.read_text()
        cfg = json.loads(text) if cfg_path.suffix == ".json" else yaml.safe_load(text)
        if not isinstance(cfg, dict) or not cfg:
            return
        node = cfg  # walk into nested sections (SAELens metadata, dictionary_learning trainer, ...)
        key = data.draw(st.sampled_from(sorted(node)))
        while isinstance(node[key], dict) and node[key] and data.draw(st.booleans()):
            node = node[key]
            key = data.draw(st.sampled_from(sorted(node)))
        node[key] = data.draw(JSON_VALUES)
        cfg_path.write_text(json.dumps(cfg) if cfg_path.suffix == ".json" else yaml.dump(cfg))
    elif kind == "cfg_garbage":
        cfgs = [p for p in path.parent.rglob("*") if p.suffix in (".json", ".yaml")]
        for p in cfgs[:1]:
            p.write_text(data.draw(st.text(max_size=30)))


OPTION_MODELS = st.none() | st.lists(st.sampled_from(["gpt2", "m/a", "demo:x", ""]), max_size=3)
OPTION_HOOK = st.none() | st.sampled_from(["blocks.1.hook_resid_post", "a,b", "a,b,c", ",", "model.layers.0"])
OPTION_SCALE = st.none() | st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=3)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    fmt=st.sampled_from(FORMATS),
    S=st.integers(1, 3),
    d=st.integers(1, 6),
    F=st.integers(1, 8),
    dtype=st.sampled_from(["fp32", "fp16", "bf16"]),
    variant=st.integers(0, 59),
    damage_kind=st.sampled_from(["none", "truncate", "flip_bytes", "drop_key", "reshape_key", "nan_key",
                                 "retype_key", "cfg_value", "cfg_garbage"]),
    models=OPTION_MODELS,
    hook_point=OPTION_HOOK,
    scale=OPTION_SCALE,
    data=st.data(),
)
def test_loading_yields_crosscoder_or_atlas_error(fmt, S, d, F, dtype, variant, damage_kind, models, hook_point,
                                                   scale, data):
    if fmt in ("dl_sae", "saelens"):
        S = 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run"
        path = write(fmt, folder, seed=variant, S=S, d=d, F=F, dtype=dtype, variant=variant)
        damage(path, damage_kind, data)
        target = data.draw(st.sampled_from([path, folder]))
        try:
            cc = load_checkpoint(target, models=models, hook_point=hook_point, scale=scale)
        except AtlasError as exc:
            assert str(exc) and "\n" not in str(exc)
        else:
            assert isinstance(cc, Crosscoder)
            Sx, dx, Fx = cc.W_enc.shape
            assert cc.W_dec.shape == (Fx, Sx, dx) and len(cc.sources) == Sx
            out = cc.encode(torch.randn(3, Sx, dx))
            assert out.shape == (3, Fx) and bool(torch.isfinite(out).all())
        try:
            text = describe_checkpoint(target, models=models, hook_point=hook_point, scale=scale)
        except AtlasError as exc:
            assert str(exc) and "\n" not in str(exc)
        else:
            assert "Format" in text
