"""Generated doc sections: the text between a benchmark's begin and end markers, replaced by a new rendering."""

from __future__ import annotations

from pathlib import Path


def write_between(doc: Path, begin: str, end: str, text: str) -> None:
    """Replace what ``doc`` holds between the ``begin`` and ``end`` markers with ``text``.

    Exits with a message naming the file and the markers when either marker is missing.
    """
    content = doc.read_text()
    if begin not in content or end not in content:
        raise SystemExit(f"{doc} has no {begin} ... {end} markers; add them where the generated text goes")
    head, rest = content.split(begin, 1)
    doc.write_text(f"{head}{begin}\n{text}{end}{rest.split(end, 1)[1]}")
