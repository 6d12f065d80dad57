"""Writing a site atomically: into a staging folder beside the output, renamed into place when complete.

An existing site at the output path stays intact until the new one is complete. A non-empty folder that
is not an atlas site (it lacks the marker file ``atlas-site.json``) is never replaced.

The staging folder is ``.<name>.rendering-<host>-<pid>-<random>`` beside the output. A render killed
outright (``kill -9``, out of memory) cannot remove it; the next render of the same output removes the
staging folders whose process is gone (same host, pid no longer running).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

from ..errors import AtlasError
from .sitefiles import MARKER


def check_output(out: Path) -> None:
    """Raise AtlasError when ``out`` cannot receive a site (a file, or a foreign non-empty folder)."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise AtlasError(f"the output {out} is a file; pass another folder with -o/--output")
        if not (out / MARKER).is_file() and any(out.iterdir()):
            raise AtlasError(
                f"the output folder {out} is not empty and is not an atlas site (no {MARKER}); "
                f"pass an empty or new folder with -o/--output, or remove {out} first"
            )


def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_staging(parent: Path, name: str, host: str) -> list[Path]:
    """Remove the staging folders of renders of ``name`` on this host whose process has ended."""
    prefix = f".{name}.rendering-{host}-"
    removed = []
    for entry in Path(parent).iterdir() if Path(parent).is_dir() else ():
        if not entry.name.startswith(prefix) or not entry.is_dir() or entry.is_symlink():
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


class StagedSite:
    """A staging folder that collects a site's files and counts them; :meth:`commit` moves it into place."""

    def __init__(self, out: Path):
        self.out = Path(out)
        check_output(self.out)
        parent = self.out.absolute().parent
        parent.mkdir(parents=True, exist_ok=True)
        host = _host()
        remove_stale_staging(parent, self.out.name, host)
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.rendering-{host}-{os.getpid()}-", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.dir, 0o777 & ~umask)
        self.n_files = 0
        self.total_bytes = 0
        self.largest = ("", 0)
        self._made: set[str] = set()

    def write(self, rel: str, data: bytes) -> None:
        """Write ``data`` at ``rel`` (a ``/``-separated path inside the site)."""
        folder, _, _ = rel.rpartition("/")
        if folder and folder not in self._made:
            os.makedirs(self.dir / folder, exist_ok=True)
            self._made.add(folder)
        with open(self.dir / rel, "wb") as fh:
            fh.write(data)
        n = len(data)
        self.n_files += 1
        self.total_bytes += n
        if n > self.largest[1]:
            self.largest = (rel, n)

    def count(self, n_files: int, total_bytes: int, largest: tuple[str, int]) -> None:
        """Account for files written into :attr:`dir` by other processes."""
        self.n_files += n_files
        self.total_bytes += total_bytes
        if largest[1] > self.largest[1]:
            self.largest = largest

    def write_all(self, files: dict[str, bytes]) -> None:
        for rel in sorted(files):
            self.write(rel, files[rel])

    def commit(self) -> None:
        """Replace ``out`` by the staged site (the old site is removed only after the rename)."""
        check_output(self.out)
        old = None
        if self.out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.dir.parent))
            os.rename(self.out, old / "site")
        try:
            os.rename(self.dir, self.out)
        except BaseException:
            if old is not None:
                os.rename(old / "site", self.out)
                shutil.rmtree(old, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
