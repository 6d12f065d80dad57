"""MkDocs plugin ``atlas``: publish a feature atlas inside an MkDocs site.

Configuration in ``mkdocs.yml``::

    plugins:
      - search
      - atlas:
          site: site          # a built atlas folder (from `atlas build` or `atlas render`)
          cache: atlas-data   # or an analysis cache, rendered with `atlas render` at docs build time
          path: atlas/        # where the atlas appears in the docs site (default: atlas/)
          optional: false     # true: skip with an info message when neither folder exists

Relative folders are resolved against the folder holding ``mkdocs.yml``. When both ``site`` and
``cache`` are given, an existing ``site`` folder is used and the cache is rendered only without it.
The atlas is copied into the built docs site after MkDocs has written its own pages
(``on_post_build``), so its pages are served unchanged: every link in an atlas is relative, and it
works at any sub-path. Rendering a cache uses :func:`atlas.render.render_site`, which needs no torch.
"""

from __future__ import annotations

import logging
import posixpath
import shutil
import tempfile
from pathlib import Path

from mkdocs.config import config_options as c
from mkdocs.config.base import Config
from mkdocs.exceptions import PluginError
from mkdocs.plugins import BasePlugin

log = logging.getLogger("mkdocs.plugins.atlas")


class AtlasPluginConfig(Config):
    site = c.Optional(c.Type(str))
    cache = c.Optional(c.Type(str))
    path = c.Type(str, default="atlas/")
    optional = c.Type(bool, default=False)


def _clean_subpath(path: str) -> str:
    """``path`` as a relative folder inside the docs site (``"atlas/"`` → ``"atlas"``), or an error."""
    raw = path.replace("\\", "/").strip()
    norm = posixpath.normpath(raw.strip("/")) if raw.strip("/") else ""
    if raw.startswith("/") or norm in ("", ".") or norm == ".." or norm.startswith("../"):
        raise PluginError(
            f"atlas plugin: 'path' must be a folder inside the docs site, such as 'atlas/'; got {path!r}"
        )
    return norm


class AtlasPlugin(BasePlugin[AtlasPluginConfig]):
    """Copies a built atlas (or renders an analysis cache) into the docs site under ``path``."""

    def on_config(self, config):
        if not self.config.site and not self.config.cache:
            raise PluginError("atlas plugin: set 'site' (a built atlas folder) or 'cache' (an analysis cache)")
        self._subpath = _clean_subpath(self.config.path)
        base = Path(config.config_file_path).resolve().parent if config.config_file_path else Path.cwd()
        self._site = (base / self.config.site).resolve() if self.config.site else None
        self._cache = (base / self.config.cache).resolve() if self.config.cache else None
        return config

    def on_files(self, files, config):
        # The atlas replaces whatever is under ``path`` after the build: refuse to hide a docs page there
        # (with directory URLs, ``demo.md`` is written to ``demo/index.html``).
        prefix = self._subpath + "/"
        for f in files:
            dest = f.dest_uri.replace("\\", "/")
            if dest == self._subpath or dest.startswith(prefix):
                raise PluginError(
                    f"atlas plugin: path {self.config.path!r} would replace {dest} of the docs "
                    f"(from {f.src_uri}); choose another path, such as '{self._subpath}/atlas/'"
                )
        return files

    def _source(self) -> tuple[str, Path] | None:
        if self._site is not None and self._site.is_dir():
            if not (self._site / "index.html").is_file():
                raise PluginError(f"atlas plugin: {self._site} has no index.html; is it a built atlas?")
            return "site", self._site
        if self._cache is not None and self._cache.is_dir():
            return "cache", self._cache
        return None

    def on_post_build(self, config):
        source = self._source()
        if source is None:
            wanted = " or ".join(str(p) for p in (self._site, self._cache) if p is not None)
            if self.config.optional:
                log.info("atlas plugin: %s not found; the docs are built without the atlas at %s/",
                         wanted, self._subpath)
                return
            raise PluginError(
                f"atlas plugin: {wanted} not found; build the atlas first (atlas build / atlas render), "
                "or set 'optional: true'"
            )
        kind, folder = source
        dest = Path(config.site_dir) / self._subpath
        if dest.exists():
            shutil.rmtree(dest)
        if kind == "site":
            shutil.copytree(folder, dest)
            log.info("atlas plugin: copied the atlas in %s to %s/", folder, self._subpath)
        else:
            from atlas.errors import AtlasError
            from atlas.render import render_site

            with tempfile.TemporaryDirectory(prefix="atlas-docs-") as tmp:
                out = Path(tmp) / "site"
                try:
                    render_site(folder, out)
                except (AtlasError, ValueError) as exc:  # an unusable cache
                    raise PluginError(f"atlas plugin: cannot render {folder}: {exc}") from exc
                shutil.copytree(out, dest)
            log.info("atlas plugin: rendered the analysis cache %s to %s/", folder, self._subpath)
