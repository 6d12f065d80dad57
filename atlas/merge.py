"""Shards and feature slices: ``atlas analyze --shard K/N`` writes a shard, ``atlas merge`` completes caches.

A **shard** is what one job of a scheduler array (SLURM ``--array``) writes with ``--shard K/N``: the
mergeable summaries of the K-th of N contiguous ranges of the corpus's batches (:mod:`atlas.analyze`),
in a folder of its own::

    shard.json      ShardInfo: shard K of N, its batches, fingerprints, the manifest of the analysis
                    (written last: a folder without it holds an unfinished shard)
    summaries.pt    the summaries' state_dict (torch.save)
    finish.pt       shard 0 only: what finishing needs from the weights and the models (FinishInputs:
                    the analysed features' decoder rows, the sources' unembeddings, precomputed
                    neighbours of a feature slice, the vocabulary) and the corpus's token ids
    state/          resume file while the shard is being analysed

:func:`merge_folders` (``atlas merge DIR... -o CACHE``) takes shard folders and complete caches:

1. Every input must come from the same inputs (checkpoint, corpus, options: the ``inputs_fingerprint``
   in the manifest) — otherwise it refuses, naming the two folders.
2. Shards of one analysis (same ``fingerprint``: the same features) must be exactly shards 0..N-1 of
   one N: a missing or duplicate shard is refused. Their summaries are merged (the exact,
   order-independent merge of :mod:`atlas.stats`) and finished like an analysis, with shard 0's
   ``finish.pt``: the result is the cache one process would have written.
3. The resulting caches (and the complete caches given) are feature slices; they are concatenated in
   feature order into one cache. They must not overlap and must leave no gap. Nearest neighbours of a
   slice were searched among the whole dictionary when it was analysed (``--features`` does that), so
   concatenation is exact and nothing is recomputed.

Readers of shards: this module only. Writer: :func:`write_shard`, called by :func:`atlas.analyze.run_analysis`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import cache as cache_format
from .analyze import save_torch_atomic
from .errors import AtlasError

SHARD_FILE = "shard.json"
SUMMARIES_FILE = "summaries.pt"
FINISH_FILE = "finish.pt"
SHARD_FORMAT = 1


@dataclass
class ShardInfo:
    """``shard.json``: which shard this is and everything needed to finish it but the arrays."""

    shard: int
    n_shards: int
    batches: list  # [first, stop) global batch indices
    fingerprint: str
    inputs_fingerprint: str
    seed: int
    logit_hist_bins: int
    manifest: dict  # Manifest.to_json() of the analysis, n_tokens counting this shard only
    format: int = SHARD_FORMAT

    @property
    def label(self) -> str:
        return f"{self.shard}/{self.n_shards}"


def write_shard(folder: Path, plan, summaries, inputs, manifest) -> "cache_format.Manifest":
    """Write shard ``plan.shard`` into ``folder`` (``inputs``: FinishInputs, for shard 0). Returns ``manifest``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SHARD_FILE).unlink(missing_ok=True)  # an older shard must not pass for this one meanwhile
    save_torch_atomic(folder / SUMMARIES_FILE, {"summaries": summaries.state_dict()})
    if inputs is not None:
        save_torch_atomic(folder / FINISH_FILE, {
            "W_dec": inputs.W_dec.detach().float().cpu(),
            "unembeddings": [u.detach().float().cpu() for u in inputs.unembeddings],
            "neighbours": None if inputs.neighbours is None else
            {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.neighbours.items()},
            "vocab": list(inputs.vocab),
            "tokens": plan.tokens.to(torch.int32),
            "outliers": None if inputs.outliers is None else torch.from_numpy(np.asarray(inputs.outliers, bool)),
        })
    else:
        (folder / FINISH_FILE).unlink(missing_ok=True)
    k, n = plan.shard
    info = ShardInfo(shard=k, n_shards=n, batches=list(plan.job), fingerprint=plan.fingerprint,
                     inputs_fingerprint=plan.inputs_fingerprint, seed=plan.options.seed,
                     logit_hist_bins=plan.options.logit_hist_bins, manifest=manifest.to_json())
    cache_format.atomic_write_json(folder / SHARD_FILE, dataclasses.asdict(info))
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e6
    print(f"atlas: wrote shard {k}/{n} (batches {plan.job[0]}..{plan.job[1] - 1}, {manifest.n_tokens:,} tokens, "
          f"features {plan.first}..{plan.stop - 1}) to {folder} ({size:.1f} MB); when all {n} shards are "
          f"written, combine them with: atlas merge SHARD_DIR... -o CACHE")
    return manifest


def check_shard_folder(folder: Path) -> None:
    """Raise AtlasError unless ``folder`` is new, empty, or holds (part of) a shard: one folder per shard."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise AtlasError(f"the shard path {folder} is a file: pass -o/--output with a folder (one per shard)")
    if folder.is_dir():
        names = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
        if names - {SHARD_FILE, SUMMARIES_FILE, FINISH_FILE, "state"}:
            raise AtlasError(f"the folder {folder} holds other files than a shard: pass -o/--output with an empty "
                             "or new folder for each shard (e.g. shards/$SLURM_ARRAY_TASK_ID)")


def read_shard_info(folder: Path) -> ShardInfo | None:
    """The shard's ``shard.json``, or None when ``folder`` holds no finished shard."""
    path = Path(folder) / SHARD_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text("utf-8"))
        info = ShardInfo(**data)
    except (OSError, ValueError, TypeError) as exc:
        raise AtlasError(f"{path} is not a readable atlas shard ({exc}): rerun the atlas analyze --shard "
                         "command that wrote it") from None
    if info.format != SHARD_FORMAT:
        raise AtlasError(f"{folder} holds a shard of format {info.format}; this atlas reads {SHARD_FORMAT}: "
                         "rerun its atlas analyze --shard command with this version")
    return info


def finished_shard(folder: Path, fingerprint: str, shard: tuple[int, int]):
    """The manifest of a finished shard ``shard`` of the same inputs in ``folder``, else None (for reuse)."""
    try:
        info = read_shard_info(folder)
    except AtlasError:
        return None
    if info is None or info.fingerprint != fingerprint or (info.shard, info.n_shards) != tuple(shard):
        return None
    if not (Path(folder) / SUMMARIES_FILE).is_file() or (info.shard == 0 and not (Path(folder) / FINISH_FILE).is_file()):
        return None
    return cache_format.Manifest.from_json(info.manifest)


# --------------------------------------------------------------------------- merging


@dataclass
class _Input:
    folder: Path
    manifest: "cache_format.Manifest"
    shard: ShardInfo | None  # None: a complete cache

    @property
    def fingerprint(self) -> str:
        return self.shard.fingerprint if self.shard else self.manifest.checkpoint.get("fingerprint", "")

    @property
    def inputs_fingerprint(self) -> str:
        return self.shard.inputs_fingerprint if self.shard else self.manifest.checkpoint.get("inputs_fingerprint", "")

    @property
    def features(self) -> tuple[int, int]:
        return self.manifest.feature_offset, self.manifest.feature_offset + self.manifest.n_features


def _read_input(folder: Path) -> _Input:
    folder = Path(folder)
    if not folder.is_dir():
        raise AtlasError(f"{folder} is not a folder: pass the folders written by atlas analyze --shard K/N "
                         "(or complete caches of feature slices)")
    info = read_shard_info(folder)
    if info is not None:
        if not (folder / SUMMARIES_FILE).is_file():
            raise AtlasError(f"shard folder {folder} lacks {SUMMARIES_FILE}: rerun its atlas analyze --shard "
                             f"{info.label} command")
        return _Input(folder, cache_format.Manifest.from_json(info.manifest), info)
    try:
        manifest = cache_format.read_manifest(folder)
    except (OSError, ValueError, KeyError, TypeError):
        manifest = None
    if manifest is None or not manifest.complete or not all((folder / f).exists() for f in cache_format.FILES):
        hint = " (its analysis is unfinished: rerun its atlas analyze command)" if (folder / "state").exists() else ""
        raise AtlasError(f"{folder} holds neither a finished shard ({SHARD_FILE}) nor a complete analysis "
                         f"cache{hint}: pass the folders written by atlas analyze --shard K/N or atlas analyze "
                         "--features A:B")
    if not manifest.checkpoint.get("inputs_fingerprint"):
        raise AtlasError(f"the cache {folder} was written by an older atlas without input fingerprints: "
                         "analyse it again with this version to merge it")
    return _Input(folder, manifest, None)


def _check_same_inputs(items: list[_Input]) -> None:
    base = items[0]
    for item in items[1:]:
        if item.inputs_fingerprint != base.inputs_fingerprint:
            raise AtlasError(f"{base.folder} and {item.folder} were analysed from different inputs (checkpoint, "
                             "corpus, options or atlas version differ): merge only the outputs of one analysis "
                             "command (differing only in --shard and --features)")


def _check_shard_set(shards: list[_Input]) -> None:
    """Shards 0..N-1 of one N, each once."""
    n = shards[0].shard.n_shards
    for s in shards[1:]:
        if s.shard.n_shards != n:
            raise AtlasError(f"{shards[0].folder} is shard {shards[0].shard.label} but {s.folder} is shard "
                             f"{s.shard.label}: pass the shards of one --shard K/N series (one N)")
    seen: dict[int, Path] = {}
    for s in shards:
        if s.shard.shard in seen:
            raise AtlasError(f"shard {s.shard.label} is given twice ({seen[s.shard.shard]} and {s.folder}): "
                             "pass each shard folder once")
        seen[s.shard.shard] = s.folder
    missing = sorted(set(range(n)) - set(seen))
    if missing:
        names = ", ".join(f"{k}/{n}" for k in missing)
        f0, f1 = shards[0].features
        raise AtlasError(f"shard{'s' if len(missing) > 1 else ''} {names} of features {f0}..{f1 - 1} "
                         f"{'are' if len(missing) > 1 else 'is'} missing: run atlas analyze --shard K/{n} for "
                         f"{'them' if len(missing) > 1 else 'it'} and pass all {n} shard folders")


def _check_same_estimates(items: list[_Input]) -> None:
    """Every process estimates the input scale (and a missing BatchTopK threshold) from the same batches:
    refuse shards whose values differ."""
    for key, what, fix in (("input_scale", "input scales", "the same --scale"),
                           ("batchtopk_threshold", "BatchTopK thresholds", "the same inputs and options")):
        base = np.asarray(items[0].manifest.checkpoint.get(key, np.nan), dtype=np.float64)
        for item in items[1:]:
            other = np.asarray(item.manifest.checkpoint.get(key, np.nan), dtype=np.float64)
            if other.shape != base.shape or not np.allclose(other, base, rtol=1e-4, atol=0, equal_nan=True):
                raise AtlasError(f"{items[0].folder} and {item.folder} used different {what} ({base.tolist()} "
                                 f"vs {other.tolist()}): rerun the shards with {fix}")


def merge_shards(shards: list[_Input], device="cpu") -> "cache_format.Cache":
    """The cache that one process analysing every shard's batches would have written."""
    from .analyze import FinishInputs, assemble
    from .stats import FeatureSummaries

    _check_shard_set(shards)
    _check_same_estimates(shards)
    first = next(s for s in shards if s.shard.shard == 0)
    info = first.shard
    if not (first.folder / FINISH_FILE).is_file():
        raise AtlasError(f"shard {info.label} in {first.folder} lacks {FINISH_FILE}: rerun its atlas analyze "
                         f"--shard {info.label} command")
    manifest = cache_format.Manifest.from_json(info.manifest)
    merged = None
    for s in shards:  # one shard's state in memory at a time besides the running total
        state = torch.load(s.folder / SUMMARIES_FILE, map_location=device, weights_only=True)["summaries"]
        part = FeatureSummaries(manifest.n_features, manifest.settings, info.seed, device=device,
                                feature_offset=manifest.feature_offset)
        try:
            part.load_state_dict(state)
        except KeyError as exc:  # a statistic this atlas folds is missing: written by an older version
            raise AtlasError(f"the shard in {s.folder} lacks the summary {exc} (written by an older atlas): rerun "
                             f"its atlas analyze --shard {s.shard.label} command with this version") from None
        del state
        merged = part if merged is None else merged.merge(part)
    fin = torch.load(first.folder / FINISH_FILE, map_location=device, weights_only=True)
    neighbours = fin["neighbours"]
    inputs = FinishInputs(W_dec=fin["W_dec"], unembeddings=fin["unembeddings"],
                          neighbours=None if neighbours is None else {k: v.numpy() for k, v in neighbours.items()},
                          vocab=fin["vocab"],
                          outliers=None if fin.get("outliers") is None else fin["outliers"].cpu().numpy())
    return assemble(merged, inputs, manifest, fin["tokens"].numpy(), info.logit_hist_bins)


def concatenate(parts: list["cache_format.Cache"]) -> "cache_format.Cache":
    """Feature slices (in feature order, contiguous) as one cache."""
    from .analyze import fingerprint

    if len(parts) == 1:
        return parts[0]
    m0 = parts[0].manifest
    for part in parts:
        m = part.manifest
        if m.checkpoint.get("neighbours_among") != m.checkpoint.get("n_features_total"):
            raise AtlasError(f"features {m.feature_offset}..{m.feature_offset + m.n_features - 1} were analysed with "
                             "--n-features, so their neighbours were searched among them only: analyse them with "
                             f"--features {m.feature_offset}:{m.feature_offset + m.n_features} to merge them with "
                             "other slices")
    for part in parts[1:]:
        if part.manifest.n_tokens != m0.n_tokens or part.manifest.n_sequences != m0.n_sequences:
            raise AtlasError("the feature slices counted different tokens: merge only the outputs of one "
                             "analysis command (differing only in --shard and --features)")

    def cat(kind: str):
        objs = [getattr(p, kind) for p in parts]
        arrays = {}
        for f in dataclasses.fields(objs[0]):
            values = [getattr(o, f.name) for o in objs]
            if any(v is None for v in values):
                if not all(v is None for v in values):
                    raise AtlasError(f"some feature slices lack {kind}.{f.name}: analyse every slice with the same "
                                     "atlas version and options")
                continue
            arrays[f.name] = np.concatenate([np.asarray(v) for v in values], axis=0)
        return type(objs[0])(**arrays)

    first = m0.feature_offset
    stop = parts[-1].manifest.feature_offset + parts[-1].manifest.n_features
    manifest = dataclasses.replace(m0, n_features=stop - first, checkpoint=dict(m0.checkpoint))
    n_total = int(m0.checkpoint.get("n_features_total", stop))
    manifest.checkpoint["fingerprint"] = fingerprint(m0.checkpoint["inputs_fingerprint"], first, stop, n_total)
    return cache_format.Cache(manifest=manifest, vocab=parts[0].vocab, tokens=parts[0].tokens,
                              features=cat("features"), examples=cat("examples"), logits=cat("logits"),
                              corpus_ids=parts[0].corpus_ids)


def merge_folders(folders: list[Path], output: Path, device: str | None = None) -> "cache_format.Manifest":
    """``atlas merge``: combine shard folders and feature-slice caches into one complete cache at ``output``."""
    from datetime import datetime, timezone

    from .analyze import write_analysis_cache

    start = time.perf_counter()
    if not folders:
        raise AtlasError("nothing to merge: pass the shard folders (atlas merge SHARD_DIR... -o CACHE)")
    output = Path(output)
    resolved = {Path(f).resolve() for f in folders}
    if len(resolved) < len(folders):
        raise AtlasError("a folder is given twice: pass each shard or cache folder once")
    if output.resolve() in resolved:
        raise AtlasError(f"the output {output} is one of the inputs: pass -o with a new folder")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    items = [_read_input(Path(f)) for f in folders]
    _check_same_inputs(items)
    _check_same_estimates(items)

    groups: dict[str, list[_Input]] = {}
    for item in items:
        groups.setdefault(item.fingerprint, []).append(item)
    slices = []
    for group in groups.values():
        caches = [g for g in group if g.shard is None]
        if len(caches) > 1 or (caches and len(group) > 1):
            f0, f1 = group[0].features
            raise AtlasError(f"{group[0].folder} and {group[1].folder} both hold features {f0}..{f1 - 1}: pass "
                             "each feature slice once (its shards, or its cache)")
        slices.append((group[0].features, group))
    slices.sort(key=lambda s: s[0])
    for (a, ga), (b, gb) in zip(slices, slices[1:]):
        if b[0] < a[1]:
            raise AtlasError(f"{ga[0].folder} (features {a[0]}..{a[1] - 1}) and {gb[0].folder} (features "
                             f"{b[0]}..{b[1] - 1}) overlap: pass feature slices that do not overlap (--features A:B)")
        if b[0] > a[1]:
            raise AtlasError(f"features {a[1]}..{b[0] - 1} are missing between {ga[0].folder} and {gb[0].folder}: "
                             f"analyse them (atlas analyze --features {a[1]}:{b[0]}) and pass that folder too")

    parts = []
    for _, group in slices:
        if group[0].shard is None:
            parts.append(cache_format.read_cache(group[0].folder))
        else:
            parts.append(merge_shards(group, device=dev))
    cache = concatenate(parts)
    cache.manifest.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    cache.manifest.complete = False
    if output.exists() and not output.is_dir():
        raise AtlasError(f"the output {output} is a file: pass -o with a folder")
    write_analysis_cache(output, cache)
    shutil.rmtree(output / "state", ignore_errors=True)
    m = cache.manifest
    n_shards = sum(1 for i in items if i.shard is not None)
    print(f"atlas: merged {len(items)} folder(s) ({n_shards} shard(s), {len(parts)} feature slice(s)) into {output}: "
          f"features {m.feature_offset}..{m.feature_offset + m.n_features - 1} over {m.n_tokens:,} tokens, "
          f"in {time.perf_counter() - start:.1f} s")
    return m
