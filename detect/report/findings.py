"""Box accuracy explained, and the "Findings" the report opens with.

``box_accuracy`` reads each run's detections.json against the dataset and computes, with
``detect.evaluation``: AP50 and AP75 with paired bootstrap 95% intervals over images, the
difference to the first run (the reference:
``detect.evaluation.bench.reference_index``), the drop
from AP50 to AP75 (how much AP needs tight boxes) and the TIDE-style error breakdown.

``findings`` turns those numbers, the bench and the FLOPs into sentences (a pure function of
dicts, tested on fixed numbers). A difference whose interval contains 0 is reported as "no
significant difference". ``explained_section`` is the report section showing them: AP against
IoU, the interval table and the error breakdown.
"""

from __future__ import annotations

import numpy as np

from detect.common.box_ops import xywh_to_xyxy
from detect.common.fileio import read_json
from detect.data.datasets import Dataset
from detect.evaluation.bench import reference_index
from detect.evaluation.coco import class_of_category
from detect.evaluation.errors import ERROR_TYPES, error_breakdown
from detect.evaluation.matching import ImageBoxes, bootstrap_ap, match_images
from detect.report import figures
from detect.report.render import Figure, Heading, Section, Table, Text
from detect.report.runs import Run

NUM_RESAMPLES = 1000


def image_boxes(run: Run, dataset: Dataset) -> list[ImageBoxes]:
    """The run's detections.json and the dataset's ground truth, image by image (dataset order)."""
    classes = class_of_category(dataset.category_ids)
    by_image: dict[int, list] = {}
    for d in read_json(run.detections_path):
        if d.get("category_id") in classes:
            by_image.setdefault(d["image_id"], []).append(d)
    images = []
    for rec in dataset.records:
        dets = by_image.get(rec.image_id, [])
        boxes = xywh_to_xyxy(np.array([d["bbox"] for d in dets], np.float64).reshape(-1, 4))
        images.append(ImageBoxes(np.asarray(rec.gt_boxes, np.float64).reshape(-1, 4), np.asarray(rec.gt_classes),
                                 np.asarray(rec.gt_difficult, bool), np.asarray(boxes, np.float64),
                                 np.array([d["score"] for d in dets], np.float64),
                                 np.array([classes[d["category_id"]] for d in dets], np.int64)))
    return images


def reference_first(runs: list[Run]) -> list[Run]:
    """The runs with the reference (``detect.evaluation.bench.reference_index``) first."""
    i = reference_index([r.detector for r in runs])
    return [runs[i]] + runs[:i] + runs[i + 1:]


def box_accuracy(runs: list[Run], dataset: Dataset, *, num_resamples: int = NUM_RESAMPLES) -> dict:
    """{"labels", "kinds", "bootstrap" (``bootstrap_ap``), "errors": [``error_breakdown``]} for
    the runs (reference first), on every image of ``dataset``."""
    ordered = reference_first(runs)
    images = [image_boxes(r, dataset) for r in ordered]
    k = len(dataset.class_names)
    tables = [match_images(im, k, (0.5, 0.75)) for im in images]
    return {"labels": [r.label for r in ordered], "kinds": [r.detector for r in ordered],
            "bootstrap": bootstrap_ap(tables, num_resamples=num_resamples),
            "errors": [error_breakdown(im, k) for im in images], "num_images": len(dataset.records)}


def _pts(v: float) -> str:
    return f"{round(100 * v, 1) + 0.0:.1f}"  # + 0.0: no "-0.0"


def _interval(d: dict) -> str:
    return f"{_pts(d['value'])} (95% CI {_pts(d['lo'])} to {_pts(d['hi'])})"


def _significant(d: dict) -> bool:
    return d["lo"] > 0 or d["hi"] < 0


def _ratio(r: dict) -> str:
    return f"{r['ratio']:.2f}x (95% CI {r['lo']:.2f}-{r['hi']:.2f})"


def findings(acc: dict | None, bench: dict | None) -> list[str]:
    """The report's opening sentences from ``box_accuracy``'s and ``detect bench``'s numbers."""
    out: list[str] = []
    if acc is not None and len(acc["labels"]) >= 2:
        boot, labels = acc["bootstrap"], acc["labels"]
        ref = labels[0]
        for i in range(1, len(labels)):
            for thr, name in ((0.5, "loose IoU (AP50)"), (0.75, "strict IoU (AP75)")):
                d = boot["diff_to_first"][i][thr]
                a, b = boot["ap"][i][thr], boot["ap"][0][thr]
                head = f"At {name}, {labels[i]} scores {_interval(a)} and {ref} {_interval(b)}: "
                if _significant(d):
                    better, worse = (labels[i], ref) if d["value"] > 0 else (ref, labels[i])
                    out.append(head + f"{better} is more accurate by {_pts(abs(d['value']))} points "
                               f"(difference {_interval(d)}).")
                else:
                    out.append(head + f"no significant difference (difference {_interval(d)}, "
                               "the interval contains 0).")
        out.append(_localisation_claim(acc))
    elif acc is None:
        out.append("Accuracy intervals: not available (the runs need detections.json and the dataset).")
    if bench is not None:
        for d in bench["detectors"]:
            r = d.get("ratio_to_reference")
            if not r:
                continue
            flop = (f"; it needs {d['flops_ratio_to_reference']:.2f}x the FLOPs"
                    if "flops_ratio_to_reference" in d else "")
            out.append(f"Speed ({bench['num_images']} images, interleaved): {d['name']} takes {_ratio(r['detector'])} "
                       f"the time of {bench['reference']} detector-only and {_ratio(r['end_to_end'])} end to end "
                       f"with selective search{flop}.")
        paper = bench.get("paper_flops")
        if paper:
            out.append(f"At the papers' settings (VGG16, 2,000 proposals) R-CNN would need "
                       f"{paper['rcnn_over_fast_rcnn']:.0f}x the FLOPs of Fast R-CNN; the demo's small crops "
                       "and few proposals cannot show that gap.")
    else:
        out.append("Speed: no bench given (`detect bench`); see the speed section for the runs' own medians.")
    return out


def _localisation_claim(acc: dict) -> str:
    """Whether the data support "Fast R-CNN localises boxes worse than R-CNN"."""
    kinds, labels = acc["kinds"], acc["labels"]
    if "fast_rcnn" not in kinds or "rcnn" not in kinds:
        return "The claim \"Fast R-CNN localises boxes worse than R-CNN\" needs one run of each: not tested."
    f, r = kinds.index("fast_rcnn"), kinds.index("rcnn")
    boot = acc["bootstrap"]
    drop_f, drop_r = boot["drop"][f], boot["drop"][r]
    # diff_to_first is against the reference (index 0, Fast R-CNN here): R-CNN's drop minus Fast R-CNN's.
    d = boot["drop_diff_to_first"][r] if f == 0 else None
    loc_f, loc_r = acc["errors"][f]["dAP50"]["localisation"], acc["errors"][r]["dAP50"]["localisation"]
    facts = (f"AP falls from IoU 0.5 to 0.75 by {_interval(drop_f)} points for {labels[f]} and "
             f"{_interval(drop_r)} for {labels[r]}; localisation errors cost {_pts(loc_f)} and {_pts(loc_r)} "
             f"AP50 points (TIDE-style, no interval).")
    if d is None:
        return "Claim \"Fast R-CNN localises boxes worse than R-CNN\": " + facts
    fast_minus_rcnn = {"value": -d["value"], "lo": -d["hi"], "hi": -d["lo"]}
    if fast_minus_rcnn["lo"] > 0:
        verdict = "supported by these data: Fast R-CNN loses significantly more AP at strict IoU"
    elif fast_minus_rcnn["hi"] < 0:
        verdict = "contradicted by these data: Fast R-CNN loses significantly less AP at strict IoU"
    else:
        verdict = "not supported by these data: no significant difference in the drop"
    return (f"Claim \"Fast R-CNN localises boxes worse than R-CNN\": {verdict} "
            f"(Fast R-CNN's drop minus R-CNN's: {_interval(fast_minus_rcnn)}). " + facts)


def explained_section(runs: list[Run], acc: dict | None) -> Section:
    """AP against IoU, AP50/AP75 with intervals, the error breakdown."""
    section = Section([Heading("Box accuracy explained")])
    with_curve = [r for r in runs if r.ap_per_iou]
    if with_curve:
        section.pngs["ap_vs_iou.png"] = figures.ap_vs_iou(with_curve)
        section.blocks.append(Figure("ap_vs_iou.png", "AP against IoU threshold (0.50:0.95): the steeper the "
                                     "fall, the looser the boxes."))
    else:
        section.blocks.append(Text("AP against IoU: not available (no ap_per_iou in metrics.json)."))
    if acc is None:
        section.blocks.append(Text("Intervals and error breakdown: not available (they need every run's "
                                   "detections.json and the dataset)."))
        return section
    boot = acc["bootstrap"]

    def iv(d: dict) -> str:
        return f"{100 * d['value']:.1f} [{100 * d['lo']:.1f}, {100 * d['hi']:.1f}]"
    rows = [[label, iv(boot["ap"][i][0.5]), iv(boot["ap"][i][0.75]), iv(boot["drop"][i]),
             iv(boot["diff_to_first"][i][0.5]) if i else "-", iv(boot["diff_to_first"][i][0.75]) if i else "-"]
            for i, label in enumerate(acc["labels"])]
    section.blocks += [Table(["run", "AP50", "AP75", "AP50 - AP75", f"AP50 - {acc['labels'][0]}",
                              f"AP75 - {acc['labels'][0]}"], rows),
                       Text(f"Points, with paired bootstrap 95% intervals over the {acc['num_images']} images "
                            f"({boot['num_resamples']} resamples, seed {boot['seed']}).")]
    rows = [[label] + [f"{100 * e['dAP50'][t]:.1f} ({e['counts'][t]})" for t in ERROR_TYPES]
            for label, e in zip(acc["labels"], acc["errors"])]
    section.blocks.append(Heading("Error breakdown (TIDE-style)", 3))
    section.blocks.append(Table(["run", *ERROR_TYPES], rows))
    colors = {r.label: r.color for r in runs}
    section.pngs["error_breakdown.png"] = figures.error_bars(acc["labels"], [colors[x] for x in acc["labels"]],
                                                            acc["errors"])
    section.blocks.append(Figure("error_breakdown.png", "AP50 points each error type costs (count in "
                                 "brackets in the table): foreground IoU 0.5, background IoU 0.1."))
    return section
