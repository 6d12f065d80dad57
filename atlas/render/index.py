"""The index table's data: every feature's scalars in columnar chunks.

The index page loads every chunk (they are small: ~20 bytes per feature before compression) and keeps
them in typed arrays, so sorting and filtering 100k rows happens in memory while the table renders only
the rows in view.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .chunks import chunk_script, pack
from .features import FeatureFacts
from .labels import Label
from .text import chip

ROWS_PER_CHUNK = 8192  # 3 × 8192 token strings fit the uint16 indices of ``tt``


def top_token_table(rows: list[FeatureFacts], strings: list[str], dtype) -> tuple[list[str], np.ndarray]:
    """The distinct chips of the rows' top tokens (up to 3 each, ``strings``: the site's token strings), in
    order of first use, and ``[len(rows), 3]`` indices into them plus one (0 = none) of type ``dtype``:
    the ``ts`` / ``tt`` pair of the index chunks and of ``data/diff.js``."""
    table: dict[str, int] = {}
    tt = np.zeros((len(rows), 3), dtype=dtype)
    for r, f in enumerate(rows):
        for c, t in enumerate(f.top_tokens[:3]):
            tt[r, c] = table.setdefault(chip(strings[t]), len(table)) + 1
    return list(table), tt


@dataclass
class IndexChunk:
    """``data/index/<k>.js``: rows ``k * rows_per_chunk …`` of the feature table (features in id order).

    Read by ``assets/index.js``, and by ``assets/feature.js`` for the top tokens of listed features. msgpack map:

    - ``k``: chunk index; ``start``: id of the first row; ``n``: rows
    - ``d``, ``m``: bin float32 LE density and max activation
    - ``r``, ``c``: bin float32 LE relative decoder norm and decoder cosine (NaN unless S = 2)
    - ``p``: bin uint16 LE peak source (argmax of the decoder norm)
    - ``dc``: bin int8 model-diff class (``FeatureFacts.diff_class``: -1 none, 0 model-A-only,
      1 shared, 2 model-B-only), which the class filter and badges use
    - ``ts``: token chip strings used by this chunk; ``tt``: bin uint16 LE ``n × 3``: top tokens as
      indices into ``ts`` plus one (0 = none)
    - ``lb``: list of ``n`` labels (``""`` for none), or ``null`` when the site has no labels
    - ``ne``, ``nr``: bin float32 LE latent-scaling ratios ν^ε and ν^r (``FeatureFacts.nu_err`` /
      ``nu_rec``; NaN where undefined), or ``null`` when the site has no latent scaling
      (``meta.latent_scaling``)

    Optional keys, only where the cache has the statistic (``meta.corpora`` / ``meta.has_special``):

    - ``cd``: bin float32 LE ``n × C``: density on each named corpus (row by row, corpora in the order
      of ``meta.corpora``)
    - ``sp``: bin float32 LE: share of the feature's activations on special tokens (NaN: never active)
    """

    k: int
    rows: list[FeatureFacts]
    special: bool = False  # write ``sp`` (the cache has special_n_active)

    def to_obj(self, strings: list[str], labels: dict[int, Label] | None, latent_scaling: bool = False) -> dict:
        rows = self.rows
        table, tt = top_token_table(rows, strings, np.uint16)  # at most 3 × ROWS_PER_CHUNK strings
        obj = {
            "k": self.k,
            "start": rows[0].id if rows else 0,
            "n": len(rows),
            "d": pack([f.density for f in rows], "f4"),
            "m": pack([f.max_act for f in rows], "f4"),
            "r": pack([f.rel_norm for f in rows], "f4"),
            "c": pack([f.dec_cos for f in rows], "f4"),
            "p": pack([f.peak for f in rows], "u2"),
            "dc": pack([f.diff_class for f in rows], "i1"),
            "ts": table,
            "tt": pack(tt.ravel(), "u2"),
            "lb": None if labels is None else [labels[f.id].label if f.id in labels else "" for f in rows],
            "ne": pack([f.nu_err for f in rows], "f4") if latent_scaling else None,
            "nr": pack([f.nu_rec for f in rows], "f4") if latent_scaling else None,
        }
        if rows and rows[0].corpus_density:
            obj["cd"] = pack(np.asarray([f.corpus_density for f in rows], dtype=np.float64).ravel(), "f4")
        if self.special:
            obj["sp"] = pack([f.special_share for f in rows], "f4")
        return obj


def index_chunk_files(facts: list[FeatureFacts], strings: list[str], labels: dict[int, Label] | None,
                      rows_per_chunk: int = ROWS_PER_CHUNK, latent_scaling: bool = False,
                      special: bool = False) -> dict[str, bytes]:
    """``{path in the site: bytes}`` of every index chunk (at least one, possibly empty)."""
    out = {}
    n_chunks = max(1, (len(facts) + rows_per_chunk - 1) // rows_per_chunk)
    for k in range(n_chunks):
        chunk = IndexChunk(k, facts[k * rows_per_chunk:(k + 1) * rows_per_chunk], special=special)
        out[f"data/index/{k}.js"] = chunk_script(f"index/{k}", chunk.to_obj(strings, labels, latent_scaling))
    return out
