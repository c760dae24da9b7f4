"""Screenshots a report.html in headless Chromium into a PNG (docs/figures/report_infer.png).

Run:  python docs/screenshot_report.py demo_out/infer/convlstm/report.html \
          docs/figures/report_infer.png --height 1400

Needs Debian's chromium and chromium-driver and the selenium package (extra [dev]), as the
report's browser test does (docs/clinical.md). The page is shot at its full height unless
`--height` limits it (the top of the page: the results table and the first previews).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def screenshot(page: Path, target: Path, width: int = 1200, height: int | None = None) -> None:
    """Opens `page` in headless Chromium and writes a screenshot of its top `height` pixels
    (None: the full height) to `target`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        raise SystemExit("screenshot_report: chromium and chromedriver must be installed "
                         "(Debian packages chromium, chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--hide-scrollbars", f"--window-size={width},800"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    try:
        browser.get(page.resolve().as_uri())
        if height is None:
            height = int(browser.execute_script(
                "return document.documentElement.scrollHeight")) + 40
        browser.set_window_size(width, height)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not browser.save_screenshot(str(target)):
            raise SystemExit(f"screenshot_report: could not write {target}")
    finally:
        browser.quit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("page", type=Path, help="the report.html to shoot")
    parser.add_argument("target", type=Path, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1200, help="window width (px)")
    parser.add_argument("--height", type=int, default=None,
                        help="shoot only the top HEIGHT px (default: the whole page)")
    args = parser.parse_args(argv)
    screenshot(args.page, args.target, args.width, args.height)
    print(f"wrote {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
