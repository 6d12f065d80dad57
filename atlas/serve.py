"""``atlas serve``: preview a built site over HTTP on localhost (Python's http.server)."""

from __future__ import annotations

import functools
import http.server
import sys
from pathlib import Path

from .errors import AtlasError


class SiteHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the site folder; unknown paths get the site's own ``404.html``."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".js": "text/javascript", ".csv": "text/csv; charset=utf-8", ".xml": "application/xml"}

    def send_error(self, code, message=None, explain=None):
        page = Path(self.directory) / "404.html"
        if code == 404 and page.is_file():
            body = page.read_bytes()
            self.send_response(404, message)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            return
        super().send_error(code, message, explain)

    def log_message(self, format, *args):  # quieter than the default: one short line per request
        sys.stderr.write("%s %s\n" % (self.log_date_time_string(), format % args))


def make_server(site: Path, host: str = "127.0.0.1", port: int = 8000) -> http.server.ThreadingHTTPServer:
    """An HTTP server for ``site`` (not yet serving); port 0 picks a free port."""
    site = Path(site)
    if not (site / "index.html").is_file():
        raise AtlasError(f"{site} holds no atlas site (no index.html); build one with `atlas build -o {site}` "
                         "or pass the site folder")
    handler = functools.partial(SiteHandler, directory=str(site.resolve()))
    try:
        return http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        raise AtlasError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port") from None


def serve(site: Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``site`` until Ctrl-C, printing its URL."""
    server = make_server(site, host, port)
    h, p = server.server_address[:2]
    shown = "localhost" if h in ("127.0.0.1", "::1") else h
    print(f"Serving {site} at http://{shown}:{p}/  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
    finally:
        server.server_close()
