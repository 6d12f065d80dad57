"""The shared, cacheable browser assets of the site (``assets/``): CSS, JS and the vendored msgpack.

Every file comes from the package ``atlas.site_templates``:

- ``assets/atlas.css``: the look of every page
- ``assets/atlas.js``: the loader of data scripts and embedded payloads (base64 → inflate → msgpack),
  the token table, search, and keyboard shortcuts; loaded by every page
- ``assets/feature.js``: draws a feature page's panels from its payload
- ``assets/index.js``: the virtualised, sortable, filterable index table
- ``assets/diff.js``: the model-diff overview's scatter plots (``<canvas>``) from ``data/diff.js``
- ``assets/msgpack.min.js`` and ``assets/msgpack.LICENSE.txt``: ``@msgpack/msgpack`` (UMD build, ISC),
  see ``site_templates/vendor/msgpack/README.md``
"""

from __future__ import annotations

import re
from importlib.resources import files

OWN_ASSETS = ("atlas.css", "atlas.js", "feature.js", "index.js", "diff.js")
_SOURCE_MAP = re.compile(rb"\n?//# sourceMappingURL=\S*\s*$")


def asset_files() -> dict[str, bytes]:
    """``{path in the site: bytes}`` of every shared asset."""
    root = files("atlas.site_templates")
    out = {f"assets/{name}": root.joinpath("assets", name).read_bytes() for name in OWN_ASSETS}
    vendor = root.joinpath("vendor", "msgpack")
    out["assets/msgpack.min.js"] = _SOURCE_MAP.sub(b"\n", vendor.joinpath("msgpack.min.js").read_bytes())
    out["assets/msgpack.LICENSE.txt"] = vendor.joinpath("LICENSE").read_bytes()
    return out
