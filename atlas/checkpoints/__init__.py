"""Load every supported checkpoint format into the canonical :class:`~atlas.crosscoder.Crosscoder`.

Public API (used by :mod:`atlas.build`):

- :func:`load_checkpoint` (``atlas build`` / ``atlas analyze``)
- :func:`describe_checkpoint` (``atlas inspect``)

The format is detected from the tensors' names and shapes (see :data:`FORMATS`), never from file names
alone; each format lives in its own module. docs/formats.md describes every format and option.
"""

from __future__ import annotations

from pathlib import Path

from ..crosscoder import Crosscoder
from ..errors import AtlasError
from . import ckkissane, crosscode, dictionary_learning, saelens
from .common import Options, validate, weight_problems, zero_decoder_features
from .files import RawCheckpoint, read_weights, resolve_path

__all__ = ["FORMATS", "load_checkpoint", "describe_checkpoint", "read_checkpoint", "detect_format"]


class Format:
    def __init__(self, name, label, files, sniff, convert):
        self.name, self.label, self.files, self.sniff, self.convert = name, label, files, sniff, convert


#: Recognised formats, in detection order (most specific key names first).
FORMATS: list[Format] = [
    Format(crosscode.NAME, crosscode.LABEL, crosscode.FILES, crosscode.sniff, crosscode.convert),
    Format(dictionary_learning.NAME, dictionary_learning.LABEL, dictionary_learning.FILES,
           dictionary_learning.sniff, dictionary_learning.convert),
    Format(dictionary_learning.SAE_NAME, dictionary_learning.SAE_LABEL, dictionary_learning.SAE_FILES,
           dictionary_learning.sniff_sae, dictionary_learning.convert_sae),
    Format(ckkissane.NAME, ckkissane.LABEL, ckkissane.FILES, ckkissane.sniff, ckkissane.convert),
    Format(saelens.NAME, saelens.LABEL, saelens.FILES, saelens.sniff, saelens.convert),
]


def _formats_list() -> str:
    return "; ".join(f"{f.label} ({f.files})" for f in FORMATS)


def detect_format(raw: RawCheckpoint) -> Format:
    """The format whose key names and shapes match ``raw`` (AtlasError listing the formats otherwise)."""
    for fmt in FORMATS:
        if fmt.sniff(raw):
            return fmt
    keys = ", ".join(f"{k}{list(v.shape)}" for k, v in list(sorted(raw.state.items()))[:8])
    more = ", …" if len(raw.state) > 8 else ""
    hint = ""
    w = raw.state.get("W_enc")
    if w is not None and w.dim() == 2:
        hint = " A 2-D W_enc is an SAELens SAE: put its cfg.json beside the weights."
    raise AtlasError(
        f"unknown checkpoint format in {raw.path} (tensors: {keys}{more}).{hint} Recognised formats: {_formats_list()}"
    )


def _resolve(path) -> Path:
    if path is None:
        from ..demo import default_checkpoint  # lazily: the demo package is heavy

        return Path(default_checkpoint())
    return resolve_path(path)


def read_checkpoint(path, opts: Options) -> tuple[Crosscoder, RawCheckpoint, Format]:
    """Resolve ``path``, read it, detect its format and convert it (no finiteness check)."""
    weights = _resolve(path)
    raw = read_weights(weights)
    fmt = detect_format(raw)
    cc = fmt.convert(raw, opts)
    raw.release()
    validate(cc, raw)
    cc.format = fmt.name
    cc.path = str(weights)
    cc.extra.setdefault("notes", []).extend(opts.notes)
    cc.extra.setdefault("warnings", []).extend(opts.warnings)
    cc.extra["stored_dtypes"] = list(raw.stored_dtypes)
    return cc, raw, fmt


def load_checkpoint(
    path: str | Path | None,
    *,
    models: list[str] | None = None,
    hook_point: str | None = None,
    scale: list[float] | None = None,
) -> Crosscoder:
    """Load a checkpoint of any supported format as a canonical float32 :class:`Crosscoder`.

    ``path``: a weights file, its config file, or a folder (its newest checkpoint); ``None`` = the demo
    checkpoint. ``models`` (``--model``) replaces the checkpoint's model ids when given once per model and
    completes them when given fewer times (a ckkissane two-model cfg names only the first model).
    ``hook_point`` (``--hook-point``) replaces the checkpoint's hook point(s); comma-separated for several.
    ``scale`` (``--scale``): the input normalisation factor, one per source or one for all.

    Raises :class:`AtlasError` for anything wrong with the input, including NaN/inf weights.
    """
    opts = Options(models=list(models) if models else None, hook_point=hook_point,
                   scale=list(scale) if scale else None, strict=True)
    cc, raw, _ = read_checkpoint(path, opts)
    problems = weight_problems(cc)
    if problems:
        raise AtlasError(
            f"{raw.path} has non-finite weights ({'; '.join(problems)}); the training run diverged or the file "
            "is damaged: use an earlier checkpoint"
        )
    return cc


def describe_checkpoint(
    path: str | Path | None,
    *,
    models: list[str] | None = None,
    hook_point: str | None = None,
    scale: list[float] | None = None,
) -> str:
    """The ``atlas inspect`` report: format, sources, shapes, dtype, activation, normalisation, warnings.

    Unknown model ids and hook points are shown as ``unknown: pass --model`` instead of failing.
    """
    from .describe import describe

    opts = Options(models=list(models) if models else None, hook_point=hook_point,
                   scale=list(scale) if scale else None, strict=False)
    cc, raw, fmt = read_checkpoint(path, opts)
    warnings = list(cc.extra.get("warnings", []))
    warnings += [f"{p} (atlas build refuses this checkpoint)" for p in weight_problems(cc)]
    zero = zero_decoder_features(cc)
    if zero:
        shown = ", ".join(map(str, zero[:10])) + (", …" if len(zero) > 10 else "")
        warnings.append(f"{len(zero):,} feature(s) have an all-zero decoder and can never matter: {shown}")
    return describe(cc, raw, fmt.label, warnings)
