"""One self-contained `report.html` per run (docs/clinical.md): opened from anywhere, no files
beside it, no network.

- `write_infer_report(out)`: the results table of `cac-jax infer` (sortable by any column by
  clicking its header; errors and warnings shown in the row, error rows marked), and per scored
  study its preview (calcium over the CT, heart outline) embedded as a PNG data URI.
- `write_evaluate_report(out)`: `cac-jax evaluate`'s report.md rendered (markdown-it-py, tables
  on) with its figures embedded; its tables sortable the same way.

Rows carry `data-value` per cell so numbers sort as numbers; empty cells sort last.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import os
import re
from pathlib import Path

REPORT_NAME = "report.html"
# results.csv columns shown, in order, with their headers.
_COLUMNS = (("scan_id", "study"), ("status", "status"), ("agatston", "Agatston"),
            ("volume_mm3", "volume (mm³)"), ("category", "category"),
            ("category_name", "category name"), ("n_lesions", "lesions"),
            ("heart_volume_ml", "heart (ml)"), ("protocol", "protocol"), ("seconds", "seconds"))

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #eee; }
table.sortable th { cursor: pointer; user-select: none; }
th[aria-sort="ascending"]::after { content: " \\25B2"; }
th[aria-sort="descending"]::after { content: " \\25BC"; }
tr.error td { background: #fdd; }
td.problem { color: #a00; max-width: 40em; }
td.warning { color: #850; max-width: 40em; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ccc; }
"""

# Sorts a table by the clicked column: numbers as numbers (data-value), then text; empty last.
_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  if (!table.tHead || !table.tBodies.length) { return; }
  var headers = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(headers, function (th, col) {
    th.addEventListener("click", function () {
      var ascending = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(headers, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var cell = row.cells[col];
        var text = cell ? (cell.getAttribute("data-value") || cell.textContent).trim() : "";
        var number = Number(text);
        return {empty: text === "", isNumber: text !== "" && !isNaN(number),
                number: number, text: text.toLowerCase()};
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x.empty || y.empty) { return x.empty === y.empty ? 0 : (x.empty ? 1 : -1); }
        var order;
        if (x.isNumber && y.isNumber) { order = x.number - y.number; }
        else if (x.isNumber !== y.isNumber) { order = x.isNumber ? -1 : 1; }
        else { order = x.text < y.text ? -1 : (x.text > y.text ? 1 : 0); }
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            f"{body}\n<script>{_SCRIPT}</script>\n</body>\n</html>\n")


def png_data_uri(path: str | os.PathLike) -> str:
    """`path` (a PNG) as a data: URI, so the page needs no file beside it."""
    data = Path(path).read_bytes()
    if not data.startswith(b"\x89PNG"):
        raise ValueError(f"{path}: not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _write(path: Path, text: str) -> Path:
    from data_pipeline.atomic import atomic_write_text

    atomic_write_text(path, text)
    return path


def _warnings(out: Path, name: str) -> list[str]:
    """The warnings of a study's `cac-jax score` JSON (none when it was not scored)."""
    path = out / f"{name}.json"
    if not path.exists():
        return []
    return [str(w) for w in json.loads(path.read_text(encoding="utf-8")).get("warnings", [])]


def write_infer_report(out: str | os.PathLike) -> Path:
    """Writes `out/report.html` from `out/results.csv`, the per-study JSON and previews."""
    from cac_jax.inference import safe_name
    from cac_jax.results import RESULTS_NAME

    out = Path(out)
    with (out / RESULTS_NAME).open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    head = "".join(f"<th scope=\"col\">{html.escape(title)}</th>" for _, title in _COLUMNS)
    body_rows, previews = [], []
    errors = 0
    for row in rows:
        name = safe_name(row["scan_id"])
        warnings = _warnings(out, name) if row["status"] == "ok" else []
        cells = "".join(f"<td data-value=\"{html.escape(row.get(key, '') or '')}\">"
                        f"{html.escape(row.get(key, '') or '')}</td>" for key, _ in _COLUMNS)
        if row["status"] == "error":
            errors += 1
            notes = f"<td class=\"problem\">{html.escape(row.get('error', ''))}</td>"
        else:
            notes = ("<td class=\"warning\">" + "<br>".join(html.escape(w) for w in warnings)
                     + "</td>")
        body_rows.append(f"<tr class=\"{html.escape(row['status'])}\">{cells}{notes}</tr>")
        preview = out / f"{name}.png"
        if row["status"] == "ok" and preview.exists():
            previews.append(
                f"<figure id=\"preview-{html.escape(name)}\"><img alt=\"preview of "
                f"{html.escape(row['scan_id'])}\" src=\"{png_data_uri(preview)}\">"
                f"<figcaption>{html.escape(row['scan_id'])}: Agatston "
                f"{html.escape(row['agatston'])} ({html.escape(row['category_name'])})"
                "</figcaption></figure>")
    scored = sum(r["status"] == "ok" for r in rows)
    body = (f"<h1>cac-jax infer: {len(rows)} studies</h1>\n"
            f"<p id=\"summary\">{scored} scored, {errors} failed. Click a column header to "
            "sort. Red rows failed (the reason is in the last column); red in a preview: "
            "coronary calcium (scored), yellow: non-coronary calcium, cyan: heart.</p>\n"
            f"<table id=\"results\" class=\"sortable\"><thead><tr>{head}"
            "<th scope=\"col\">errors / warnings</th></tr></thead>\n<tbody>\n"
            + "\n".join(body_rows) + "\n</tbody></table>\n<h2>Previews</h2>\n"
            + ("\n".join(previews) or "<p>No previews (no study was scored).</p>"))
    return _write(out / REPORT_NAME, _page("cac-jax infer report", body))


def write_markdown_report(markdown: str | os.PathLike, target: str | os.PathLike,
                          title: str) -> Path:
    """Renders the Markdown file `markdown` (markdown-it-py, tables on, raw HTML off) into the
    self-contained page `target`: its PNG images (paths inside its folder) embedded, its tables
    sortable."""
    from markdown_it import MarkdownIt

    markdown = Path(markdown)
    folder = markdown.parent.resolve()
    text = markdown.read_text(encoding="utf-8")
    rendered = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)

    def embed(match: re.Match) -> str:
        source = (folder / html.unescape(match.group(1))).resolve()
        if not source.is_relative_to(folder) or source.suffix.lower() != ".png":
            raise ValueError(f"{markdown}: image {match.group(1)!r} is not a PNG in its folder")
        return f"src=\"{png_data_uri(source)}\""

    rendered = re.sub(r"src=\"([^\"]+)\"", embed, rendered)
    rendered = rendered.replace("<table>", "<table class=\"sortable\">")
    return _write(Path(target), _page(title, rendered))


def write_evaluate_report(out: str | os.PathLike) -> Path:
    """Writes `out/report.html`: `out/report.md` with its figures embedded, tables sortable."""
    out = Path(out)
    return write_markdown_report(out / "report.md", out / REPORT_NAME, "cac-jax evaluate report")
