"""How ``detect compare`` shows things: the figures (PNG bytes) and the document (Markdown, HTML).

``detect.report.sections`` decides what the report says, as a list of blocks (``Heading``, ``Text``,
``Table``, ``Figure``); ``render_markdown`` and ``render_html`` write them out. The HTML is
self-contained: inline CSS, figures as base64 PNG ``data:`` URIs, no scripts, no external URL
(a ``Text`` may link to a file beside the report).

Figures are built with ``matplotlib.figure.Figure`` directly: no pyplot, so no global figure
state and no backend switch in the caller's process. Bytes are stable for the same inputs:
fixed sizes and dpi, and no software tag or date in the PNG metadata (``detect.report.sections``
also pins matplotlib's default style). Each run keeps one colour (``run.color``) in every figure.
Boxes are xyxy pixels of the original image.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure as MplFigure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from PIL import Image

from detect.common.palette import TAB10_HEX
from detect.data.datasets import ImageRecord
from detect.data.images import ImageReadError, read_image
from detect.report.runs import Run

RUN_COLORS = tuple(TAB10_HEX[i] for i in (0, 3, 2, 1, 4, 5, 6, 7, 8, 9))  # blue, red, green, orange, ...
GT_COLOR = "#00a651"
FIG_DPI = 100
GRID_CELL_INCHES = 3.2  # width of one image in the detection grid
GRID_MAX_SIDE = 640  # grid images are downscaled to this longer side (speed, PNG size)


# ----------------------------------------------------------------------------------------------
# Report blocks: each section builds these; render_markdown / render_html turn them into text
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Document: Markdown and HTML
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> MplFigure:
    return MplFigure(figsize=(width, height), dpi=FIG_DPI, layout="constrained")


def _png(fig: MplFigure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIG_DPI, metadata={"Software": None})
    return buf.getvalue()


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def accuracy_vs_time(runs: list[Run]) -> bytes:
    """AP (circle) and AP50 (triangle) against test ms per image excluding proposals."""
    fig = _figure(7.0, 4.6)
    ax = fig.add_subplot()
    values = []
    for run in runs:
        x, ap, ap50 = run.test_ms, run.coco["AP"], run.coco["AP50"]
        ys = [y for y in (ap, ap50) if y is not None]
        values += ys
        if len(ys) == 2:
            ax.plot([x, x], ys, "-", color=run.color, linewidth=1, alpha=0.5)
        if ap is not None:
            ax.plot([x], [ap], "o", color=run.color, markersize=8)
        if ap50 is not None:
            ax.plot([x], [ap50], "^", color=run.color, markersize=8)
        ax.annotate(run.label, (x, max(ys, default=0.0)), xytext=(7, 4), textcoords="offset points",
                    fontsize=9, color=run.color)
    times = [run.test_ms for run in runs]
    if max(times) / min(times) > 5:
        ax.set_xscale("log")
        ax.set_xlim(min(times) / 2, max(times) * 4)
    else:
        ax.set_xlim(0, max(times) * 1.35)
    ax.set_ylim(0, min(1.0, max(values, default=1.0) * 1.2 + 0.02))
    ax.set_xlabel("test time per image, ms (excluding proposals)")
    ax.set_ylabel("COCO box AP")
    ax.grid(alpha=0.3)
    ax.legend(handles=[Line2D([], [], marker="o", linestyle="", color="#555", label="AP (0.50:0.95)"),
                       Line2D([], [], marker="^", linestyle="", color="#555", label="AP50")],
              loc="lower right", fontsize=9)
    return _png(fig)


def per_class_ap_bars(runs: list[Run], class_names: list[str]) -> bytes:
    """Per-class AP, one bar per run, grouped by class."""
    num_classes, num_runs = len(class_names), len(runs)
    fig = _figure(min(max(7.0, 0.25 * num_classes * num_runs + 2.0), 30.0), 4.4)
    ax = fig.add_subplot()
    x = np.arange(num_classes)
    width = 0.8 / num_runs
    top = 0.0
    for i, run in enumerate(runs):
        values = np.array([_nan(run.per_class_ap.get(c)) for c in class_names])  # [K]
        top = max(top, np.nanmax(values, initial=0.0))
        positions = x - 0.4 + width * (i + 0.5)  # [K]
        ax.bar(positions, values, width, color=run.color, label=run.label)
        for position in positions[np.isnan(values)]:  # no ground truth or not measured
            ax.text(position, 0.005, "n/a", rotation=90, ha="center", va="bottom", fontsize=7,
                    color=run.color)
    rotate = num_classes > 6 or max(len(c) for c in class_names) > 10
    ax.set_xticks(x, class_names, rotation=45 if rotate else 0, ha="right" if rotate else "center")
    ax.set_xlim(-0.6, num_classes - 0.4)
    ax.set_ylim(0, min(1.0, top * 1.2 + 0.02))
    ax.set_ylabel("AP (IoU 0.50:0.95)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9)
    return _png(fig)


def _pr_axes(ax, title: str, fontsize: float) -> None:
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=fontsize)
    ax.grid(alpha=0.3)


def pr_overall(runs: list[Run]) -> bytes:
    """Precision against recall at IoU 0.5, all classes, one line per run."""
    fig = _figure(6.0, 4.6)
    ax = fig.add_subplot()
    for run in runs:
        if "all" in run.pr_precision:
            ap50 = "n/a" if run.coco["AP50"] is None else f"{run.coco['AP50']:.3f}"
            ax.plot(run.pr_recall, run.pr_precision["all"], color=run.color, linewidth=2,
                    label=f"{run.label} (AP50 {ap50})")
    _pr_axes(ax, "all classes, IoU 0.5", 11)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.legend(loc="lower left", fontsize=9)
    return _png(fig)


def pr_per_class(runs: list[Run], class_names: list[str]) -> bytes:
    """Small multiples: one precision-recall panel per class, one line per run."""
    ncols = min(4, len(class_names))
    nrows = math.ceil(len(class_names) / ncols)
    fig = _figure(3.0 * ncols, 2.6 * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(class_names):
            ax.set_axis_off()
            continue
        name = class_names[i]
        curves = [(run, run.pr_precision[name]) for run in runs if name in run.pr_precision]
        for run, precision in curves:
            ax.plot(run.pr_recall, precision, color=run.color, linewidth=1.5)
        if all(np.isnan(precision).all() for _, precision in curves):
            ax.text(0.5, 0.5, "no ground truth", transform=ax.transAxes, ha="center", va="center",
                    fontsize=9, color="#777")
        _pr_axes(ax, name, 10)
        ax.tick_params(labelsize=8)
        if i + ncols >= len(class_names):  # lowest panel of its column
            ax.set_xlabel("recall", fontsize=9)
        if i % ncols == 0:
            ax.set_ylabel("precision", fontsize=9)
    fig.legend(handles=[Line2D([], [], color=run.color, label=run.label) for run in runs],
               loc="outside upper center", ncols=min(len(runs), 4), fontsize=9)
    return _png(fig)


def proposal_recall(labels: list[str], colors: list[str], recalls: list[dict]) -> bytes:
    """Recall@0.5, recall@0.7 and AR against the number of proposals per image (log x)."""
    metrics = [k for k in ("recall@0.5", "recall@0.7", "AR") if any(k in r for r in recalls)]
    fig = _figure(3.6 * max(len(metrics), 1), 3.6)
    axes = fig.subplots(1, max(len(metrics), 1), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for label, color, recall in zip(labels, colors, recalls):
            if metric in recall:
                ax.plot(recall["top_k"], recall[metric], "o-", color=color, label=label)
        top_k = sorted({k for recall in recalls for k in recall["top_k"]})
        ax.set_xscale("log")
        ax.set_xticks(top_k, [f"{k:g}" for k in top_k], fontsize=8)
        ax.minorticks_off()
        ax.set_ylim(0, 1.05)
        ax.set_title(metric, fontsize=11)
        ax.set_xlabel("proposals per image")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall")
    axes[0].legend(fontsize=8, loc="lower right")
    return _png(fig)


def _downscale(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    scale = GRID_MAX_SIDE / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def _draw_box(ax, box, text: str, color: str, image_height: int) -> None:
    x1, y1, x2, y2 = box
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=1.5))
    inside = y1 < 0.06 * image_height  # no room above the box: label inside its top edge
    ax.text(x1, y1, text, fontsize=6.5, color="white", va="top" if inside else "bottom", ha="left",
            clip_on=True, bbox={"facecolor": color, "edgecolor": "none", "pad": 1.0, "alpha": 0.85})


def detection_grid(records: list[ImageRecord], class_names: list[str], runs: list[Run],
                   detections_per_run: list[dict[int, list] | None]) -> bytes:
    """Rows: images; columns: ground truth, then each run's detections.

    ``detections_per_run[j]`` maps image id -> [(score, class 1..K, xyxy box)] for run j, or is
    None when the run has no detections file (its cells say so).
    """
    ncols = 1 + len(runs)
    ratios = [min(max(r.height / max(r.width, 1), 0.4), 1.6) for r in records]  # [N] h / w
    fig = _figure(GRID_CELL_INCHES * ncols, sum(GRID_CELL_INCHES * q + 0.35 for q in ratios))
    axes = fig.subplots(len(records), ncols, squeeze=False, gridspec_kw={"height_ratios": ratios})
    for row, record in enumerate(records):
        unreadable = False
        try:
            image = _downscale(read_image(record.file_name))  # [h, w, 3] uint8
        except ImageReadError:
            image, unreadable = np.full((8, 8, 3), 200, np.uint8), True  # a grey cell
        extent = (0, record.width, record.height, 0)  # draw in original-image pixels
        for col in range(ncols):
            ax = axes[row, col]
            ax.imshow(image, extent=extent, interpolation="bilinear")
            ax.set_xlim(0, record.width)
            ax.set_ylim(record.height, 0)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                for box, k in zip(record.gt_boxes.tolist(), record.gt_classes.tolist()):
                    _draw_box(ax, box, class_names[k - 1], GT_COLOR, record.height)
                title, color = f"image {record.image_id}: ground truth", "black"
            else:
                run, detections = runs[col - 1], detections_per_run[col - 1]
                title, color = run.label, run.color
                if detections is None:
                    ax.text(0.5, 0.5, "no detections.json", transform=ax.transAxes, ha="center",
                            va="center", fontsize=9, bbox={"facecolor": "white", "alpha": 0.8})
                else:
                    for score, k, box in detections[record.image_id]:
                        _draw_box(ax, box, f"{class_names[k - 1]} {score:.2f}", run.color, record.height)
                    title += f" ({len(detections[record.image_id])} shown)"
            if unreadable:
                title += " (image unreadable)"
            ax.set_title(title, fontsize=9, color=color)
    return _png(fig)
