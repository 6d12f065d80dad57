"""The site's token table: token strings stored once, in shards, ordered by how often they are shown.

Examples, logit tables and search results refer to tokens by *site id*: the rank of the token among
those the site can show (corpus tokens and logit-table tokens), most frequent first, starting at 1; site
id 0 means "no token" (a window position outside its sequence). Frequent tokens therefore share the
first shards, ids fit in uint16 for any vocabulary with fewer than 65,535 used tokens, and a page loads
only the shards its tokens fall in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..cache import Cache
from .chunks import chunk_script, pack

SHARD_BITS = 11  # 2048 tokens per shard


@dataclass
class VocabShard:
    """``data/vocab/<k>.js``: the token strings with site ids ``[k << bits, (k + 1) << bits)``.

    Read by ``assets/atlas.js`` (``Atlas.vocab.ensure``), loaded by feature pages for the shards listed
    in their payload (``vs``). msgpack map ``{"k": shard index, "s": [display string, ...]}`` in site-id
    order (site id 0 is ``""``).
    """

    k: int
    strings: list[str]

    def to_obj(self) -> dict:
        return {"k": self.k, "s": self.strings}


@dataclass
class TokenIdShard:
    """``data/vocab/ids<k>.js``: the tokenizer id of each token of vocab shard ``k``.

    Read by ``assets/atlas.js`` (``Atlas.tokIdAsync``) only when a token is hovered: ids of
    frequency-ranked tokens do not compress, so they are kept out of the string shards every page
    loads. msgpack map ``{"k": shard index, "o": bin uint32 LE}`` (0xFFFFFFFF for site id 0).
    """

    k: int
    orig_ids: np.ndarray

    def to_obj(self) -> dict:
        return {"k": self.k, "o": pack(self.orig_ids, "u4")}


@dataclass
class SiteVocab:
    site_of: np.ndarray  # int64[V + 1]: tokenizer id + 1 → site id (index 0: token -1 → site id 0)
    strings: list[str]  # site id → display string
    orig_ids: np.ndarray  # site id → tokenizer id (-1 for site id 0)
    shard_bits: int = SHARD_BITS

    @property
    def size(self) -> int:
        return len(self.strings)

    @property
    def id_kind(self) -> str:
        """Packed width of site ids: ``u2`` when every id fits in 16 bits, else ``u4``."""
        return "u2" if self.size <= 0xFFFF else "u4"

    @property
    def n_shards(self) -> int:
        return (self.size + (1 << self.shard_bits) - 1) >> self.shard_bits

    def to_site(self, token_ids: np.ndarray) -> np.ndarray:
        """Tokenizer ids (``-1`` = no token) → site ids."""
        ids = np.asarray(token_ids)
        return self.site_of[np.clip(ids, -1, len(self.site_of) - 2) + 1]

    def shard_files(self) -> dict[str, bytes]:
        """``{path in the site: bytes}`` of every string shard and token-id shard."""
        size = 1 << self.shard_bits
        out = {}
        for k in range(self.n_shards):
            lo, hi = k * size, min((k + 1) * size, self.size)
            out[f"data/vocab/{k}.js"] = chunk_script(f"vocab/{k}", VocabShard(k, self.strings[lo:hi]).to_obj())
            ids = self.orig_ids[lo:hi].astype(np.int64) & 0xFFFFFFFF
            out[f"data/vocab/ids{k}.js"] = chunk_script(f"vocab/ids{k}", TokenIdShard(k, ids).to_obj())
        return out


def build_site_vocab(cache: Cache, shard_bits: int = SHARD_BITS) -> SiteVocab:
    """Rank the tokens the site can show: by count in the corpus plus in logit tables (the B−A table
    included), then by id."""
    V = len(cache.vocab)
    counts = np.zeros(V, dtype=np.int64)
    toks = np.asarray(cache.tokens).ravel()
    toks = toks[(toks >= 0) & (toks < V)]
    counts += np.bincount(toks, minlength=V)[:V]
    lg = cache.logits
    for arr in (lg.top_ids, lg.bot_ids, lg.diff_top_ids, lg.diff_bot_ids):
        if arr is None:  # the B−A table: optional
            continue
        ids = np.asarray(arr).ravel()
        ids = ids[(ids >= 0) & (ids < V)]
        counts += np.bincount(ids, minlength=V)[:V]
    used = np.flatnonzero(counts)
    order = used[np.lexsort((used, -counts[used]))]
    site_of = np.zeros(V + 1, dtype=np.int64)
    site_of[order + 1] = np.arange(1, len(order) + 1)
    orig_ids = np.concatenate([[-1], order]).astype(np.int64)
    strings = [""] + [cache.vocab[int(i)] for i in order]
    return SiteVocab(site_of=site_of, strings=strings, orig_ids=orig_ids, shard_bits=shard_bits)


def special_site_ids(cache: Cache, vocab: SiteVocab) -> list[int]:
    """Sorted site ids of the tokenizer's special tokens (``Manifest.special_ids``) that the site shows;
    empty for a cache written before they were recorded."""
    ids = np.asarray(cache.manifest.special_ids or [], dtype=np.int64)
    ids = ids[(ids >= 0) & (ids < len(cache.vocab))]
    site = vocab.to_site(ids)
    return sorted(int(i) for i in set(site[site > 0].tolist()))
