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

import multiprocessing as mp
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import AtlasError

from .assets import asset_files
from .chunks import PAGE_LEVEL, encode_payload
from .features import FeatureFacts, iter_features
from .index import ROWS_PER_CHUNK, index_chunk_files
from .labels import Label, load_labels
from .load import load_cache
from .output import StagedSite
from .overview import REL_A_ONLY, REL_B_ONLY, overview_charts, overview_classes
from .pages import SiteInfo, feature_chrome, feature_page, make_environment
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


@dataclass
class _Job:
    """What every feature-page worker needs (set before the workers fork, shared copy-on-write)."""

    cache: object
    vocab: object
    site: SiteInfo
    labels: dict[int, Label]
    folder: Path
    page_ids: range
    template: object
    chrome: dict


@dataclass
class _RangeResult:
    facts: list[FeatureFacts]
    centre_feat: np.ndarray
    centre_tok: np.ndarray
    centre_w: np.ndarray
    n_files: int
    total_bytes: int
    largest: tuple[str, int]


_JOB: _Job | None = None
PAGES_PER_TASK = 1024
MIN_FEATURES_PER_WORKER = 2048


def _render_range(bounds: tuple[int, int]) -> _RangeResult:
    """Write the pages of features ``bounds[0]..bounds[1]`` (cache indices) into the staging folder."""
    job = _JOB
    start, stop = bounds
    facts_out: list[FeatureFacts] = []
    feats, toks, ws = [], [], []
    n_files = total = 0
    largest = ("", 0)
    fdir = job.folder / "f"
    labels = job.labels
    for facts, payload, ct, cw in iter_features(job.cache, job.vocab, start, stop):
        obj = payload.obj
        if labels:
            obj["nl"] = [labels[i].label if i in labels else "" for i in np.frombuffer(obj["nb"], "<u4").tolist()]
        ctx = feature_page(job.site, facts, job.vocab.strings, labels.get(facts.id), encode_payload(obj, PAGE_LEVEL),
                           job.page_ids, job.chrome)
        data = job.template.render(ctx.variables()).encode("utf-8")
        folder = fdir / str(facts.id)
        os.mkdir(folder)
        with open(folder / "index.html", "wb") as fh:
            fh.write(data)
        n_files += 1
        total += len(data)
        if len(data) > largest[1]:
            largest = (f"f/{facts.id}/index.html", len(data))
        facts_out.append(facts)
        if len(ct):
            feats.append(np.full(len(ct), facts.id, np.int64))
            toks.append(np.asarray(ct, np.int64))
            ws.append(np.asarray(cw, np.float64))
    cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt))
    return _RangeResult(facts_out, cat(feats, np.int64), cat(toks, np.int64), cat(ws, np.float64),
                        n_files, total, largest)


def _default_workers(n_features: int) -> int:
    if sys.platform != "linux" or "fork" not in mp.get_all_start_methods():
        return 1
    return max(1, min(os.cpu_count() or 1, 8, n_features // MIN_FEATURES_PER_WORKER))


def _render_pages(job: _Job, n_features: int, workers: int, bar) -> list[_RangeResult]:
    global _JOB
    ranges = [(a, min(n_features, a + PAGES_PER_TASK)) for a in range(0, n_features, PAGES_PER_TASK)]
    _JOB = job
    results = []
    try:
        if workers <= 1 or len(ranges) <= 1:
            for r in ranges:
                results.append(_render_range(r))
                bar.update(r[1] - r[0])
        else:
            with mp.get_context("fork").Pool(workers) as pool:
                for res in pool.imap(_render_range, ranges):
                    results.append(res)
                    bar.update(len(res.facts))
    finally:
        _JOB = None
    return results


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
                site_url: str | None = None, progress: bool | None = None, workers: int | None = None
                ) -> RenderSummary:
    """Render the site for the cache at ``cache_dir`` into ``out`` (replaced only when complete).

    ``labels``: a labels file (:mod:`atlas.render.labels`). ``site_url``: the public URL of the site,
    used only for absolute URLs in ``sitemap.xml``. ``progress``: show a progress bar (default: when
    stderr is a terminal). ``workers``: processes writing feature pages (default: one per CPU core, up
    to 8, for large sites on Linux; the output does not depend on it).
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
        raise AtlasError(f"no feature of this site ({first}–{first + F - 1}) has a label in {labels}; "
                         "check the ids in the labels file")
    if unknown:
        print(f"atlas: note: {len(unknown)} labels in {labels} name features outside this site and are ignored",
              file=sys.stderr)
    label_map = {i: lab for i, lab in label_map.items() if i in page_ids}
    names = _source_names(cache)
    site = SiteInfo(title=_site_title(cache, title), has_diff=S >= 2, n_features=F, first_id=first,
                    sources=names, dataset=m.dataset, n_tokens=m.n_tokens)
    vocab = build_site_vocab(cache)
    env = make_environment()
    workers = _default_workers(F) if workers is None else max(1, int(workers))

    staged = StagedSite(out)
    try:
        staged.write_all(asset_files())
        staged.write_all(vocab.shard_files())
        (staged.dir / "f").mkdir()
        job = _Job(cache=cache, vocab=vocab, site=site, labels=label_map, folder=staged.dir, page_ids=page_ids,
                   template=env.get_template("feature.html"), chrome=feature_chrome(env, site))
        bar = tqdm(total=F, unit="feature", desc="render", disable=(not progress) if progress is not None else None,
                   file=sys.stderr, mininterval=0.5)
        with bar:
            results = _render_pages(job, F, workers, bar)
        facts_all: list[FeatureFacts] = [f for r in results for f in r.facts]
        tokens = TokenIndexBuilder(vocab.strings)
        for r in results:
            staged.count(r.n_files, r.total_bytes, r.largest)
            tokens.add_many(r.centre_feat, r.centre_tok, r.centre_w)

        n_tok_shards, tok_files = token_shard_files(tokens)
        staged.write_all(tok_files)
        n_lab_shards, lab_files = label_shard_files(label_map, set(page_ids))
        staged.write_all(lab_files)
        has_labels = bool(label_map)
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
            rel_a=REL_A_ONLY, rel_b=REL_B_ONLY, page_scripts=["index.js"]).encode("utf-8"))
        if site.has_diff:
            staged.write("diff/index.html", env.get_template("diff.html").render(
                root="../", site=site, charts=overview_charts(facts_all, names),
                classes=overview_classes(facts_all, S), page_scripts=[]).encode("utf-8"))
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
