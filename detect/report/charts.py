"""The analysis figures: AP against IoU, error breakdown, stacked stage times, speed against
accuracy with end-to-end and detector-only points, and ``detect tune-proposals``' recall against
boxes and seconds. PNG bytes, as ``detect.report.render``."""

from __future__ import annotations

import matplotlib
import matplotlib.ticker
import numpy as np
from matplotlib.lines import Line2D

from detect.common.palette import TAB10_HEX
from detect.evaluation.errors import ERROR_TYPES
from detect.evaluation.proposal_tuning import best_per_search
from detect.report.render import _figure, _png
from detect.report.runs import Run


def ap_vs_iou(runs: list[Run]) -> bytes:
    """One curve per run: AP at each IoU threshold 0.50:0.95."""
    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot()
    for run in runs:
        ax.plot(run.ap_per_iou["iou"], run.ap_per_iou["AP"], "o-", color=run.color, label=run.label)
    ax.set_xlabel("IoU threshold")
    ax.set_ylabel("AP (mean over classes)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return _png(fig)


def error_bars(labels: list[str], colors: list[str], errors: list[dict]) -> bytes:
    """dAP50 per error type, one bar per run."""
    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot()
    x = np.arange(len(ERROR_TYPES))
    width = 0.8 / max(len(labels), 1)
    for i, (label, color, e) in enumerate(zip(labels, colors, errors)):
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, [100 * e["dAP50"][t] for t in ERROR_TYPES], width,
               color=color, label=label)
    ax.set_xticks(x, ERROR_TYPES, fontsize=9)
    ax.set_ylabel("dAP50 (points): AP50 gained by fixing this error type")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=9)
    return _png(fig)


def stage_bars(runs: list[Run], stages: list[str]) -> bytes:
    """Horizontal stacked bars of ms per image per stage, selective search included."""
    fig = _figure(7.5, 1.2 + 0.6 * len(runs))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["tab20"]
    left = np.zeros(len(runs))
    for j, stage in enumerate(stages):
        widths = np.array([r.timing_ms.get(stage, 0.0) for r in runs])
        color = cmap(j % 20)
        ax.barh(np.arange(len(runs)), widths, left=left, label=stage, color=color)
        left += widths
    ax.set_yticks(np.arange(len(runs)), [r.label for r in runs])
    ax.set_xlabel("ms per image (median), stacked by stage")
    ax.legend(fontsize=8, ncols=min(4, len(stages)), loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)


def speed_vs_accuracy(runs: list[Run]) -> bytes:
    """AP50 against time per image: detector-only (filled) and end to end (hollow) points."""
    fig = _figure(7.0, 4.4)
    ax = fig.add_subplot()
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
        ax.set_xscale("log")
        ax.set_xlim(min(xs) / 2, max(xs) * 2)
    ax.set_ylim(0, 1)
    ax.set_xlabel("ms per image (log scale)")
    ax.set_ylabel("AP50")
    ax.grid(alpha=0.3)
    ax.legend(handles=[Line2D([], [], marker="o", linestyle="", color="#555", label="detector only"),
                       Line2D([], [], marker="o", linestyle="", mfc="none", color="#555",
                              label="end to end (with selective search)")], fontsize=9, loc="lower right")
    return _png(fig)


def proposal_sweep(sweeps: dict[str, list[Run]]) -> bytes:
    """AP50 (left) and detector ms per image (right) against top-k proposals, per detector."""
    fig = _figure(9.0, 3.8)
    ax_ap, ax_t = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for kind, runs in sweeps.items():
        # 0 = all proposals: drawn at the right end, past the largest k
        ks = [r.test_settings.get("proposal_top_k", 0) for r in runs]
        largest = max(ks)
        xs = [k if k else largest * 2 for k in ks]
        order = np.argsort(xs)
        xs = [xs[i] for i in order]
        color = runs[0].color
        ax_ap.plot(xs, [runs[i].coco["AP50"] or 0.0 for i in order], "o-", color=color, label=kind)
        ax_t.plot(xs, [runs[i].test_ms for i in order], "o-", color=color, label=kind)
    for ax, label in ((ax_ap, "AP50"), (ax_t, "detector ms per image")):
        ax.set_xscale("log")
        ax.set_xlabel("proposals per image (top-k; rightmost: all)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


def proposal_tuning(result: dict) -> bytes:
    """``detect tune-proposals``: recall against boxes per image (left: the budgets of each
    measured search, at its best min size and ranking) and against seconds per image (right:
    one point per measured search, hollow: every search on the probe images); the target as a
    dashed line, the chosen setting as a star."""
    fig = _figure(11.0, 4.4)
    ax_boxes, ax_time = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    metric, target = result["metric"], result["target"]["recall"]
    modes = list(dict.fromkeys(r["mode"] for r in result["rows"]))
    k_scales = sorted({r["k_scale"] for r in result["rows"]}, reverse=True)
    styles = dict(zip(k_scales, ("-", "--", ":", "-.") * len(k_scales)))
    for best in best_per_search(result):
        same = ("mode", "resize", "k_scale", "min_size", "ranking", "nms_iou")
        rows = sorted((r for r in result["rows"] if all(r[k] == best[k] for k in same)),
                      key=lambda r: r["boxes_per_image"])
        color = TAB10_HEX[modes.index(best["mode"]) % len(TAB10_HEX)]
        ranking = best["ranking"] if best["ranking"] == "paper" else f"nms {best['nms_iou']:g}"
        label = f"{best['mode']} {best['resize'] or 'native'} k x{best['k_scale']:g} min {best['min_size']} {ranking}"
        ax_boxes.plot([r["boxes_per_image"] for r in rows], [r[metric] for r in rows], "o" + styles[best["k_scale"]],
                      color=color, label=label, markersize=3, linewidth=1.2)
        ax_time.plot([best["seconds_per_image"]], [best[metric]], "o", color=color, markersize=5)
    for key, probe in result["probe"].items():  # every search tried, on the probe images: hollow
        mode = key.split("_")[0]
        modes += [] if mode in modes else [mode]
        ax_time.plot([probe["seconds_per_image"]], [probe["best_recall"]], "o", mfc="none", markersize=5,
                     color=TAB10_HEX[modes.index(mode) % len(TAB10_HEX)])
    ax_time.legend(handles=[Line2D([], [], marker="o", linestyle="", color=TAB10_HEX[i % len(TAB10_HEX)], label=m)
                            for i, m in enumerate(modes)]
                   + [Line2D([], [], marker="o", linestyle="", mfc="none", color="#555",
                             label=f"probe ({result['probe_images']} images, best setting)")],
                   fontsize=7, loc="lower right")
    chosen = result["chosen"]
    ax_boxes.plot([chosen["boxes_per_image"]], [chosen[metric]], "*", color="black", markersize=14, label="chosen")
    ax_time.plot([chosen["seconds_per_image"]], [chosen[metric]], "*", color="black", markersize=14)
    for ax, xlabel in ((ax_boxes, "boxes per image (top_k budgets; log scale)"),
                       (ax_time, "seconds per image, one thread (log scale)")):
        ax.axhline(target, color="#555", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    ax_boxes.legend(fontsize=6, loc="lower right")
    return _png(fig)
