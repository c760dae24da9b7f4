"""`--report`: the self-contained report.html of `cac-jax infer` and `cac-jax evaluate`
(docs/clinical.md), opened in headless Chromium (Debian's chromium and chromium-driver, driven by
selenium) where they are installed."""

from __future__ import annotations

import csv
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_dicom_outputs import threshold_scorer, write_dicom_study  # noqa: E402
from test_inference import tiny_study  # noqa: E402

from cac_jax import inference  # noqa: E402
from cac_jax.cli import main  # noqa: E402
from data_pipeline.io import CTVolume, StudyMetadata, write_volume  # noqa: E402


@pytest.fixture(scope="module")
def infer_out(tmp_path_factory):
    """`cac-jax infer --report` of two NIfTI studies, one DICOM study and a broken file."""
    root = tmp_path_factory.mktemp("report")
    inputs = []
    for k in range(2):
        hu, _, _ = tiny_study(k, size=64, slices=6 + k)
        path = root / f"s{k}.nii.gz"
        write_volume(path, np.round(hu).astype(np.int16),
                     CTVolume(hu, (3.0, 0.7, 0.7), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1),
                              StudyMetadata(source="memory")))
        inputs.append(path)
    inputs.append(write_dicom_study(root / "s2", seed=2))
    broken = root / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    inputs.append(broken)
    scorer = threshold_scorer()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inference.Scorer, "from_checkpoints",
                   classmethod(lambda cls, h, c, **kw: scorer))
        out = root / "out"
        assert main(["infer", "--heart-checkpoint", "H", "--calcium-checkpoint", "C",
                     "--input", *map(str, inputs), "--out", str(out), "--report",
                     "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def evaluate_out(infer_out, tmp_path_factory):
    """`cac-jax evaluate --report` of that results.csv against a made-up reference."""
    root = tmp_path_factory.mktemp("evaluate")
    ref = root / "ref.csv"
    with (infer_out / "results.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    with ref.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["scan_id", "agatston"])
        for k, row in enumerate(rows):
            writer.writerow([row["scan_id"], float(row["agatston"]) * (1 + 0.2 * k)])
    out = root / "eval"
    assert main(["evaluate", "--pred", str(infer_out / "results.csv"), "--ref", str(ref),
                 "--out", str(out), "--report"]) == 0
    return out


def test_infer_report_is_self_contained(infer_out):
    page = (infer_out / "report.html").read_text()
    assert page.count("<tr class=") == 4
    (error_row,) = re.findall(r'<tr class="error">.*?</tr>', page)
    assert "broken.nii.gz" in error_row and "unreadable image file" in error_row
    assert page.count("data:image/png;base64,") == 3  # a preview per scored study
    assert "src=\"http" not in page and "src=\"file" not in page and "<link" not in page


def test_evaluate_report_embeds_the_figures_of_report_md(evaluate_out):
    markdown = (evaluate_out / "report.md").read_text()
    page = (evaluate_out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == markdown.count("](") > 0
    separators = [line for line in markdown.splitlines() if line.startswith("|---")]
    assert page.count("<table class=\"sortable\">") == len(separators) > 0


def _browser():
    """A headless Chromium driven through Debian's chromedriver, or a skip with the reason."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("Chromium or its driver is not installed (Debian packages chromium and "
                    "chromium-driver; .ci/run installs them)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


@pytest.fixture(scope="module")
def browser():
    driver = _browser()
    yield driver
    driver.quit()


def _images_loaded(browser) -> list[int]:
    return browser.execute_script(
        "return Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0);")


def _column(browser, table: str, index: int) -> list[str]:
    return browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0] + ' tbody tr'))"
        ".map(r => r.cells[arguments[1]].textContent.trim());", table, index)


def test_infer_report_in_chromium(infer_out, browser):
    from selenium.webdriver.common.by import By

    browser.get((infer_out / "report.html").as_uri())
    widths = _images_loaded(browser)
    assert len(widths) == 3 and all(w > 0 for w in widths), widths
    scan_ids = _column(browser, "#results", 0)
    assert sorted(scan_ids) == ["broken", "s0", "s1", "s2"]
    statuses = dict(zip(scan_ids, _column(browser, "#results", 1), strict=True))
    assert statuses["broken"] == "error"
    error_row = browser.find_element(By.CSS_SELECTOR, "#results tr.error")
    assert error_row.is_displayed() and "broken.nii.gz" in error_row.text
    header = browser.find_elements(By.CSS_SELECTOR, "#results th")[2]  # Agatston
    header.click()
    values = _column(browser, "#results", 2)
    numbers = [float(v) for v in values if v]
    assert numbers == sorted(numbers) and values[-1] == ""  # the error row (no score) last
    assert header.get_attribute("aria-sort") == "ascending"
    header.click()
    numbers = [float(v) for v in _column(browser, "#results", 2) if v]
    assert numbers == sorted(numbers, reverse=True)
    browser.find_elements(By.CSS_SELECTOR, "#results th")[0].click()
    assert _column(browser, "#results", 0) == ["broken", "s0", "s1", "s2"]


def test_evaluate_report_in_chromium(evaluate_out, browser):
    browser.get((evaluate_out / "report.html").as_uri())
    widths = _images_loaded(browser)
    assert widths and all(w > 0 for w in widths), widths
    tables = browser.execute_script("return document.querySelectorAll('table.sortable').length")
    assert tables > 0
    # The first table sorts by its first column when its header is clicked.
    browser.execute_script("document.querySelector('table.sortable th').click()")
    assert browser.execute_script(
        "return document.querySelector('table.sortable th').getAttribute('aria-sort')"
    ) == "ascending"
