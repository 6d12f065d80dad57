"""Checks of a written site: what must exist, and the links and assets that would break it.

``verify_site(out)`` returns a list of problems (empty when the site is fine):

- missing marker, top-level pages, shared assets, or a feature page of any id the marker lists;
- in a sample of pages (index, overview, 404 and up to 200 feature pages spread over the ids): links or
  script/style sources that are absolute (``/…``) or point at a network URL, and relative ones that
  lead to no file;
- ``http(s)://`` URLs in the shared assets (XML namespace identifiers, which are never fetched,
  excepted);
- files over 100 MB (GitHub Pages' limit).
"""

from __future__ import annotations

import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .sitefiles import MARKER

MAX_FILE_BYTES = 100 * 1000 * 1000
SAMPLE_PAGES = 200
_URL = re.compile(rb"https?://[^\s\"'`)<>]+")
_NAMESPACES = (b"http://www.w3.org/2000/svg", b"http://www.w3.org/1999/xhtml", b"http://www.w3.org/1999/xlink",
               b"http://www.sitemaps.org/schemas/sitemap/0.9")
REQUIRED = ("index.html", "404.html", ".nojekyll", "sitemap.xml", "features.csv", "data/meta.js",
            "assets/atlas.js", "assets/atlas.css", "assets/feature.js", "assets/index.js", "assets/msgpack.min.js")


class _Links(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if value is not None and name in ("href", "src") and tag in ("a", "link", "script", "img", "iframe"):
                self.links.append(value)


def _page_links(path: Path) -> list[str]:
    p = _Links()
    p.feed(path.read_text("utf-8", errors="replace"))
    return p.links


def _check_link(site: Path, page: Path, link: str) -> str | None:
    rel = page.relative_to(site).as_posix()
    parts = urlsplit(link)
    if parts.scheme in ("http", "https") or link.startswith("//"):
        return f"{rel}: network URL {link}"
    if parts.scheme in ("mailto", "data", "javascript"):
        return None if parts.scheme != "javascript" else f"{rel}: javascript: link"
    if parts.scheme:
        return f"{rel}: link with scheme {parts.scheme}: {link}"
    if link.startswith("/"):
        return f"{rel}: absolute link {link} (breaks under a sub-path and on file://)"
    if not parts.path:
        return None  # same-page fragment or query
    target = (page.parent / unquote(parts.path)).resolve()
    try:
        target.relative_to(site.resolve())
    except ValueError:
        return f"{rel}: link {link} leaves the site folder"
    if target.is_dir():
        target = target / "index.html"
    if not target.is_file():
        return f"{rel}: broken link {link}"
    return None


def _all_files(site: Path) -> dict[str, int]:
    """``{relative path: size}`` of every file under ``site`` (one stat per entry)."""
    out: dict[str, int] = {}
    stack = [("", str(site))]
    while stack:
        prefix, folder = stack.pop()
        with os.scandir(folder) as it:
            for e in it:
                rel = prefix + e.name
                if e.is_dir(follow_symlinks=False):
                    stack.append((rel + "/", e.path))
                elif e.is_file():
                    out[rel] = e.stat().st_size
    return out


def verify_site(out: Path) -> list[str]:
    """Problems found in the site at ``out`` (see the module docstring); ``[]`` when it is fine."""
    site = Path(out)
    if not site.is_dir():
        return [f"{site} is not a folder"]
    problems: list[str] = []
    marker = site / MARKER
    try:
        info = json.loads(marker.read_text("utf-8"))
        first, n = int(info["first_id"]), int(info["n_features"])
        has_diff = bool(info.get("has_diff"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{MARKER} is missing or unreadable ({exc}): not a complete atlas site"]

    files = _all_files(site)
    required = list(REQUIRED) + (["diff/index.html"] if has_diff else [])
    problems += [f"missing {r}" for r in required if r not in files]
    missing = [i for i in range(first, first + n) if f"f/{i}/index.html" not in files]
    if missing:
        problems.append(f"missing {len(missing)} feature pages (first: f/{missing[0]}/index.html)")

    pages = [site / p for p in ("index.html", "404.html", "diff/index.html") if (site / p).is_file()]
    if n:
        step = max(1, n // SAMPLE_PAGES)
        ids = sorted(set(list(range(first, first + n, step)) + [first + n - 1]))
        pages += [site / "f" / str(i) / "index.html" for i in ids if (site / "f" / str(i) / "index.html").is_file()]
    seen: set[str] = set()
    for page in pages:
        for link in _page_links(page):
            problem = _check_link(site, page, link)
            if problem and problem not in seen:
                seen.add(problem)
                problems.append(problem)

    assets = site / "assets"
    if assets.is_dir():
        for f in sorted(assets.iterdir()):
            if f.suffix in (".js", ".css", ".html") and f.is_file():
                urls = {u for u in _URL.findall(f.read_bytes()) if u.rstrip(b"/") not in _NAMESPACES}
                for u in sorted(urls)[:3]:
                    problems.append(f"assets/{f.name}: network URL {u.decode('ascii', 'replace')}")

    for rel, size in sorted(files.items()):
        if size > MAX_FILE_BYTES:
            problems.append(f"{rel} is {size / 1e6:.0f} MB (over 100 MB)")
    return problems
