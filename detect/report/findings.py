"""Box accuracy explained, and the "Findings" the report opens with.

``box_accuracy`` computes from each run's detections.json: AP50 and AP75 with paired bootstrap 95%
intervals over images, the difference to the reference run (``reference_first``), the drop from
AP50 to AP75 (how much AP needs tight boxes) and the TIDE-style error breakdown;
``explained_section`` shows them. ``findings`` turns them, ``like_for_like``'s differences and the
bench into sentences (a pure function of dicts): an interval containing 0 is "no significant
difference", each verdict names the differences between its runs, and the box-accuracy claim is
judged on like-for-like runs only."""

from __future__ import annotations

import json

import numpy as np

from detect.common.fileio import read_json
from detect.data.datasets import Dataset, gt_flags
from detect.evaluation.bench import ratio_text, reference_index
from detect.evaluation.matching import ERROR_TYPES, ImageBoxes, bootstrap_ap, error_breakdown, match_images
from detect.evaluation.voc import detections_from_results
from detect.report import figures
from detect.report.render import Heading, Section, Table, Text
from detect.report.runs import Run

NUM_RESAMPLES = 1000
FLOOR_AP50 = 0.05  # an AP50 whose interval reaches below this bounds its own drop to AP75


def image_boxes(run: Run, dataset: Dataset) -> list[ImageBoxes]:
    """The run's detections.json and the dataset's ground truth, image by image (dataset order)."""
    detections = {image_id: (d.boxes.numpy(), d.scores.numpy(), d.labels.numpy()) for image_id, d
                  in detections_from_results(dataset, read_json(run.detections_path)).items()}
    none = (np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))
    return [ImageBoxes(np.asarray(rec.gt_boxes, np.float64).reshape(-1, 4), np.asarray(rec.gt_classes),
                       gt_flags(rec.gt_difficult, len(rec.gt_boxes)), *detections.get(rec.image_id, none))
            for rec in dataset.records]


def reference_first(runs: list[Run]) -> list[Run]:
    """The runs with the reference (``detect.evaluation.bench.reference_index``) first."""
    i = reference_index([r.detector for r in runs])
    return [runs[i]] + runs[:i] + runs[i + 1:]


def _schedule(run: Run) -> str | None:
    """The fine-tuning schedule of the run's config.yaml, in terms both detectors share (an
    iteration is 128 RoIs at either paper's settings: [FRCN] 2 images x 64, [RCNN] 128 windows)."""
    cfg = run.config or {}
    t, r = cfg.get("train") or {}, cfg.get("rcnn") or {}
    if run.detector == "rcnn":
        steps = (r.get("ft_max_iter"), r.get("ft_batch_size"), r.get("ft_lr"), r.get("ft_steps"))
    else:
        rois = t.get("images_per_batch", 0) * t.get("rois_per_image", 0) or None
        steps = (t.get("max_iter"), rois, t.get("lr"), t.get("steps"))
    return None if None in steps else f"{steps[0]} iterations of {steps[1]} RoIs at lr {steps[2]}, steps {steps[3]}"


def _setup(run: Run) -> dict:
    """What a comparison must hold equal, as this run records it (None: not recorded)."""
    cfg = run.config or {}
    train = (cfg.get("data") or {}).get("train")
    settings = dict(run.proposal_settings or {})
    cut = [k for k in ((run.test_settings or {}).get("proposal_top_k"), settings.pop("top_k", 0)) if k]
    val = run.data or {}
    return {
        "proposal store": run.proposals or "none (selective search at test time)",
        "proposal settings": settings or None,  # the store's, as meta.json records them
        "proposal top_k": None if run.test_settings is None else str(min(cut)) if cut else "all",
        "validation set": f"{val['path']} {val.get('split', '')}".rstrip() + f", {run.num_images} images"
        if val.get("path") else None,
        "backbone": None if run.backbone == "n/a" else run.backbone,
        "backbone weights": (cfg.get("model") or {}).get("weights"),
        "training images": None if not train else (f"{train.get('path')} {train.get('split', '')}".rstrip()
                                                   + f", proposals {cfg['data'].get('train_proposals')}"),
        "schedule": _schedule(run),
    }


def like_for_like(runs: list[Run]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """What ``runs`` do not share: {what: {run label: its value}} for each item of ``_setup``
    that differs, and the items some run does not record (not checked)."""
    setups = {r.label: _setup(r) for r in runs}
    differ, unknown = {}, []
    for what in next(iter(setups.values())):
        values = {label: s[what] for label, s in setups.items()}
        if any(v is None for v in values.values()):
            unknown.append(what)
        elif len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            if what == "proposal settings":  # name only the keys that differ
                keys = sorted(k for k in set().union(*values.values())
                              if len({str(v.get(k)) for v in values.values()}) > 1)
                values = {label: ", ".join(f"{k} {v.get(k)}" for k in keys) for label, v in values.items()}
            differ[what] = values
    return differ, unknown


def _versus(values: dict[str, str]) -> str:
    """'2000 (a, b) vs 300 (c)'."""
    by_value = {v: [label for label, x in values.items() if x == v] for v in values.values()}
    return " vs ".join(f"{v} ({', '.join(labels)})" for v, labels in by_value.items())


def _caveat(names: list[str]) -> str:
    return f" Not like for like: they differ in {', '.join(names)}." if names else ""


def box_accuracy(runs: list[Run], dataset: Dataset) -> dict:
    """{"labels", "kinds", "bootstrap" (``bootstrap_ap``), "errors": [``error_breakdown``]} for
    the runs (reference first), on every image of ``dataset``."""
    ordered = reference_first(runs)
    images = [image_boxes(r, dataset) for r in ordered]
    k = len(dataset.class_names)
    tables = [match_images(im, k, (0.5, 0.75)) for im in images]
    return {"labels": [r.label for r in ordered], "kinds": [r.detector for r in ordered],
            "bootstrap": bootstrap_ap(tables, num_resamples=NUM_RESAMPLES),
            "errors": [error_breakdown(im, k) for im in images], "num_images": len(dataset.records)}


def _pts(v: float) -> str:
    return f"{round(100 * v, 1) + 0.0:.1f}"  # + 0.0: no "-0.0"


def _interval(d: dict) -> str:
    return f"{_pts(d['value'])} (95% CI {_pts(d['lo'])} to {_pts(d['hi'])})"


def findings(acc: dict | None, bench: dict | None, differ: dict | None = None, unknown: list[str] = ()) -> list[str]:
    """The report's opening sentences from ``box_accuracy``'s and ``detect bench``'s numbers and
    ``like_for_like``'s differences (``differ``) and unchecked items (``unknown``)."""
    differ = differ or {}
    out: list[str] = []
    if differ:
        out.append("These runs are not like for like: " + "; ".join(f"{w} {_versus(v)}" for w, v in differ.items())
                   + ". Every verdict below that depends on it says so.")
    if unknown:
        out.append("Not checked, as not every run folder records it (metrics.json, config.yaml): "
                   + ", ".join(unknown) + ".")
    if acc is not None and len(acc["labels"]) >= 2:
        boot, labels, ref = acc["bootstrap"], acc["labels"], acc["labels"][0]
        for i in range(1, len(labels)):
            for thr, name in ((0.5, "loose IoU (AP50)"), (0.75, "strict IoU (AP75)")):
                d = boot["diff_to_first"][i][thr]
                head = (f"At {name}, {labels[i]} scores {_interval(boot['ap'][i][thr])} and {ref} "
                        f"{_interval(boot['ap'][0][thr])}: ")
                if d["lo"] > 0 or d["hi"] < 0:  # the interval excludes 0
                    better = labels[i] if d["value"] > 0 else ref
                    head += f"{better} is more accurate by {_pts(abs(d['value']))} points (difference {_interval(d)})."
                else:
                    head += f"no significant difference (difference {_interval(d)}, the interval contains 0)."
                out.append(head + _caveat([w for w, v in differ.items() if v[labels[i]] != v[ref]]))
        out.append(_localisation_claim(acc, list(differ), list(unknown)))
    elif acc is None:
        out.append("Accuracy intervals: not available (the runs need detections.json and the dataset).")
    if bench is not None:
        # A speed ratio depends on the backbones and on the bench's own cut (its proposals are shared).
        top_k = {e["name"]: (e.get("test_settings") or {}).get("proposal_top_k") for e in bench["detectors"]}
        for d in (d for d in bench["detectors"] if d.get("ratio_to_reference")):
            r = d["ratio_to_reference"]
            flop = (f"; it needs {d['flops_ratio_to_reference']:.2f}x the FLOPs"
                    if "flops_ratio_to_reference" in d else "")
            apart = (["backbone"] * ("backbone" in differ)
                     + ["proposal top_k"] * (top_k[d["name"]] != top_k[bench["reference"]]))
            out.append(f"Speed ({bench['num_images']} images, interleaved): {d['name']} takes "
                       f"{ratio_text(r['detector'])} the time of {bench['reference']} detector-only and "
                       f"{ratio_text(r['end_to_end'])} end to end "
                       f"with selective search{flop}." + _caveat(apart))
        paper = bench.get("paper_flops")
        if paper:
            out.append(f"At the papers' settings (VGG16, 2,000 proposals) R-CNN would need "
                       f"{paper['rcnn_over_fast_rcnn']:.0f}x the FLOPs of Fast R-CNN; the demo's small crops "
                       "and few proposals cannot show that gap.")
    else:
        out.append("Speed: no bench given (`detect bench`); see the speed section for the runs' own medians.")
    return out


def _drop_facts(acc: dict, i: int) -> str:
    """Run i's fall from AP50 to AP75, in points and as a share of its AP50."""
    drop, ap50 = acc["bootstrap"]["drop"][i], acc["bootstrap"]["ap"][i][0.5]["value"]
    share = f"it loses {100 * drop['value'] / ap50:.0f}% of its AP50" if ap50 > 0 else "it has no AP50 to lose"
    return f"{_interval(drop)} points for {acc['labels'][i]} ({share})"


def _localisation_claim(acc: dict, differ: list[str], unknown: list[str]) -> str:
    """Whether the data support "Fast R-CNN localises boxes worse than R-CNN": judged only on
    like-for-like runs (``differ``, ``unknown`` empty) with both AP50 clear of ``FLOOR_AP50``."""
    kinds, labels = acc["kinds"], acc["labels"]
    claim = "Claim \"Fast R-CNN localises boxes worse than R-CNN\": "
    if "fast_rcnn" not in kinds or "rcnn" not in kinds:
        return claim + "needs one run of each: not tested."
    f, r = kinds.index("fast_rcnn"), kinds.index("rcnn")
    boot = acc["bootstrap"]
    loc_f, loc_r = acc["errors"][f]["dAP50"]["localisation"], acc["errors"][r]["dAP50"]["localisation"]
    facts = (f"AP falls from IoU 0.5 to 0.75 by {_drop_facts(acc, f)} and {_drop_facts(acc, r)}; localisation "
             f"errors cost {_pts(loc_f)} and {_pts(loc_r)} AP50 points (TIDE-style, no interval).")
    floor = [labels[i] for i in (f, r) if boot["ap"][i][0.5]["lo"] < FLOOR_AP50]
    if differ or unknown:
        why = ([f"the runs differ in {', '.join(differ)}"] * bool(differ)
               + [f"{', '.join(unknown)} not checked"] * bool(unknown))
        return claim + (f"cannot be judged, as {' and '.join(why)} (box accuracy is compared on like-for-like "
                        "runs only). " + facts)
    if floor:
        return claim + (f"cannot be judged: the AP50 of {' and '.join(floor)} is near zero (its 95% interval "
                        f"reaches below {_pts(FLOOR_AP50)} points), so its drop to AP75 is bounded by its AP50, "
                        "not by its boxes. " + facts)
    # diff_to_first is against the reference, Fast R-CNN (index 0, ``reference_first``): R-CNN's drop minus its.
    d = boot["drop_diff_to_first"][r]
    fast_minus_rcnn = {"value": -d["value"], "lo": -d["hi"], "hi": -d["lo"]}
    if fast_minus_rcnn["lo"] > 0:
        verdict = "supported by these data: Fast R-CNN loses significantly more AP at strict IoU"
    elif fast_minus_rcnn["hi"] < 0:
        verdict = "contradicted by these data: Fast R-CNN loses significantly less AP at strict IoU"
    else:
        verdict = "not supported by these data: no significant difference in the drop"
    return claim + f"{verdict} (Fast R-CNN's drop minus R-CNN's: {_interval(fast_minus_rcnn)}). " + facts


def explained_section(runs: list[Run], acc: dict | None) -> Section:
    """AP against IoU, AP50/AP75 with intervals, the error breakdown."""
    section = Section([Heading("Box accuracy explained")])
    with_curve = [r for r in runs if r.ap_per_iou]
    if with_curve:
        section.add_figure("ap_vs_iou.png", figures.ap_vs_iou(with_curve), "AP against IoU threshold "
                           "(0.50:0.95): the steeper the fall, the looser the boxes.")
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
    section.blocks += [Heading("Error breakdown (TIDE-style)", 3), Table(["run", *ERROR_TYPES], rows)]
    colors = {r.label: r.color for r in runs}
    section.add_figure("error_breakdown.png",
                       figures.error_bars(acc["labels"], [colors[x] for x in acc["labels"]], acc["errors"]),
                       "AP50 points each error type costs (count in brackets in the table): foreground "
                       "IoU 0.5, background IoU 0.1.")
    return section
