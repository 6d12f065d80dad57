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

from .features import FeatureFacts
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


@dataclass
class Neighbour:
    id: int
    cos: float
    href: str | None  # None when the feature has no page in this site
    label: str = ""


@dataclass
class FeaturePage:
    """Context of ``site_templates/feature.html`` (the page ``f/<id>/index.html``)."""

    site: SiteInfo
    f: FeatureFacts
    label: Label | None
    top_tokens: list[str]  # chip strings
    neighbours: list[Neighbour]
    prev_id: int | None
    next_id: int | None
    payload: str  # base64 (see FeaturePayload)
    root: str = FEATURE_ROOT
    source_names: list[str] = field(default_factory=list)

    @property
    def heading(self) -> str:
        return f"Feature {self.f.id}"

    @property
    def page_title(self) -> str:
        lab = f" · {self.label.label}" if self.label and self.label.label else ""
        return f"Feature {self.f.id}{lab} — {self.site.title}"

    @property
    def description(self) -> str:
        f = self.f
        if not f.alive:
            text = f"Feature {f.id} of {self.site.title}: never active on the analysed tokens."
        else:
            text = (f"Feature {f.id} of {self.site.title}: active on {fmt_pct(f.density)} of tokens, "
                    f"max activation {fmt_num(f.max_act)}.")
            if self.top_tokens:
                text += " Top tokens: " + ", ".join(self.top_tokens) + "."
        if self.label and self.label.label:
            text = f"{self.label.label}. " + text
        return text[:300]


def feature_page_context(site: SiteInfo, facts: FeatureFacts, strings: list[str], labels: dict[int, Label],
                         neighbours: list[tuple[int, float]], payload: str, page_ids: range) -> FeaturePage:
    nbs = [Neighbour(i, c, f"../{i}/index.html" if i in page_ids else None,
                     labels[i].label if i in labels else "") for i, c in neighbours]
    fid = facts.id
    return FeaturePage(
        site=site,
        f=facts,
        label=labels.get(fid),
        top_tokens=[chip(strings[t]) for t in facts.top_tokens],
        neighbours=nbs,
        prev_id=fid - 1 if fid - 1 in page_ids else None,
        next_id=fid + 1 if fid + 1 in page_ids else None,
        payload=payload,
        source_names=site.sources,
    )
