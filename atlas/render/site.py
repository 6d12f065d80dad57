"""``render_site``: the analysis cache → a complete static site, written atomically.

Site layout (each file's schema is documented where it is written)::

    index.html            the feature table (site_templates/index.html, assets/index.js)
    f/<id>/index.html     one page per feature, payload embedded (features.FeaturePayload)
    diff/index.html       model-diff overview, two or more sources (overview.Chart)
    404.html  sitemap.xml  features.csv  .nojekyll  atlas-site.json (sitefiles)
    assets/               shared CSS/JS and vendored msgpack (assets)
    data/meta.js          site constants (sitefiles.SiteMeta)
    data/vocab/<k>.js     token strings (vocab.VocabShard)
    data/index/<k>.js     index table rows (index.IndexChunk)
    data/search/t<k>.js   token search (search.TokenShard)
    data/search/l<k>.js   label search (search.LabelShard)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .assets import asset_files
from .chunks import encode_payload
from .features import FeatureFacts, iter_features
from .index import ROWS_PER_CHUNK, index_chunk_files
from .labels import Label, load_labels
from .load import load_cache
from .output import StagedSite
from .overview import REL_A_ONLY, REL_B_ONLY, overview_charts, rel_class
from .pages import SiteInfo, feature_page_context, make_environment
from .search import TokenIndexBuilder, label_shard_files, token_shard_files
from .sitefiles import MARKER, SiteMeta, features_csv, make_marker, sitemap_files
from .vocab import build_site_vocab


@dataclass
class RenderSummary:
    n_features: int
    n_files: int
    total_bytes: int
    largest_file_bytes: int
    largest_file: str = ""


def _site_title(cache, title: str | None) -> str:
    if title:
        return title
    if cache.manifest.title:
        return cache.manifest.title
    models = []
    for s in cache.manifest.sources:
        if s.model not in models:
            models.append(s.model)
    kind = "SAE" if len(cache.manifest.sources) == 1 else "crosscoder"
    return f"{' vs '.join(m.rsplit('/', 1)[-1] for m in models)} {kind}"


def _source_names(cache) -> list[str]:
    return [f"{s.model} · {s.site}" for s in cache.manifest.sources]


def render_site(cache_dir: Path, out: Path, *, title: str | None = None, labels: str | Path | None = None,
                site_url: str | None = None, progress: bool | None = None) -> RenderSummary:
    """Render the site for the cache at ``cache_dir`` into ``out`` (replaced only when complete).

    ``labels``: a labels file (:mod:`atlas.render.labels`). ``site_url``: the public URL of the site,
    used only for absolute URLs in ``sitemap.xml``. ``progress``: show a progress bar (default: when
    stderr is a terminal).
    """
    cache = load_cache(Path(cache_dir))
    label_map = load_labels(labels)
    out = Path(out)
    m = cache.manifest
    F, S = m.n_features, len(m.sources)
    first = m.feature_offset
    page_ids = range(first, first + F)
    unknown = [i for i in label_map if i not in page_ids]
    if labels is not None and label_map and len(unknown) == len(label_map):
        from ..errors import AtlasError

        raise AtlasError(f"no feature of this site ({first}–{first + F - 1}) has a label in {labels}; "
                         "check the ids in the labels file")
    if unknown:
        print(f"atlas: note: {len(unknown)} labels in {labels} name features outside this site and are ignored",
              file=sys.stderr)
    names = _source_names(cache)
    site = SiteInfo(title=_site_title(cache, title), has_diff=S >= 2, n_features=F, first_id=first,
                    sources=names, dataset=m.dataset, n_tokens=m.n_tokens)
    vocab = build_site_vocab(cache)
    env = make_environment()
    feature_tpl = env.get_template("feature.html")

    staged = StagedSite(out)
    try:
        staged.write_all(asset_files())
        staged.write_all(vocab.shard_files())

        tokens = TokenIndexBuilder(vocab.strings)
        facts_all: list[FeatureFacts] = []
        neighbours = cache.features.neighbours
        neighbour_cos = cache.features.neighbour_cos
        bar = tqdm(total=F, unit="feature", desc="render", disable=(not progress) if progress is not None else None,
                   file=sys.stderr, mininterval=0.5)
        for facts, payload, ct, cw in iter_features(cache, vocab):
            nbs = [(int(i), float(c)) for i, c in zip(neighbours[facts.index], neighbour_cos[facts.index])
                   if int(i) != facts.id and c == c]
            ctx = feature_page_context(site, facts, vocab.strings, label_map, nbs, encode_payload(payload.obj),
                                       page_ids)
            html = feature_tpl.render(ctx.__dict__ | {"heading": ctx.heading, "page_title": ctx.page_title,
                                                      "description": ctx.description})
            staged.write(f"f/{facts.id}/index.html", html.encode("utf-8"))
            tokens.add(facts.id, ct, cw)
            facts_all.append(facts)
            bar.update(1)
        bar.close()

        n_tok_shards, tok_files = token_shard_files(tokens)
        staged.write_all(tok_files)
        n_lab_shards, lab_files = label_shard_files(label_map, set(page_ids))
        staged.write_all(lab_files)
        has_labels = any(i in label_map for i in page_ids)
        index_files = index_chunk_files(facts_all, vocab.strings, label_map if has_labels else None)
        staged.write_all(index_files)

        meta = SiteMeta({
            "title": site.title,
            "first_id": first,
            "n_features": F,
            "sources": [{"model": s.model, "site": s.site} for s in m.sources],
            "window_before": m.settings.window_before,
            "window": m.settings.window,
            "hist": {"log10_min": m.settings.hist_log10_min, "log10_max": m.settings.hist_log10_max,
                     "bins": m.settings.hist_bins},
            "vocab": {"size": vocab.size, "shard_bits": vocab.shard_bits, "n_shards": vocab.n_shards,
                      "id_bytes": 2 if vocab.id_kind == "u2" else 4},
            "index": {"n_chunks": len(index_files), "rows_per_chunk": ROWS_PER_CHUNK},
            "search": {"token_shards": n_tok_shards, "label_shards": n_lab_shards},
            "has_labels": has_labels,
            "has_diff": site.has_diff,
            "rel_thresholds": [REL_A_ONLY, REL_B_ONLY],
        })
        staged.write("data/meta.js", meta.to_bytes())

        description = f"{site.title}: an atlas of {F:,} features of {', '.join(names)}."
        staged.write("index.html", env.get_template("index.html").render(
            root="", site=site, description=description, n_sources=S, has_labels=has_labels,
            rel_a=REL_A_ONLY, rel_b=REL_B_ONLY).encode("utf-8"))
        if site.has_diff:
            charts = overview_charts(facts_all, names)
            classes = []
            if S == 2:
                for key, name, href in (("a", "model-A-only", f"../index.html#rel=0.00-{REL_A_ONLY:.2f}"),
                                        ("shared", "shared", f"../index.html#rel={REL_A_ONLY:.2f}-{REL_B_ONLY:.2f}"),
                                        ("b", "model-B-only", f"../index.html#rel={REL_B_ONLY:.2f}-1.00")):
                    count = sum(1 for f in facts_all if f.alive and rel_class(f.rel_norm) == key)
                    classes.append({"name": name, "href": href, "count": count})
            classes.append({"name": "dead", "href": "../index.html#alive=dead",
                            "count": sum(1 for f in facts_all if not f.alive)})
            staged.write("diff/index.html", env.get_template("diff.html").render(
                root="../", site=site, charts=charts, classes=classes).encode("utf-8"))
        staged.write("404.html", env.get_template("404.html").render(site=site).encode("utf-8"))
        staged.write("features.csv", features_csv(facts_all, vocab.strings, label_map, S))
        paths = ["index.html"] + (["diff/"] if site.has_diff else []) + [f"f/{i}/" for i in page_ids]
        staged.write_all(sitemap_files(paths, site_url))
        staged.write(".nojekyll", b"")
        staged.write(MARKER, make_marker(first, F, site.has_diff, site.title).to_bytes())
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    return RenderSummary(n_features=F, n_files=staged.n_files, total_bytes=staged.total_bytes,
                         largest_file_bytes=staged.largest[1], largest_file=staged.largest[0])
