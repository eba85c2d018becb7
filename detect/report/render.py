"""The blocks of a ``detect compare`` report (``detect.report.sections`` lays them out), written
as Markdown or as one HTML page: inline CSS, figures as base64 PNG ``data:`` URIs, no script and
no external URL (a ``Text`` may link to a file beside the report).
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field

_NUMERIC = re.compile(r"^(n/a|-|[-+]?[\d,]*\.?\d+(x| s| min| h)?)$")


@dataclass
class Heading:
    text: str
    level: int = 2  # the one level-1 heading is followed by the report's "Generated:" line


@dataclass
class Text:
    text: str  # one paragraph of plain text
    strong: bool = False
    href: str = ""  # a relative link: the whole paragraph links there


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]  # cells are plain text; a cell written "**text**" is shown bold

    def numeric_columns(self) -> list[bool]:
        """Right-align a column when most of its cells are numbers (or n/a, -)."""
        return [sum(bool(_NUMERIC.match(row[j])) for row in self.rows) * 2 > len(self.rows)
                for j in range(len(self.header))]


@dataclass
class Figure:
    file_name: str  # PNG beside report.md
    caption: str


@dataclass
class Section:
    """One part of the report: its blocks and its figures."""

    blocks: list = field(default_factory=list)
    pngs: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG bytes

    def add_figure(self, file_name: str, png: bytes, caption: str) -> None:
        self.pngs[file_name] = png
        self.blocks.append(Figure(file_name, caption))


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list, timestamp: str) -> str:
    """Markdown of ``blocks``; figures are referenced as the PNG files beside the report."""
    lines = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
            if block.level == 1:
                lines += [f"Generated: {timestamp}", ""]
        elif isinstance(block, Text):
            text = f"[{block.text}]({block.href})" if block.href else block.text
            lines += [f"**{text}**" if block.strong else text, ""]
        elif isinstance(block, Table):
            lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
            lines.append("|" + "|".join("---:" if n else ":---" for n in block.numeric_columns()) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            lines.append("")
        elif isinstance(block, Figure):
            lines += [f"![{block.caption}]({block.file_name})", "", f"*{block.caption}*", ""]
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #ccc; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: .15em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 3px 9px; text-align: right; white-space: nowrap; }
th.text, td.text { text-align: left; }
th { background: #f2f2f2; }
tr:nth-child(even) td { background: #fafafa; }
.scroll { overflow-x: auto; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 13px; color: #555; }
.generated { color: #777; font-size: 13px; }
"""


def render_html(blocks: list, pngs: dict[str, bytes], timestamp: str) -> str:
    """One self-contained HTML page of ``blocks``; ``pngs`` (file name -> bytes) are embedded."""
    esc = html.escape
    title = next((b.text for b in blocks if isinstance(b, Heading) and b.level == 1), "Report")
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{esc(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>"]
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
            if block.level == 1:
                out.append(f'<p class="generated">Generated: {esc(timestamp)}</p>')
        elif isinstance(block, Text):
            text = f'<a href="{esc(block.href)}">{esc(block.text)}</a>' if block.href else esc(block.text)
            out.append(f"<p><strong>{text}</strong></p>" if block.strong else f"<p>{text}</p>")
        elif isinstance(block, Table):
            out.append('<div class="scroll"><table>')
            align = ["" if n else ' class="text"' for n in block.numeric_columns()]
            out.append("<tr>" + "".join(f"<th{a}>{esc(h)}</th>" for a, h in zip(align, block.header))
                       + "</tr>")
            for row in block.rows:
                cells = [f"<strong>{esc(c[2:-2])}</strong>" if c.startswith("**") else esc(c) for c in row]
                out.append("<tr>" + "".join(f"<td{a}>{c}</td>" for a, c in zip(align, cells)) + "</tr>")
            out.append("</table></div>")
        elif isinstance(block, Figure):
            data = base64.b64encode(pngs[block.file_name]).decode("ascii")
            out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(block.caption)}">'
                       f"<figcaption>{esc(block.caption)}</figcaption></figure>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)
