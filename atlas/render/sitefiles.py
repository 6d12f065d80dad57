"""Small site-wide files: the site marker, ``data/meta.js``, ``features.csv``, ``sitemap.xml``, ``.nojekyll``."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from xml.sax.saxutils import escape

from .. import __version__
from .features import FeatureFacts
from .labels import Label
from .text import chip

MARKER = "atlas-site.json"
SITE_FORMAT = 1
SITEMAP_MAX_URLS = 50_000


@dataclass
class SiteMarker:
    """``atlas-site.json``: marks a folder as an atlas site and lists what :func:`verify_site` checks.

    Read by :mod:`atlas.render.verify` and by :func:`atlas.render.render_site` (which only replaces a
    non-empty folder that holds this file). No JS reads it.
    """

    generator: str
    version: str
    site_format: int
    first_id: int
    n_features: int
    has_diff: bool
    title: str

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def make_marker(first_id: int, n_features: int, has_diff: bool, title: str) -> SiteMarker:
    return SiteMarker("crosscoder-atlas", __version__, SITE_FORMAT, first_id, n_features, has_diff, title)


@dataclass
class SiteMeta:
    """``data/meta.js``: site-wide constants every page's JS needs, as ``Atlas.meta({...});`` (JSON).

    Read by ``assets/atlas.js`` (``Atlas.meta``) on every page. Keys: ``title``, ``first_id``,
    ``n_features``, ``sources`` (``[{model, site}]``), ``window_before``, ``window``, ``hist``
    (``{log10_min, log10_max, bins}`` of the activation histograms), ``vocab`` (``{size, shard_bits,
    n_shards, id_bytes}``), ``index`` (``{n_chunks, rows_per_chunk}``), ``search`` (``{token_shards,
    label_shards}``), ``has_labels``, ``has_diff``, ``latent_scaling`` (the cache has ν^ε/ν^r: index columns and filters), ``rel_thresholds`` (``[a_only_below, b_only_above]``: the model-diff
    class thresholds of the relative norm, ``features.diff_thresholds``), ``min_active`` (a feature with
    fewer active tokens is flagged and its correlations hidden: ``atlas render --min-active``),
    ``special`` (site ids of the tokenizer's special tokens, ``Manifest.special_ids``: marked in example
    windows; empty for a cache without them), ``outlier_dims`` (per source, the decoder's outlier
    dimensions, ``Manifest.outlier_dims``, flagged in the alignment and correlation tables and left out of
    the logit tables; null when the cache has none recorded), ``outlier_factor`` (``Settings.outlier_factor``:
    the RMS ratio over the median dimension above which a dimension is an outlier),
    ``logits_without_outliers`` (true when the logit tables leave the outlier dimensions out, as the
    analysis does since ``LogitEffects.outlier_share`` exists; false for older caches, whose tables
    include them).
    Only where the cache has them
    (``features.corpus_meta``): ``corpora`` (``[{name, n_sequences, n_tokens}]``, the named corpora in the
    order of the index chunks' ``cd`` columns) and ``has_special`` (the chunks carry ``sp``).
    """

    obj: dict

    def to_bytes(self) -> bytes:
        text = json.dumps(self.obj, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
        return f"Atlas.meta({text});\n".encode("ascii")


def _g(x: float) -> str:
    if x != x:  # NaN
        return ""
    return f"{x:.6g}"


def features_csv(facts: list[FeatureFacts], strings: list[str], labels: dict[int, Label], n_sources: int,
                 latent_scaling: bool = False, corpora: list[str] = (), has_special: bool = False) -> bytes:
    """``features.csv``: one row per feature (read by people and spreadsheets; no JS reads it).

    Columns: ``id, label, density, n_active, max_act, mean_act, [rel_norm, dec_cos,] [nu_err, nu_rec,]
    dec_norm_<s>..., peak_source, top_tokens, url``; ``top_tokens`` are token chips separated by spaces;
    ``nu_*`` (latent scaling) are empty where undefined. Then, per named corpus, ``density_<name>,
    max_act_<name>``, and ``special_share`` when the cache has it.
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["id", "label", "density", "n_active", "max_act", "mean_act"]
    if n_sources == 2:
        head += ["rel_norm", "dec_cos"]
    if latent_scaling:
        head += ["nu_err", "nu_rec"]
    head += [f"dec_norm_{s}" for s in range(n_sources)] + ["peak_source", "top_tokens", "url"]
    head += [f"{what}_{name}" for name in corpora for what in ("density", "max_act")]
    head += ["special_share"] if has_special else []
    w.writerow(head)
    for f in facts:
        lab = labels.get(f.id)
        row = [f.id, lab.label if lab else "", _g(f.density), f.n_active, _g(f.max_act), _g(f.mean_act)]
        if n_sources == 2:
            row += [_g(f.rel_norm), _g(f.dec_cos)]
        if latent_scaling:
            row += [_g(f.nu_err), _g(f.nu_rec)]
        row += [_g(x) for x in f.dec_norm] + [f.peak, " ".join(chip(strings[t]) for t in f.top_tokens),
                                              f"f/{f.id}/"]
        for d, mx in zip(f.corpus_density, f.corpus_max) if corpora else ():
            row += [_g(d), _g(mx)]
        if has_special:
            row.append(_g(f.special_share))
        w.writerow(row)
    return buf.getvalue().encode("utf-8")


def sitemap_files(paths: list[str], site_url: str | None) -> dict[str, bytes]:
    """``sitemap.xml`` (and ``sitemap-<k>.xml`` when there are more than 50,000 URLs).

    With ``site_url`` the locations are absolute (as search engines require); without it they are
    relative to the site folder, and a deploy step can prefix them.
    """
    base = (site_url.rstrip("/") + "/") if site_url else ""
    head = '<?xml version="1.0" encoding="UTF-8"?>\n'
    ns = 'xmlns="http://www.sitemaps.org/schemas/sitemap/0.9"'

    def urlset(ps: list[str]) -> bytes:
        body = "".join(f"<url><loc>{escape(base + p)}</loc></url>\n" for p in ps)
        return (head + f"<urlset {ns}>\n" + body + "</urlset>\n").encode("utf-8")

    if len(paths) <= SITEMAP_MAX_URLS:
        return {"sitemap.xml": urlset(paths)}
    out = {}
    parts = [paths[i:i + SITEMAP_MAX_URLS] for i in range(0, len(paths), SITEMAP_MAX_URLS)]
    for k, ps in enumerate(parts):
        out[f"sitemap-{k}.xml"] = urlset(ps)
    index = "".join(f"<sitemap><loc>{escape(base)}sitemap-{k}.xml</loc></sitemap>\n" for k in range(len(parts)))
    out["sitemap.xml"] = (head + f"<sitemapindex {ns}>\n" + index + "</sitemapindex>\n").encode("utf-8")
    return out
