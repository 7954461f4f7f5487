"""benchmarks/docgen.py: a benchmark's generated doc section is replaced between its markers, and only there."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from docgen import write_between  # noqa: E402


def test_write_between_replaces_only_the_marked_section_and_names_missing_markers(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("head\n<!-- a: begin -->\nold\n<!-- a: end -->\nmiddle\n<!-- b: begin -->\nkept\n<!-- b: end -->\n")
    write_between(doc, "<!-- a: begin -->", "<!-- a: end -->", "new 1\nnew 2\n")
    assert doc.read_text() == ("head\n<!-- a: begin -->\nnew 1\nnew 2\n<!-- a: end -->\nmiddle\n"
                               "<!-- b: begin -->\nkept\n<!-- b: end -->\n")
    before = doc.read_text()
    with pytest.raises(SystemExit, match=r"doc.md has no <!-- c: begin --> \.\.\. <!-- c: end --> markers"):
        write_between(doc, "<!-- c: begin -->", "<!-- c: end -->", "lost?")
    assert doc.read_text() == before  # nothing written
