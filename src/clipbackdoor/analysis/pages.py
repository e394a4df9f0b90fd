"""Markdown results pages, also as HTML: the Snakemake report shows images, HTML and PDF inline but offers a
Markdown file only as a download, so every Markdown page the pipeline writes (tables, the summary, TEXTSPAN, the
B² audit) gets an HTML twin beside it, rendered here from the small Markdown subset those pages use: ``#``
headings, paragraphs, ``- `` lists, pipe tables, ``**bold**`` and ```code```. Self-contained (inline CSS, no
script, nothing fetched), deterministic.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from clipbackdoor.io import write_text

STYLE = """body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.2em;color:#222;max-width:80em}
h1{font-size:1.25em}h2{font-size:1.1em}p,li{line-height:1.4}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #bbb;padding:.25em .55em;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#eef1f5}
tr:nth-child(even) td{background:#fafafa}code{background:#f2f2f2;padding:0 .2em}"""


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_to_html(text: str, title: str = "") -> str:
    """A page of the Markdown subset above as one HTML document (``title``: the page title; default its first
    heading)."""
    lines, body, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.startswith("#"):
            level = min(6, len(line) - len(line.lstrip("#")))
            heading = line[level:].strip()
            title = title or re.sub(r"[`*]", "", heading)
            body.append(f"<h{level}>{_inline(heading)}</h{level}>")
            i += 1
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            rows = [_cells(r) for r in block if not re.fullmatch(r"\|?(\s*:?-+:?\s*\|)+\s*", r.strip())]
            head, *rest = rows
            body.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead><tbody>"
                        + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rest)
                        + "</tbody></table>")
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(lines[i][2:])
                i += 1
                while i < len(lines) and lines[i].startswith("  ") and lines[i].strip():  # a wrapped item
                    items[-1] += " " + lines[i].strip()
                    i += 1
            body.append("<ul>" + "".join(f"<li>{_inline(t)}</li>" for t in items) + "</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(("#", "|", "- ")):
                para.append(lines[i].strip())
                i += 1
            body.append(f"<p>{_inline(' '.join(para))}</p>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_page(md_path: str | Path, text: str) -> list[Path]:
    """``md_path`` and its HTML twin (same name, ``.html``), each written atomically."""
    md_path = Path(md_path)
    write_text(md_path, text)
    write_text(md_path.with_suffix(".html"), markdown_to_html(text))
    return [md_path, md_path.with_suffix(".html")]
