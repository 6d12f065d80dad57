"""Screenshots of a built atlas for the docs (docs/img/), taken in headless Chromium.

    python demo/screenshots.py site/ docs/img/ --feature 2510 --feature 2788

Each feature page is captured once its panels are drawn; also the index and the model-diff overview.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, help="built atlas folder")
    parser.add_argument("out", type=Path, help="folder for the PNG files")
    parser.add_argument("--feature", type=int, action="append", default=[], help="feature id (repeatable)")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    root = args.site.resolve().as_uri()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        for fid in args.feature:
            page.goto(f"{root}/f/{fid}/index.html")
            page.locator("[data-panel=top] .ex").first.wait_for()
            page.screenshot(path=str(args.out / f"feature-{fid}.png"))
        page.goto(f"{root}/index.html")
        page.locator("#rows tr:not(.spacer)").first.wait_for()
        page.screenshot(path=str(args.out / "index.png"))
        page.goto(f"{root}/diff/index.html")
        page.locator("svg").first.wait_for()
        page.screenshot(path=str(args.out / "model-diff.png"))
        browser.close()


if __name__ == "__main__":
    main()
