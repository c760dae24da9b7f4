"""docs/: the figure script draws both diagrams, every relative link in docs/*.md and the README
resolves, and docs/index.md lists every page."""

from __future__ import annotations

import re
from pathlib import Path

from script_loader import load_file

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
LINK = re.compile(r"\]\(([^)#\s]+)\)")


def test_make_figures_writes_both_diagrams(tmp_path):
    module = load_file(DOCS / "make_figures.py")
    assert module.main(["--out", str(tmp_path)]) == 0
    for name in ("pipeline.png", "convlstm_attention.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, name
        # The committed copy is the one the docs show.
        assert (DOCS / "figures" / name).is_file()


def test_relative_links_in_docs_resolve():
    pages = sorted(DOCS.glob("*.md"))
    assert {p.name for p in pages} >= {"architecture.md", "data_flow.md", "agatston.md",
                                        "extending.md", "contracts.md", "index.md"}
    for page in [*pages, ROOT / "README.md", ROOT / "launch" / "README.md"]:
        for target in LINK.findall(page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_index_lists_every_page():
    listed = set(LINK.findall((DOCS / "index.md").read_text()))
    for page in DOCS.glob("*.md"):
        if page.name != "index.md":
            assert page.name in listed, f"docs/index.md does not list {page.name}"
