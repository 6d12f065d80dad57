"""Serving a site folder over HTTP and launching Debian's Chromium, for the browser tests and
``bench/render.py --browser`` (the ``browser`` fixture in ``conftest.py`` uses :func:`launch`)."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
# headless, no sandbox (root in containers), nothing that reaches the network on its own
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve_folder(folder: Path) -> http.server.ThreadingHTTPServer:
    """A quiet HTTP server for ``folder`` on a free localhost port, already serving (call ``shutdown()``)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def base_url(server: http.server.ThreadingHTTPServer, path: str = "") -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/{path}"


def launch(playwright):
    """Headless Debian Chromium through a started Playwright (never a downloaded browser)."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
