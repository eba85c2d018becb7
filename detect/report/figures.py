"""The figures of ``detect compare`` and ``detect tune-proposals``, as PNG bytes.

Built on ``matplotlib.figure.Figure``, no pyplot (no global state, no backend switch). The bytes
are stable for the same inputs: fixed sizes and dpi, no software tag or date in the metadata.
Each run keeps one colour (``run.color``) in every figure. Boxes are xyxy original-image pixels.
"""

from __future__ import annotations

import io
import math

import matplotlib
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure as MplFigure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from PIL import Image

from detect.common.palette import TAB10_HEX
from detect.data.datasets import ImageRecord
from detect.data.images import ImageReadError, read_image
from detect.evaluation.matching import ERROR_TYPES
from detect.evaluation.proposal_tuning import best_per_search, ranking_name
from detect.report.runs import Run

RUN_COLORS = tuple(TAB10_HEX[i] for i in (0, 3, 2, 1, 4, 5, 6, 7, 8, 9))  # blue, red, green, orange, ...
GT_COLOR = "#00a651"
FIG_DPI = 100
GRID_CELL_INCHES = 3.2  # width of one image in the detection grid
GRID_MAX_SIDE = 640  # grid images are downscaled to this longer side (speed, PNG size)


def _figure(width: float, height: float) -> MplFigure:
    return MplFigure(figsize=(width, height), dpi=FIG_DPI, layout="constrained")


def _png(fig: MplFigure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIG_DPI, metadata={"Software": None})
    return buf.getvalue()


def per_class_ap_bars(runs: list[Run], class_names: list[str]) -> bytes:
    """Per-class AP, one bar per run, grouped by class."""
    num_classes, num_runs = len(class_names), len(runs)
    ax = _figure(min(max(7.0, 0.25 * num_classes * num_runs + 2.0), 30.0), 4.4).add_subplot()
    x = np.arange(num_classes)
    width = 0.8 / num_runs
    top = 0.0
    for i, run in enumerate(runs):
        values = np.array([run.per_class_ap.get(c) for c in class_names], dtype=float)  # [K], None: NaN
        top = max(top, np.nanmax(values, initial=0.0))
        positions = x - 0.4 + width * (i + 0.5)  # [K]
        ax.bar(positions, values, width, color=run.color, label=run.label)
        for position in positions[np.isnan(values)]:  # no ground truth or not measured
            ax.text(position, 0.005, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color=run.color)
    rotate = num_classes > 6 or max(len(c) for c in class_names) > 10
    ax.set_xticks(x, class_names, rotation=45 if rotate else 0, ha="right" if rotate else "center")
    ax.set(xlim=(-0.6, num_classes - 0.4), ylim=(0, min(1.0, top * 1.2 + 0.02)), ylabel="AP (IoU 0.50:0.95)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9)
    return _png(ax.figure)


def _pr_axes(ax, title: str, fontsize: float) -> None:
    ax.set(xlim=(0, 1), ylim=(0, 1.05))
    ax.set_title(title, fontsize=fontsize)
    ax.grid(alpha=0.3)


def pr_overall(runs: list[Run]) -> bytes:
    """Precision against recall at IoU 0.5, all classes, one line per run."""
    ax = _figure(6.0, 4.6).add_subplot()
    for run in runs:
        if "all" in run.pr_precision:
            ap50 = "n/a" if run.coco["AP50"] is None else f"{run.coco['AP50']:.3f}"
            ax.plot(run.pr_recall, run.pr_precision["all"], color=run.color, linewidth=2,
                    label=f"{run.label} (AP50 {ap50})")
    _pr_axes(ax, "all classes, IoU 0.5", 11)
    ax.set(xlabel="recall", ylabel="precision")
    ax.legend(loc="lower left", fontsize=9)
    return _png(ax.figure)


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
        ax.set(ylim=(0, 1.05), xlabel="proposals per image")
        ax.set_title(metric, fontsize=11)
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
    """Rows: images; columns: ground truth, then each run's detections (``detections_per_run[j]``:
    image id -> [(score, class 1..K, xyxy box)], None when run j has no detections file)."""
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
        for col in range(ncols):
            ax = axes[row, col]
            ax.imshow(image, extent=(0, record.width, record.height, 0), interpolation="bilinear")  # original pixels
            ax.set(xlim=(0, record.width), ylim=(record.height, 0), xticks=[], yticks=[])
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


def ap_vs_iou(runs: list[Run]) -> bytes:
    """One curve per run: AP at each IoU threshold 0.50:0.95."""
    ax = _figure(6.5, 4.2).add_subplot()
    for run in runs:
        ax.plot(run.ap_per_iou["iou"], run.ap_per_iou["AP"], "o-", color=run.color, label=run.label)
    ax.set(xlabel="IoU threshold", ylabel="AP (mean over classes)", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return _png(ax.figure)


def error_bars(labels: list[str], colors: list[str], errors: list[dict]) -> bytes:
    """dAP50 per error type, one bar per run."""
    ax = _figure(7.5, 4.2).add_subplot()
    x = np.arange(len(ERROR_TYPES))
    width = 0.8 / max(len(labels), 1)
    for i, (label, color, e) in enumerate(zip(labels, colors, errors)):
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, [100 * e["dAP50"][t] for t in ERROR_TYPES], width,
               color=color, label=label)
    ax.set_xticks(x, ERROR_TYPES, fontsize=9)
    ax.set_ylabel("dAP50 (points): AP50 gained by fixing this error type")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=9)
    return _png(ax.figure)


def stage_bars(runs: list[Run], stages: list[str]) -> bytes:
    """Horizontal stacked bars of ms per image per stage, selective search included."""
    ax = _figure(7.5, 1.2 + 0.6 * len(runs)).add_subplot()
    cmap = matplotlib.colormaps["tab20"]
    left = np.zeros(len(runs))
    for j, stage in enumerate(stages):
        widths = np.array([r.timing_ms.get(stage, 0.0) for r in runs])
        ax.barh(np.arange(len(runs)), widths, left=left, label=stage, color=cmap(j % 20))
        left += widths
    ax.set_yticks(np.arange(len(runs)), [r.label for r in runs])
    ax.set_xlabel("ms per image (median), stacked by stage")
    ax.legend(fontsize=8, ncols=min(4, len(stages)), loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    return _png(ax.figure)


def speed_vs_accuracy(runs: list[Run]) -> bytes:
    """AP50 against time per image: detector-only (filled) and end to end (hollow) points."""
    ax = _figure(7.0, 4.4).add_subplot()
    xs = []
    for run in runs:
        ap50 = run.coco["AP50"]
        if ap50 is None or not run.test_ms:
            continue
        ax.plot([run.test_ms], [ap50], "o", color=run.color, markersize=8)
        xs.append(run.test_ms)
        if "proposals" in run.timing_ms:
            e2e = run.test_ms + run.timing_ms["proposals"]
            ax.plot([e2e], [ap50], "o", mfc="none", color=run.color, markersize=8)
            ax.plot([run.test_ms, e2e], [ap50, ap50], ":", color=run.color, linewidth=1)
            xs.append(e2e)
        ax.annotate(run.label, (run.test_ms, ap50), xytext=(6, 5), textcoords="offset points", fontsize=9,
                    color=run.color)
    if xs:
        ax.set(xscale="log", xlim=(min(xs) / 2, max(xs) * 2))
    ax.set(ylim=(0, 1), xlabel="ms per image (log scale)", ylabel="AP50")
    ax.grid(alpha=0.3)
    ax.legend(handles=[Line2D([], [], marker="o", linestyle="", color="#555", label="detector only"),
                       Line2D([], [], marker="o", linestyle="", mfc="none", color="#555",
                              label="end to end (with selective search)")], fontsize=9, loc="lower right")
    return _png(ax.figure)


def proposal_sweep(sweeps: dict[str, list[Run]]) -> bytes:
    """AP50 (left) and detector ms per image (right) against top-k proposals, per detector."""
    ax_ap, ax_t = _figure(9.0, 3.8).subplots(1, 2)
    for kind, runs in sweeps.items():
        ks = [r.test_settings.get("proposal_top_k", 0) for r in runs]
        xs = [k if k else max(ks) * 2 for k in ks]  # 0 = all proposals: at the right end, past the largest k
        order = np.argsort(xs)
        xs = [xs[i] for i in order]
        ax_ap.plot(xs, [runs[i].coco["AP50"] or 0.0 for i in order], "o-", color=runs[0].color, label=kind)
        ax_t.plot(xs, [runs[i].test_ms for i in order], "o-", color=runs[0].color, label=kind)
    for ax, label in ((ax_ap, "AP50"), (ax_t, "detector ms per image")):
        ax.set(xscale="log", xlabel="proposals per image (top-k; rightmost: all)", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(ax_ap.figure)


def proposal_tuning(result: dict) -> bytes:
    """``detect tune-proposals``: recall against boxes per image (each measured search's budgets at
    its best min size and ranking) and seconds per image (one point per measured search, hollow:
    every search on the probe images); the target dashed, the chosen setting a star."""
    ax_boxes, ax_time = _figure(11.0, 4.4).subplots(1, 2)
    metric, target = result["metric"], result["target"]["recall"]
    modes = list(dict.fromkeys([r["mode"] for r in result["rows"]] + [k.split("_")[0] for k in result["probe"]]))
    mode_colors = {m: TAB10_HEX[i % len(TAB10_HEX)] for i, m in enumerate(modes)}
    k_scales = sorted({r["k_scale"] for r in result["rows"]}, reverse=True)
    styles = dict(zip(k_scales, ("-", "--", ":", "-.") * len(k_scales)))
    for best in best_per_search(result):
        same = ("mode", "resize", "k_scale", "min_size", "ranking", "nms_iou")
        rows = sorted((r for r in result["rows"] if all(r[k] == best[k] for k in same)),
                      key=lambda r: r["boxes_per_image"])
        color = mode_colors[best["mode"]]
        label = (f"{best['mode']} {best['resize'] or 'native'} k x{best['k_scale']:g} min {best['min_size']} "
                 + ranking_name(best))
        ax_boxes.plot([r["boxes_per_image"] for r in rows], [r[metric] for r in rows], "o" + styles[best["k_scale"]],
                      color=color, label=label, markersize=3, linewidth=1.2)
        ax_time.plot([best["seconds_per_image"]], [best[metric]], "o", color=color, markersize=5)
    for key, probe in result["probe"].items():  # every search tried, on the probe images: hollow
        ax_time.plot([probe["seconds_per_image"]], [probe["best_recall"]], "o", mfc="none", markersize=5,
                     color=mode_colors[key.split("_")[0]])
    ax_time.legend(handles=[Line2D([], [], marker="o", linestyle="", color=c, label=m) for m, c in mode_colors.items()]
                   + [Line2D([], [], marker="o", linestyle="", mfc="none", color="#555",
                             label=f"probe ({result['probe_images']} images, best setting)")],
                   fontsize=7, loc="lower right")
    chosen = result["chosen"]
    ax_boxes.plot([chosen["boxes_per_image"]], [chosen[metric]], "*", color="black", markersize=14, label="chosen")
    ax_time.plot([chosen["seconds_per_image"]], [chosen[metric]], "*", color="black", markersize=14)
    for ax, xlabel in ((ax_boxes, "boxes per image (top_k budgets; log scale)"),
                       (ax_time, "seconds per image, one thread (log scale)")):
        ax.axhline(target, color="#555", linestyle="--", linewidth=1)
        ax.set(xscale="log", xlabel=xlabel, ylabel=metric, ylim=(0, 1.02))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
    ax_boxes.legend(fontsize=6, loc="lower right")
    return _png(ax_boxes.figure)
