"""The render stage: analysis cache → static site. Imports numpy, msgpack and jinja2, never torch.

Public: :func:`render_site` and :class:`RenderSummary`; :func:`atlas.render.verify.verify_site`.
"""

from .site import RenderSummary, render_site

__all__ = ["RenderSummary", "render_site"]
