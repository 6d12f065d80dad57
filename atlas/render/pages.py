"""HTML pages: the Jinja2 environment and the context of each page.

Templates live in ``site_templates/`` (package ``atlas.site_templates``) and autoescape everything;
untrusted text (labels, token strings, dataset text) is only ever passed as template variables. Every
link is relative: a page gets ``root``, the path from it back to the site folder (``../../`` for
``f/<id>/index.html``), and links are written as ``root + path``. Internal links name ``index.html``
explicitly so that they also work from ``file://``, where folders do not resolve to their index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib.resources import files

import jinja2
from markupsafe import Markup, escape

from .features import DIFF_A_ONLY, DIFF_B_ONLY, DIFF_SHARED, FeatureFacts
from .labels import Label
from .text import chip

FEATURE_ROOT = "../../"


def _template_source(name: str):
    res = files("atlas.site_templates").joinpath(name)
    if not res.is_file():
        return None
    return res.read_text("utf-8")


def make_environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(_template_source),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["num"] = fmt_num
    env.filters["pct"] = fmt_pct
    return env


def fmt_num(x: float, digits: int = 3) -> str:
    """A number with ``digits`` significant digits; ``–`` for NaN."""
    if x is None or not math.isfinite(x):
        return "–"
    if x == 0:
        return "0"
    s = f"{x:.{digits}g}"
    if "e" in s:
        mant, exp = s.split("e")
        return f"{mant}e{int(exp)}"
    return s


def fmt_pct(x: float) -> str:
    """A fraction as a percentage with 3 significant digits."""
    if x is None or not math.isfinite(x):
        return "–"
    return fmt_num(100 * x) + "%"


@dataclass
class SiteInfo:
    """What every page shows in its chrome."""

    title: str
    has_diff: bool
    n_features: int
    first_id: int
    sources: list[str]
    dataset: str = ""
    n_tokens: int = 0
    rel_thresholds: tuple[float, float] = (0.3, 0.7)  # model-diff classes: A-only below, B-only above
    latent_scaling: bool = False  # the cache has latent scaling (two sources): pages and index show ν
    corpora: list[str] = field(default_factory=list)  # names of the named corpora (Manifest.corpora)
    min_active: int = 10  # fewer active tokens: the page flags the feature and hides its correlations


def feature_chrome(env: jinja2.Environment, site: SiteInfo) -> dict:
    """The parts every feature page shares (head links, header, footer and scripts), rendered once per
    site from ``_head.html``, ``_header.html`` and ``_footer.html`` (the same partials ``base.html``
    includes)."""
    ctx = {"root": FEATURE_ROOT, "site": site, "page_scripts": ["feature.js"]}
    return {
        "head": Markup(env.get_template("_head.html").render(ctx)),
        "header": Markup(env.get_template("_header.html").render(ctx)),
        "footer": Markup(env.get_template("_footer.html").render(ctx)),
        "site_title": Markup(escape(site.title)),
    }


@dataclass
class FeaturePage:
    """Context of ``site_templates/feature.html`` (the page ``f/<id>/index.html``): plain strings and
    numbers only, all escaped by the template."""

    site: SiteInfo
    id: int
    alive: bool
    page_title: str
    og_title: str
    description: str
    label: str
    explanation: str
    facts: list[tuple[str, str]]  # (name, formatted value)
    top_tokens: list[str]  # chip strings
    prev_id: int | None
    next_id: int | None
    payload: str  # base64 (see features.FeaturePayload)
    diff_badge: dict | None  # diff_badge(...): the model-diff class shown beside the title (S = 2)
    chrome: dict  # feature_chrome(...)
    latent_scaling: dict | None = None  # latent_scaling_panel(...) (two sources with latent scaling)
    root: str = FEATURE_ROOT
    low_count: bool = False  # alive with fewer than min_active active tokens: flagged on the page
    min_active: int = 10
    n_active: int = 0

    def variables(self) -> dict:
        return self.__dict__


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion k / n (density: active tokens of counted tokens);
    ``(0, 0)`` for n = 0. Unlike the normal approximation it stays inside [0, 1] and is honest for
    k near 0, as for a rare feature."""
    if n <= 0:
        return 0.0, 0.0
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * ((p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def diff_badge(diff_class: int, thresholds: tuple[float, float]) -> dict | None:
    """``{key, text, title}`` of a feature's model-diff class badge (``key`` as the index's ``cls`` filter:
    ``a``, ``shared``, ``b``), or None when it has no class."""
    lo, hi = thresholds
    if diff_class == DIFF_A_ONLY:
        return {"key": "a", "text": "A-only", "title": f"model-A-only: relative decoder norm r < {lo}"}
    if diff_class == DIFF_SHARED:
        return {"key": "shared", "text": "shared", "title": f"shared: {lo} ≤ r ≤ {hi}"}
    if diff_class == DIFF_B_ONLY:
        return {"key": "b", "text": "B-only", "title": f"model-B-only: relative decoder norm r > {hi}"}
    return None


def latent_scaling_panel(site: SiteInfo, f: FeatureFacts) -> dict | None:
    """The latent-scaling section of a feature page: ``{own, other, nu_err, nu_rec, rows}`` with the
    model names, the formatted ratios and per decoder direction and model the fitted β^ε and β^r
    (``rows``: ``(decoder, model, β^ε, β^r)``); None without latent scaling or for a dead feature."""
    if not site.latent_scaling or not f.alive or f.beta_err is None or f.beta_rec is None:
        return None
    names = ["A", "B"]
    own = f.peak if f.peak in (0, 1) else 0
    rows = [(f"{names[m]} ({site.sources[m]})", f"{names[t]} ({site.sources[t]})",
             fmt_num(f.beta_err[m][t]), fmt_num(f.beta_rec[m][t])) for m in (own, 1 - own) for t in (0, 1)]
    return {"own": names[own], "other": names[1 - own], "nu_err": fmt_num(f.nu_err), "nu_rec": fmt_num(f.nu_rec),
            "rows": rows}


def feature_page(site: SiteInfo, f: FeatureFacts, strings: list[str], label: Label | None, payload: str,
                 page_ids: range, chrome: dict) -> FeaturePage:
    """The context of one feature page."""
    lab = label.label if label else ""
    tokens = [chip(strings[t]) for t in f.top_tokens]
    if f.alive:
        desc = (f"Feature {f.id} of {site.title}: active on {fmt_pct(f.density)} of tokens, "
                f"max activation {fmt_num(f.max_act)}.")
        if tokens:
            desc += " Top tokens: " + ", ".join(tokens) + "."
    else:
        desc = f"Feature {f.id} of {site.title}: never active on the analysed tokens."
    if lab:
        desc = f"{lab}. {desc}"
    lo, hi = wilson_interval(f.n_active, site.n_tokens)
    density = fmt_pct(f.density) + (f" (95% CI {fmt_pct(lo)}–{fmt_pct(hi)})" if site.n_tokens > 0 else "")
    facts = [("Density", density), ("Active tokens", f"{f.n_active:,}"), ("Max activation", fmt_num(f.max_act)),
             ("Mean when active", fmt_num(f.mean_act))]
    if len(site.sources) == 2:
        facts += [("Relative norm", fmt_num(f.rel_norm)), ("Decoder cosine", fmt_num(f.dec_cos))]
    facts += corpus_facts(site.corpora, f)
    return FeaturePage(
        site=site, id=f.id, alive=f.alive,
        page_title=f"Feature {f.id}{' · ' + lab if lab else ''} — {site.title}",
        og_title=f"Feature {f.id}{': ' + lab if lab else ''}",
        description=desc[:300], label=lab, explanation=label.explanation if label else "",
        facts=facts, top_tokens=tokens,
        prev_id=f.id - 1 if f.id - 1 in page_ids else None,
        next_id=f.id + 1 if f.id + 1 in page_ids else None,
        payload=Markup(payload),  # base64: nothing to escape
        diff_badge=diff_badge(f.diff_class, site.rel_thresholds) if len(site.sources) == 2 else None,
        chrome=chrome, latent_scaling=latent_scaling_panel(site, f),
        low_count=0 < f.n_active < site.min_active, min_active=site.min_active, n_active=f.n_active,
    )


def corpus_facts(corpora: list[str], f: FeatureFacts) -> list[tuple[str, str]]:
    """Fact rows of the named corpora (density and max on each) and of the special-token share."""
    rows = [(f"On {name}", f"{fmt_pct(d)} density · max {fmt_num(mx)}")
            for name, d, mx in zip(corpora, f.corpus_density, f.corpus_max)]
    if math.isfinite(f.special_share):
        rows.append(("On special tokens", f"{fmt_pct(f.special_share)} of activations"))
    return rows


@dataclass
class IndexPage:
    """Context of ``site_templates/index.html`` (the page ``index.html``): the static frame of the
    feature table. ``assets/index.js`` fills the table from ``data/index/<k>.js`` and reads its state
    (sort, filters, bins, query) from the URL hash."""

    site: SiteInfo
    description: str
    n_sources: int
    has_labels: bool
    rel_a: float  # model-A-only below this relative norm
    rel_b: float  # model-B-only above
    latent_scaling: bool = False  # ν^ε / ν^r columns and filters
    corpora: list[str] = field(default_factory=list)  # a density column and filter per named corpus
    has_special: bool = False  # a column and filter of the special-token share
    corpus_tokens: list = field(default_factory=list)  # (name, counted tokens) per named corpus, in the summary
    root: str = ""
    page_scripts: tuple[str, ...] = ("index.js",)

    def variables(self) -> dict:
        return self.__dict__


@dataclass
class OverviewPage:
    """Context of ``site_templates/diff.html`` (the page ``diff/index.html``, sites with two or more
    sources): static SVG histograms whose bars link to the index filtered to their bin; for two sources
    also the scatter plots (``<canvas>``, drawn by ``assets/diff.js`` from ``data/diff.js``) and the
    lists of the most model-specific features."""

    site: SiteInfo
    charts: list  # overview.Chart
    classes: list[dict]  # {name, href, count}
    root: str = "../"
    page_scripts: tuple[str, ...] = ()
    scatter: bool = False  # two sources: the rel. norm × cosine scatter
    has_nu: bool = False  # the cache has latent scaling: the ν^ε × ν^r scatter and list columns
    n_nu: int = 0  # points of the ν scatter
    lists: list = field(default_factory=list)  # {key, title, order, rows: [overview.ListedFeature]}

    def variables(self) -> dict:
        return self.__dict__


@dataclass
class NotFoundPage:
    """Context of ``site_templates/404.html`` (``404.html``): self-contained (inline style and script),
    since static hosts serve it at any missing path; its inline script points the home link at the
    site root found in the URL."""

    site: SiteInfo

    def variables(self) -> dict:
        return self.__dict__
