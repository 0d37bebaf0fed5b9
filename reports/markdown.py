"""Markdown for summaries and reports: the one escaper every section uses.

Strings from checkpoints and corpora (module paths, file names, token strings) go into markdown
cells and code spans; nothing in them may become HTML, a link, or split a table cell.
"""

from __future__ import annotations

from typing import Any


def md_escape(s: Any) -> str:
    """Text for a markdown table cell: no raw HTML, no cell-splitting pipes, no links or images
    (``[x](javascript:...)``, ``![](http://tracker)``), no backtick that could pair with a code span
    written next to it (and expose that span's raw text), one line."""
    s = str(s).replace("\r", " ").replace("\n", " ")
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return s.replace("[", "\\[").replace("]", "\\]").replace("`", "\\`")


def md_text(s: Any) -> str:
    """``md_escape`` for text whose own `code spans` (as in captions) should stay code spans."""
    parts = str(s).split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: all of it is text
        return md_escape(s)
    return "".join(md_escape(p) if i % 2 == 0 else md_code(p) for i, p in enumerate(parts))


def md_code(s: Any) -> str:
    """A markdown code span: raw text is safe inside one (no HTML, no entities); only ` and | need care."""
    s = str(s).replace("\r", " ").replace("\n", " ").replace("`", "'").replace("|", "\\|")
    return f"`{s}`"
