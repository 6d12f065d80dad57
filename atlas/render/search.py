"""Search index: which features fire most on a token, and which labels contain a word.

Both indexes are split into shards by the first two characters of the key, hashed (FNV-1a 32 over the
UTF-8 bytes) into a power-of-two number of shards, so the browser loads only the shard a query needs
(``Atlas.search`` in ``assets/atlas.js`` computes the same hash). Searching by feature id needs no file.

Token keys are the token as shown (:func:`atlas.render.text.visible`), stripped and lowercased: `` The``,
``the`` and ``THE`` share the key ``the``; whitespace-only tokens are not searchable. A feature counts
for a token when the token is the max-activating token of one of its top examples; features are ranked
by the sum of those examples' activation relative to the feature's max.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .chunks import chunk_script, pack, to_msgpack
from .labels import Label
from .text import visible

MAX_FEATURES_PER_KEY = 64
MAX_STRINGS_PER_KEY = 4
TARGET_SHARD_BYTES = 24_000
_WORD = re.compile(r"[^\W_]+")


def token_key(token: str) -> str:
    """The search key of a token string (see the module docstring); ``""`` when not searchable."""
    return visible(token).strip().lower()


def label_words(text: str) -> list[str]:
    """Lowercased words (letters and digits) of a label, in order, without repeats."""
    seen: dict[str, None] = {}
    for w in _WORD.findall(text.lower()):
        seen.setdefault(w)
    return list(seen)


def fnv1a32(text: str) -> int:
    h = 0x811C9DC5
    for b in text.encode("utf-8"):
        h ^= b
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h


def shard_of(key: str, n_shards: int) -> int:
    """The shard holding ``key``: FNV-1a of its first two characters, modulo ``n_shards`` (a power of 2)."""
    return fnv1a32(key[:2]) & (n_shards - 1)


def _n_shards(total_bytes: int) -> int:
    n = 1
    while n * TARGET_SHARD_BYTES < total_bytes:
        n *= 2
    return n


@dataclass
class TokenShard:
    """``data/search/t<k>.js``: token search entries whose key falls in shard ``k``.

    Read by ``assets/atlas.js`` (``Atlas.search``). msgpack map ``{"k": k, "e": [entry, ...]}``, entries
    sorted by key, each ``[key, [token strings], ids, counts]``: ``ids`` bin uint32 LE feature ids,
    best first; ``counts`` bin uint8: how many of the feature's top examples peak on the token.
    """

    k: int
    entries: list


@dataclass
class LabelShard:
    """``data/search/l<k>.js``: label words whose key falls in shard ``k``.

    Read by ``assets/atlas.js`` (``Atlas.search``). msgpack map ``{"k": k, "w": [[word, ids], ...],
    "l": [[id, label], ...]}``: ``ids`` bin uint32 LE (ascending) of the features whose label contains
    ``word``; ``l`` the labels of those features, so results show without the index.
    """

    k: int
    words: list
    labels: list


class TokenIndexBuilder:
    """Collects (feature, max token, weight) triples while features render; writes the token shards."""

    def __init__(self, strings: list[str]):
        self.strings = strings
        keys = [token_key(s) for s in strings]
        uniq = sorted(set(k for k in keys if k))
        self.key_names = uniq
        pos = {k: n for n, k in enumerate(uniq)}
        self.key_of = np.array([pos.get(k, -1) for k in keys], dtype=np.int64)  # site id → key index
        self._feat: list[np.ndarray] = []
        self._tok: list[np.ndarray] = []
        self._w: list[np.ndarray] = []

    def add_many(self, feature_ids: np.ndarray, site_ids: np.ndarray, weights: np.ndarray) -> None:
        if len(site_ids):
            self._feat.append(np.asarray(feature_ids, dtype=np.int64))
            self._tok.append(np.asarray(site_ids, dtype=np.int64))
            self._w.append(np.asarray(weights, dtype=np.float64))

    def shards(self) -> tuple[int, list[TokenShard]]:
        """``(n_shards, shards)``; every shard index below ``n_shards`` is present (some empty)."""
        if self._feat:
            feat = np.concatenate(self._feat)
            tok = np.concatenate(self._tok)
            w = np.concatenate(self._w)
        else:
            feat = tok = np.zeros(0, np.int64)
            w = np.zeros(0)
        key = self.key_of[tok] if len(tok) else tok
        ok = key >= 0
        feat, tok, w, key = feat[ok], tok[ok], w[ok], key[ok]
        entries = []
        if len(key):
            # one row per (key, feature): summed weight and count; per (key, token): count for strings
            fbase = int(feat.max()) + 1
            uniq, inv = np.unique(key * fbase + feat, return_inverse=True)
            inv = inv.ravel()
            uniq = np.stack([uniq // fbase, uniq % fbase], axis=1)
            score = np.bincount(inv, weights=w)
            count = np.bincount(inv)
            order = np.lexsort((uniq[:, 1], -score, uniq[:, 0]))
            uk, uf, uc = uniq[order, 0], uniq[order, 1], count[order]
            starts = np.flatnonzero(np.r_[True, uk[1:] != uk[:-1]])
            ends = np.r_[starts[1:], len(uk)]
            tbase = int(tok.max()) + 1
            tkeys, tcount = np.unique(key * tbase + tok, return_counts=True)
            tpair = np.stack([tkeys // tbase, tkeys % tbase], axis=1)
            tstarts = np.flatnonzero(np.r_[True, tpair[1:, 0] != tpair[:-1, 0]])
            tends = np.r_[tstarts[1:], len(tpair)]
            tok_strings = {}
            for s0, e0 in zip(tstarts, tends):
                rows = np.lexsort((tpair[s0:e0, 1], -tcount[s0:e0]))[:MAX_STRINGS_PER_KEY]
                tok_strings[int(tpair[s0, 0])] = [self.strings[int(t)] for t in tpair[s0:e0, 1][rows]]
            for s0, e0 in zip(starts, ends):
                e0 = min(e0, s0 + MAX_FEATURES_PER_KEY)
                k = int(uk[s0])
                entries.append([self.key_names[k], tok_strings[k], pack(uf[s0:e0], "u4"),
                                pack(np.minimum(uc[s0:e0], 255), "u1")])
        total = sum(len(to_msgpack(e)) for e in entries)
        n = _n_shards(total // 2)  # deflate roughly halves these
        groups: list[list] = [[] for _ in range(n)]
        for e in entries:
            groups[shard_of(e[0], n)].append(e)
        return n, [TokenShard(k, g) for k, g in enumerate(groups)]


def token_shard_files(builder: TokenIndexBuilder) -> tuple[int, dict[str, bytes]]:
    n, shards = builder.shards()
    return n, {f"data/search/t{s.k}.js": chunk_script(f"search/t{s.k}", {"k": s.k, "e": s.entries})
               for s in shards}


def label_shard_files(labels: dict[int, Label], feature_ids: set[int]) -> tuple[int, dict[str, bytes]]:
    """``(n_shards, files)`` of the label index for the labels of features in ``feature_ids``."""
    by_word: dict[str, list[int]] = {}
    for fid in sorted(labels):
        if fid not in feature_ids:
            continue
        for w in label_words(labels[fid].label):
            by_word.setdefault(w, []).append(fid)
    total = sum(len(w) + 5 * len(ids) + 40 for w, ids in by_word.items())
    n = _n_shards(total)
    shards = [LabelShard(k, [], []) for k in range(n)]
    for w in sorted(by_word):
        shards[shard_of(w, n)].words.append([w, pack(by_word[w], "u4")])
    for sh in shards:
        ids = sorted({int(i) for _, b in sh.words for i in np.frombuffer(b, "<u4")})
        sh.labels = [[i, labels[i].label] for i in ids]
    return n, {f"data/search/l{s.k}.js": chunk_script(f"search/l{s.k}", {"k": s.k, "w": s.words, "l": s.labels})
               for s in shards}
