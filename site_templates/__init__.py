"""Jinja2 templates and browser assets of the generated site."""
