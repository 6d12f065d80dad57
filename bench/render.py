"""Render benchmark: a synthetic cache at the default analysis settings, rendered and measured.

    python bench/render.py                 # 100k features (writes ~1 GB of cache and ~1 GB of site)
    python bench/render.py --features 5000 --keep /tmp/bench

Settings: top 20 examples, 10 × 5 interval samples (2 × 10 interval slots, the upper ones sparse, as the
analysis writes them), a 32-token window, a 50,257-token vocabulary, two sources. Prints features/s of
``render_site`` (cache read included), total bytes, bytes per feature, file count and the largest file,
and, with ``--layouts``, the size of the alternative chunk layouts computed from the same payloads.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from synthetic_cache import write_synthetic_cache  # noqa: E402

from atlas.render import render_site  # noqa: E402
from atlas.render.verify import verify_site  # noqa: E402


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the page workers)."""
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def disk_usage(folder: Path) -> int:
    """Bytes the folder takes on this file system (blocks), for comparison with the sum of file sizes."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in filenames + dirnames:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def layouts(site: Path, sample: int = 2000) -> None:
    """Compare per-feature layouts on a sample of rendered pages (same payload bytes in each)."""
    pages = sorted((site / "f").iterdir(), key=lambda p: int(p.name))[:sample]
    shell, payload = [], []
    for p in pages:
        html = (p / "index.html").read_bytes()
        head, rest = html.split(b'id="atlas-feature">', 1)
        b64, tail = rest.split(b"</script>", 1)
        shell.append(len(head) + len(tail) + 40)
        payload.append(len(b64))
    n = len(pages)
    avg_shell, avg_b64 = sum(shell) / n, sum(payload) / n
    raw = sum(len(base64.b64decode(x)) for x in [b"A" * 4]) and avg_b64 * 3 / 4
    print(f"\nlayouts (mean over {n} features; base64 payload {avg_b64:,.0f} B = {raw:,.0f} B deflated msgpack)")
    wrapper = len('Atlas.chunk("feat/00000","");\n')
    rows = [("embedded in the page (used)", avg_shell + avg_b64, 1, avg_shell + avg_b64)]
    for k in (1, 8, 32, 128):
        disk = avg_shell + avg_b64 + wrapper / k
        files = 1 + 1 / k
        view = avg_shell + k * avg_b64 + wrapper
        rows.append((f"separate chunk, {k} feature(s) per file", disk, files, view))
    print(f"  {'layout':40s} {'bytes/feature':>14s} {'files/feature':>14s} {'page view bytes':>16s}")
    for name, disk, files, view in rows:
        print(f"  {name:40s} {disk:14,.0f} {files:14.2f} {view:16,.0f}")


def browser_timings(site: Path, n_features: int, first_id: int = 0) -> None:
    """Cold page views in headless Chromium over HTTP: time to rendered and bytes downloaded."""
    from playwright.sync_api import sync_playwright
    from web import base_url, launch, serve_folder

    server = serve_folder(site)
    base = base_url(server)
    try:
        with sync_playwright() as p:
            b = launch(p)

            def view(url: str, ready: str = "html[data-ready]"):
                ctx = b.new_context()  # cold cache
                pg = ctx.new_page()
                sizes: dict[str, int] = {}
                pg.on("requestfinished", lambda r: sizes.__setitem__(r.url, r.sizes()["responseBodySize"]))
                pg.goto(url)
                pg.wait_for_selector(ready, timeout=60_000)
                t = pg.evaluate("Atlas.readyAt")
                return ctx, pg, t, sizes

            print("\nbrowser (headless Chromium, localhost HTTP; median of 5 fresh browser contexts)")

            def split(sizes):
                sizes = {k: max(v, 0) for k, v in sizes.items()}  # -1: served from cache
                page = sum(v for k, v in sizes.items() if "/f/" in k)
                vocab = sum(v for k, v in sizes.items() if "/data/vocab/" in k)
                return page, vocab, sum(sizes.values()) - page - vocab

            for fid in (first_id + n_features // 2, first_id + 7):
                times, warm_times = [], []
                for _ in range(5):
                    ctx, pg, t, sizes = view(f"{base}f/{fid}/index.html")
                    times.append(t)
                    cold = split(sizes)
                    # a second feature page in the same browser: shared assets and vocab come from cache
                    sizes2: dict[str, int] = {}
                    pg.on("requestfinished", lambda r: sizes2.__setitem__(r.url, r.sizes()["responseBodySize"]))
                    pg.goto(f"{base}f/{fid + 1}/index.html")
                    pg.wait_for_selector("html[data-ready]", timeout=60_000)
                    warm_times.append(pg.evaluate("Atlas.readyAt"))
                    warm = split(sizes2)
                    ctx.close()
                times.sort()
                warm_times.sort()
                print(f"  f/{fid}/ cold: rendered {times[2]:.0f} ms after navigation; downloaded page "
                      f"{cold[0] / 1e3:.1f} KB + vocab shards {cold[1] / 1e3:.1f} KB + shared assets "
                      f"{cold[2] / 1e3:.1f} KB")
                print(f"  f/{fid + 1}/ next page: rendered {warm_times[2]:.0f} ms; downloaded page {warm[0] / 1e3:.1f} KB"
                      f" + vocab {warm[1] / 1e3:.1f} KB + shared {warm[2] / 1e3:.1f} KB (the rest from cache)")
            times, qtimes = [], []
            for _ in range(3):
                ctx, pg, t, sizes = view(base + "index.html")
                times.append(t)
                total = sum(sizes.values())
                for q in ("7", "the", "ing"):
                    pg.fill("#q", "")
                    t0 = pg.evaluate("performance.now()")
                    pg.fill("#q", q)
                    pg.wait_for_function("q => document.getElementById('search-results').getAttribute('data-q') === q",
                                         arg=q, timeout=60_000)
                    qtimes.append(pg.evaluate("performance.now()") - t0 - 120)  # minus the 120 ms typing debounce
                ctx.close()
            times.sort()
            qtimes.sort()
            print(f"  index.html: navigation to table rendered {times[1]:.0f} ms; downloaded {total / 1e6:.2f} MB")
            print(f"  search: first results {qtimes[len(qtimes) // 2]:.0f} ms after the debounce (median of "
                  f"{len(qtimes)}, cold shards for the first query of each view)")
            b.close()
    finally:
        server.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=int, default=100_000)
    ap.add_argument("--sources", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=50_257)
    ap.add_argument("--sequences", type=int, default=4096)
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    ap.add_argument("--layouts", action="store_true", help="also compare chunk layouts")
    ap.add_argument("--workers", type=int, default=None, help="page-writing processes (default: render_site's)")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--browser", action="store_true", help="also time page views in headless Chromium")
    args = ap.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="atlas-bench-"))
    cache, site = work / "cache", work / "site"
    try:
        if not (cache / "manifest.json").exists():
            t = time.perf_counter()
            write_synthetic_cache(cache, n_features=args.features, n_sources=args.sources, vocab_size=args.vocab,
                                  n_sequences=args.sequences, seq_len=128, seed=0)
            print(f"synthetic cache: {args.features:,} features in {time.perf_counter() - t:.1f} s")
        if site.exists():
            shutil.rmtree(site)
        t, c = time.perf_counter(), cpu_seconds()
        s = render_site(cache, site, progress=False, workers=args.workers)
        dt, dc = time.perf_counter() - t, cpu_seconds() - c
        load = os.getloadavg()[0]
        print(f"render: {s.n_features:,} features in {dt:.1f} s = {s.n_features / dt:,.0f} features/s "
              f"({os.cpu_count()} cores, load average {load:.1f}); CPU {dc:.1f} s = "
              f"{dc / s.n_features * 1e6:,.0f} µs/feature")
        print(f"site: {s.total_bytes / 1e6:,.1f} MB in {s.n_files:,} files, {s.total_bytes / s.n_features:,.0f} "
              f"bytes/feature; largest file {s.largest_file} {s.largest_file_bytes / 1e3:,.1f} KB; "
              f"on disk {disk_usage(site) / 1e6:,.1f} MB")
        page = site / "f" / "0" / "index.html"
        meta_js = (site / "data" / "meta.js").read_bytes()
        print(f"feature page f/0/index.html: {page.stat().st_size:,} bytes; data/meta.js {len(meta_js):,} bytes")
        if not args.no_verify:
            t = time.perf_counter()
            problems = verify_site(site)
            print(f"verify_site: {len(problems)} problems in {time.perf_counter() - t:.1f} s", problems[:3])
        if args.layouts:
            layouts(site)
        if args.browser:
            browser_timings(site, s.n_features)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
