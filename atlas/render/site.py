"""``render_site``: the analysis cache → a complete static site, written atomically.

Site layout; each file's schema is the dataclass named here, documented where it is defined (path in
the site, and which script reads it)::

    index.html            pages.IndexPage          feature table, filled by assets/index.js
    f/<id>/index.html     pages.FeaturePage        one per feature; embeds features.FeaturePayload,
                                                   drawn by assets/feature.js
    diff/index.html       pages.OverviewPage       model-diff overview, two or more sources (overview.Chart)
    data/diff.js          overview.OverviewData    overview scatter points, two sources (assets/diff.js)
    404.html              pages.NotFoundPage
    atlas-site.json       sitefiles.SiteMarker     marks the folder as an atlas site (verify, replace)
    features.csv  sitemap.xml  .nojekyll           sitefiles.features_csv / sitemap_files
    assets/               assets (module docstring) shared CSS/JS and vendored msgpack
    data/meta.js          sitefiles.SiteMeta       site constants (assets/atlas.js)
    data/vocab/<k>.js     vocab.VocabShard         token strings (assets/atlas.js)
    data/vocab/ids<k>.js  vocab.TokenIdShard       tokenizer ids, on hover (assets/atlas.js)
    data/index/<k>.js     index.IndexChunk         index table rows (assets/index.js)
    data/search/t<k>.js   search.TokenShard       token search (assets/atlas.js)
    data/search/l<k>.js   search.LabelShard       label search (assets/atlas.js)

Feature pages are written by worker processes (fork, Linux) while this process builds the site-wide
files; the output does not depend on the number of workers.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import AtlasError
from ..lifetimes import frozen

from .assets import asset_files
from .chunks import PAGE_LEVEL, chunk_script, encode_payload
from .features import (DIFF_A_ONLY, DIFF_B_ONLY, FeatureFacts, WindowTokens, corpus_meta, corpus_names, diff_thresholds, feature_facts,
                       iter_features)
from .index import ROWS_PER_CHUNK, index_chunk_files
from .labels import Label, load_labels
from .load import load_cache
from .output import StagedSite
from .overview import OverviewData, extreme_features, nu_specific_count, overview_charts, overview_classes
from .pages import IndexPage, NotFoundPage, OverviewPage, SiteInfo, feature_chrome, feature_page, make_environment
from .search import TokenIndexBuilder, label_shard_files, token_shard_files
from .sitefiles import MARKER, SiteMeta, features_csv, make_marker, sitemap_files
from .vocab import build_site_vocab, special_site_ids


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
    gather: WindowTokens
    site: SiteInfo
    labels: dict[int, Label]
    folder: Path
    page_ids: range
    template: object
    chrome: dict


@dataclass
class _PagesWritten:
    n_pages: int
    total_bytes: int
    largest: tuple[str, int]


_JOB: _Job | None = None
PAGES_PER_TASK = 1024
FACTS_BLOCK = 4096
MIN_FEATURES_PER_WORKER = 2048


def _render_range(bounds: tuple[int, int]) -> _PagesWritten:
    """Write the pages of features ``bounds[0]..bounds[1]`` (cache indices) into the staging folder."""
    job = _JOB
    start, stop = bounds
    total = 0
    largest = ("", 0)
    fdir = job.folder / "f"
    labels = job.labels
    for facts, payload in iter_features(job.cache, job.vocab, start, stop, gather=job.gather):
        obj = payload.obj
        if labels:
            obj["nl"] = [labels[i].label if i in labels else "" for i in np.frombuffer(obj["nb"], "<u4").tolist()]
            if "fi" in obj:
                obj["fl"] = [labels[i].label if i in labels else "" for i in np.frombuffer(obj["fi"], "<u4").tolist()]
        ctx = feature_page(job.site, facts, job.vocab.strings, labels.get(facts.id), encode_payload(obj, PAGE_LEVEL),
                           job.page_ids, job.chrome)
        data = job.template.render(ctx.variables()).encode("utf-8")
        folder = fdir / str(facts.id)
        os.mkdir(folder)
        with open(folder / "index.html", "wb") as fh:
            fh.write(data)
        total += len(data)
        if len(data) > largest[1]:
            largest = (f"f/{facts.id}/index.html", len(data))
    return _PagesWritten(stop - start, total, largest)


def _default_workers(n_features: int) -> int:
    if sys.platform != "linux" or "fork" not in mp.get_all_start_methods():
        return 1
    return max(1, min(os.cpu_count() or 1, 8, n_features // MIN_FEATURES_PER_WORKER))


class _PageWriters:
    """Feature pages written by worker processes (fork) while the caller does other work, or in this
    process when ``workers`` is 1. The pages do not depend on how they were split."""

    def __init__(self, job: _Job, n_features: int, workers: int):
        global _JOB
        self.ranges = [(a, min(n_features, a + PAGES_PER_TASK)) for a in range(0, n_features, PAGES_PER_TASK)]
        self.bar = None
        self.pool = None
        self.pending = []
        _JOB = job
        self._frozen = None
        if workers > 1 and len(self.ranges) > 1:
            # forked writers never walk the objects they inherit (a collection there would copy their pages)
            self._frozen = frozen()
            self._frozen.__enter__()
            # fork before any other thread (the progress bar's monitor) exists in this process
            self.pool = mp.get_context("fork").Pool(workers)

    def start(self, bar) -> None:
        """Hand the page ranges to the workers (no-op without a pool: :meth:`results` writes them)."""
        self.bar = bar
        if self.pool is not None:
            self.pending = [self.pool.apply_async(_render_range, (r,), callback=lambda res: bar.update(res.n_pages))
                            for r in self.ranges]

    def results(self) -> list[_PagesWritten]:
        """Wait for every page (in this process when there is no pool)."""
        global _JOB
        try:
            if self.pool is None:
                out = []
                for r in self.ranges:
                    out.append(_render_range(r))
                    self.bar.update(r[1] - r[0])
                return out
            out = [p.get() for p in self.pending]
            self.pool.close()
            self.pool.join()
            return out
        finally:
            self.close()
            _JOB = None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None
        if self._frozen is not None:
            self._frozen.__exit__(None, None, None)
            self._frozen = None


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
                site_url: str | None = None, progress: bool | None = None, workers: int | None = None,
                min_active: int = 10) -> RenderSummary:
    """Render the site for the cache at ``cache_dir`` into ``out`` (replaced only when complete).

    ``labels``: a labels file (:mod:`atlas.render.labels`). ``site_url``: the public URL of the site,
    used only for absolute URLs in ``sitemap.xml``. ``progress``: show a progress bar (default: when
    stderr is a terminal). ``workers``: processes writing feature pages (default: one per CPU core, up
    to 8, for large sites on Linux; the output does not depend on it). ``min_active``: features with
    fewer active tokens are flagged as low-count and their correlations hidden.
    """
    if min_active < 0:
        raise AtlasError(f"--min-active {min_active} is negative: pass a number of active tokens, e.g. 10 "
                         "(0 shows every correlation)")
    if site_url is not None and not re.match(r"^https?://[^/\s]+(/\S*)?$", site_url):
        raise AtlasError(f"--site-url {site_url!r} is not an http(s) URL: pass the address the site is served "
                         "from, e.g. https://example.org/atlas/")
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
                    sources=names, dataset=m.dataset, n_tokens=m.n_tokens, rel_thresholds=diff_thresholds(cache),
                    latent_scaling=S == 2 and cache.features.ls_nu_err is not None,
                    corpora=corpus_names(cache), min_active=int(min_active))
    vocab = build_site_vocab(cache)
    env = make_environment()
    workers = _default_workers(F) if workers is None else max(1, int(workers))

    staged = StagedSite(out)
    try:
        staged.write_all(asset_files())
        staged.write_all(vocab.shard_files())
        (staged.dir / "f").mkdir()
        gather = WindowTokens(cache, vocab)
        job = _Job(cache=cache, vocab=vocab, gather=gather, site=site, labels=label_map, folder=staged.dir,
                   page_ids=page_ids, template=env.get_template("feature.html"), chrome=feature_chrome(env, site))
        writers = _PageWriters(job, F, workers)
        try:
            with tqdm(total=F, unit="feature", desc="render", file=sys.stderr, mininterval=0.5,
                      disable=(not progress) if progress is not None else None) as bar:
                writers.start(bar)  # pages are written while the site-wide files are built
                facts_all: list[FeatureFacts] = []
                tokens = TokenIndexBuilder(vocab.strings)
                for a in range(0, F, FACTS_BLOCK):
                    block = feature_facts(cache, gather, a, min(F, a + FACTS_BLOCK))
                    facts_all.extend(block.facts)
                    tokens.add_many(block.centre_feat, block.centre_tok, block.centre_w)
                _write_site_files(staged, env, cache, site, vocab, facts_all, tokens, label_map, site_url)
                for r in writers.results():
                    staged.count(r.n_pages, r.total_bytes, r.largest)
        finally:
            writers.close()
        staged.write(MARKER, make_marker(first, F, site.has_diff, site.title).to_bytes())
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    return RenderSummary(n_features=F, n_files=staged.n_files, total_bytes=staged.total_bytes,
                         largest_file_bytes=staged.largest[1], largest_file=staged.largest[0])


def _write_site_files(staged: StagedSite, env, cache, site: SiteInfo, vocab, facts_all: list[FeatureFacts],
                      tokens: TokenIndexBuilder, label_map: dict[int, Label], site_url: str | None) -> None:
    """Everything but the feature pages and the marker: data scripts, index, overview, site files."""
    m = cache.manifest
    F, S, first = m.n_features, len(m.sources), m.feature_offset
    page_ids = range(first, first + F)
    names = site.sources
    n_tok_shards, tok_files = token_shard_files(tokens)
    staged.write_all(tok_files)
    n_lab_shards, lab_files = label_shard_files(label_map, set(page_ids))
    staged.write_all(lab_files)
    has_labels = bool(label_map)
    has_ls = site.latent_scaling
    index_files = index_chunk_files(facts_all, vocab.strings, label_map if has_labels else None,
                                    latent_scaling=has_ls, special=cache.features.special_n_active is not None)
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
        "rel_thresholds": list(site.rel_thresholds),
        "latent_scaling": has_ls,
        "min_active": site.min_active,
        "special": special_site_ids(cache, vocab),
        "outlier_dims": m.outlier_dims,
        "outlier_factor": m.settings.outlier_factor,
        "logits_without_outliers": cache.logits.outlier_share is not None,
    } | corpus_meta(cache))
    staged.write("data/meta.js", meta.to_bytes())

    description = f"{site.title}: an atlas of {F:,} features of {', '.join(names)}."
    rel_a, rel_b = site.rel_thresholds
    index_page = IndexPage(site, description, S, has_labels, rel_a, rel_b, latent_scaling=has_ls,
                           corpora=list(site.corpora), has_special=cache.features.special_n_active is not None,
                           corpus_tokens=[(c["name"], int(c.get("n_tokens", 0)))
                                          for c in (m.corpora if site.corpora else [])])
    staged.write("index.html", env.get_template("index.html").render(index_page.variables()).encode("utf-8"))
    if site.has_diff:
        overview = OverviewPage(site, overview_charts(facts_all, names, site.rel_thresholds),
                                overview_classes(facts_all, S))
        if S == 2:
            data = OverviewData(facts_all, site.rel_thresholds, has_nu=has_ls)
            staged.write("data/diff.js", chunk_script("diff", data.to_obj(vocab.strings)))
            overview.scatter = True
            overview.has_nu = has_ls
            overview.n_nu = nu_specific_count(facts_all)
            overview.lists = [
                {"key": "a", "title": "Most model-A-only features", "order": "lowest r first",
                 "rows": extreme_features(facts_all, vocab.strings, DIFF_A_ONLY, has_nu=has_ls)},
                {"key": "b", "title": "Most model-B-only features", "order": "highest r first",
                 "rows": extreme_features(facts_all, vocab.strings, DIFF_B_ONLY, has_nu=has_ls)},
            ]
            overview.page_scripts = ("diff.js",)
        staged.write("diff/index.html", env.get_template("diff.html").render(overview.variables()).encode("utf-8"))
    staged.write("404.html", env.get_template("404.html").render(NotFoundPage(site).variables()).encode("utf-8"))
    staged.write("features.csv", features_csv(facts_all, vocab.strings, label_map, S, latent_scaling=has_ls,
                                              corpora=site.corpora,
                                              has_special=cache.features.special_n_active is not None))
    paths = ["index.html"] + (["diff/"] if site.has_diff else []) + [f"f/{i}/" for i in page_ids]
    staged.write_all(sitemap_files(paths, site_url))
    staged.write(".nojekyll", b"")
