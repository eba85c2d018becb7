"""Side-by-side reports of evaluated runs: ``detect compare RUN_DIR... --output-dir REPORT``.

``make_report`` writes ``report.md`` with its figures beside it as PNG files, and ``report.html``,
self-contained (``detect.report.render``) but for one link to ``viewer.html``
(``detect.report.viewer``). For the same runs both are identical apart from the ``Generated:``
line, and the PNGs byte-identical (``detect.report.figures``, in matplotlib's default style
whatever the user's matplotlibrc). The run folders it reads: ``detect.report.runs``; the paths
they name: ``detect.report.runs.resolve_path``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import matplotlib.style

from detect.common.fileio import read_json, write_bytes_atomic, write_text_atomic
from detect.data.datasets import Dataset, load_dataset
from detect.data.images import ImageReadError
from detect.evaluation.coco import class_of_category
from detect.report import figures, render
from detect.report.findings import box_accuracy, explained_section, findings, like_for_like
from detect.report.render import Heading, Section, Table, Text
from detect.report.runs import Run, apply_bench, load_bench, load_run, resolve_path, warn
from detect.report.viewer import write_viewer

ACCURACY_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
VOC_COLUMNS = {"voc07": "VOC07 mAP", "voc": "VOC mAP"}  # metrics.json key -> column
# Display order of timing stages; stages not listed here follow in the order the runs give them.
STAGE_ORDER = ("backbone", "roi_head", "warp", "features", "svm", "bbox_reg", "postprocess")
DETECTOR_NAMES = {"fast_rcnn": "Fast R-CNN", "rcnn": "R-CNN"}
GRID_SCORE_THRESH = 0.5  # detections drawn in the grid: score >= this ...
GRID_MAX_DETECTIONS = 10  # ... and at most this many per image, best first


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _fmt_ms(ms: float | None) -> str:
    return "n/a" if ms is None else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"


def _fmt_ratio(ratio: float) -> str:
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.1f}x"


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _union(names) -> list[str]:
    """Distinct names in first-seen order."""
    return list(dict.fromkeys(names))


def _unavailable_for(what: str, labels: list[str]) -> list[Text]:
    return [Text(f"{what} not available for: {', '.join(labels)}.")] if labels else []


def _settings_text(settings: dict | None) -> str:
    if not settings:
        return "n/a"
    top_k = settings.get("proposal_top_k", 0)
    return (f"top-{top_k} proposals" if top_k else "all proposals") + (
        "" if settings.get("box_regression", True) else ", no box regression")


def _own_proposal_recall(r: Run) -> str:
    """recall@0.5 of the proposals the run's detector scored (its top-k; 0: all = the largest k)."""
    recall, top_k = r.proposal_recall, (r.test_settings or {}).get("proposal_top_k", 0)
    if not recall or "recall@0.5" not in recall:
        return "n/a"
    top_k = top_k or max(recall["top_k"])
    return _fmt(recall["recall@0.5"][recall["top_k"].index(top_k)]) if top_k in recall["top_k"] else "n/a"


def _runs_section(runs: list[Run]) -> Section:
    rows = [[r.label, DETECTOR_NAMES.get(r.detector, r.detector), r.backbone, r.device,
             _fmt(r.num_images, ""), _settings_text(r.test_settings),
             _own_proposal_recall(r), str(r.run_dir)] for r in runs]
    section = Section([Heading("Runs"), Table(["run", "detector", "backbone", "device", "val images",
                                               "test settings", "proposal recall@0.5", "folder"], rows)])
    # Ablations: runs of one detector that differ only in their number of proposals.
    swept = [r for r in runs if r.test_settings and r.test_settings.get("box_regression", True) and r.test_ms]
    sweeps = {kind: [r for r in swept if r.detector == kind] for kind in _union(r.detector for r in swept)}
    sweeps = {k: v for k, v in sweeps.items() if len({r.test_settings.get("proposal_top_k", 0) for r in v}) >= 2}
    if sweeps:
        section.add_figure("proposals_sweep.png", figures.proposal_sweep(sweeps), "AP50 and detector time per "
                           "image against the number of proposals (test-time ablation, [FRCN] Section 5.5).")
    return section


def _accuracy_section(runs: list[Run]) -> Section:
    rows = [[r.label, DETECTOR_NAMES.get(r.detector, r.detector), r.backbone]
            + [_fmt(r.coco[k]) for k in ACCURACY_COLUMNS] + [_fmt(r.voc_map.get(k)) for k in VOC_COLUMNS]
            for r in runs]
    section = Section([Heading("Accuracy (COCO box AP, VOC mAP)"),
                       Table(["run", "detector", "backbone", *ACCURACY_COLUMNS, *VOC_COLUMNS.values()], rows),
                       Text("AP is averaged over IoU 0.50:0.95; AP50 and AP75 at one IoU; APs/APm/APl "
                            "by object area (small < 32², large > 96² pixels); AR100: recall with "
                            "100 detections per image. VOC07 mAP: PASCAL VOC2007's 11-point AP at "
                            "IoU > 0.5, VOC mAP: VOC2010+'s all-point AP (difficult objects ignored, "
                            "py-faster-rcnn voc_eval.py). n/a: not measured, or no ground truth.")])
    class_names = _union(key for r in runs for key in [*r.per_class_ap, *r.per_class_ap50])
    section.blocks.append(Heading("Per-class AP", 3))
    if not class_names:
        section.blocks.append(Text("Per-class AP: not available (no per_class_AP in metrics.json)."))
        return section
    rows = [[c] + [_fmt(d.get(c)) for r in runs for d in (r.per_class_ap, r.per_class_ap50)] for c in class_names]
    section.blocks.append(Table(["class"] + [f"{r.label} {k}" for r in runs for k in ("AP", "AP50")], rows))
    section.add_figure("per_class_ap.png", figures.per_class_ap_bars(runs, class_names),
                       "Per-class AP (IoU 0.50:0.95), one bar per run.")
    return section


def _ratio_text(r: dict) -> str:
    return f"{_fmt_ratio(r['ratio'])} (95% CI {r['lo']:.2f}-{r['hi']:.2f})"


def _bench_blocks(benched: list[Run], bench: dict) -> list:
    """The bench's table (median [p10, p90]) and its ratio sentences with intervals."""
    def cell(v: dict) -> str:
        return f"{_fmt_ms(v['median'])} [{_fmt_ms(v['p10'])}, {_fmt_ms(v['p90'])}]"

    rows = [["proposals (shared), ms"] + [cell(bench["proposals"]) for _ in benched],
            ["detector only, ms"] + [cell(r.bench["detector"]) for r in benched],
            ["end to end (proposals + detector), ms"] + [cell(r.bench["end_to_end"]) for r in benched]]
    blocks = [Heading("Interleaved bench", 3), Table(["median [p10, p90]", *[r.label for r in benched]], rows)]
    if any("flops_total" in r.bench for r in benched):
        rows.append(["GFLOPs per image (detector)"] + [f"{r.bench['flops_total'] / 1e9:.2f}" if "flops_total" in r.bench
                                                       else "n/a" for r in benched])
    for r in benched:
        ratio = r.bench.get("ratio_to_reference")
        if ratio:
            flop = (f"; FLOP ratio {_fmt_ratio(r.bench['flops_ratio_to_reference'])}"
                    if "flops_ratio_to_reference" in r.bench else "")
            blocks.append(Text(f"{r.label} / {bench['reference']}: {_ratio_text(ratio['detector'])} detector "
                               f"only, {_ratio_text(ratio['end_to_end'])} end to end (ratio of medians; "
                               f"paired bootstrap over images){flop}.", strong=True))
    paper = bench.get("paper_flops")
    if paper:
        blocks.append(Text(
            f"At the papers' settings ({paper['settings']}) R-CNN needs "
            f"{sum(paper['rcnn'].values()) / 1e12:.1f} TFLOPs per image and Fast R-CNN "
            f"{sum(paper['fast_rcnn'].values()) / 1e12:.2f} TFLOPs: {_fmt_ratio(paper['rcnn_over_fast_rcnn'])}. "
            f"That projection is what this bench cannot show: its detectors run at their configured "
            f"settings ({bench.get('flops_num_proposals', '?')} proposals, small crops and images), where "
            "fixed per-image costs weigh more than at 2,000 proposals."))
    env = bench.get("environment", {})
    blocks.append(Text(f"Bench: {bench.get('num_images')} images after {bench.get('warmup')} warm-up, "
                       f"detectors run interleaved image by image on {bench.get('device', 'n/a')}; torch "
                       f"{env.get('torch', '?')} ({env.get('torch_threads', '?')} threads), OpenCV "
                       f"{env.get('opencv', '?')} ({env.get('opencv_threads', '?')} threads), numpy "
                       f"{env.get('numpy', '?')}."))
    return blocks


def _speed_section(runs: list[Run], bench: dict | None = None) -> Section:
    stages = _union([s for s in STAGE_ORDER if any(s in r.timing_ms for r in runs)]
                    + [s for r in runs for s in r.timing_ms if s != "proposals"])
    timed = [r for r in runs if r.test_ms]
    fastest = min((r.test_ms for r in timed), default=None)

    train_stages = _union(k for r in runs for k in (r.train_stage_s or {}))
    rows = [["device"] + [r.device for r in runs],
            ["training time"] + [_fmt_duration(r.train_time_s) for r in runs]]
    rows += [[f"training: {stage}"] + [_fmt_duration((r.train_stage_s or {}).get(stage)) for r in runs]
             for stage in train_stages]
    rows += [["training peak memory, MB"] + [_fmt(r.train_peak_mb, ",.0f") for r in runs],
             ["feature cache on disk"] + ["-" if r.feature_cache_bytes is None
                                          else f"{r.feature_cache_bytes / 2**20:,.1f} MiB" for r in runs],
            ["proposals (selective search), ms/image"]
            + [_fmt_ms(r.timing_ms.get("proposals")) for r in runs]]
    rows += [[f"{stage}, ms/image"] + [_fmt_ms(r.timing_ms[stage]) if stage in r.timing_ms else "-"
                                        for r in runs] for stage in stages]
    rows.append(["**test time excluding proposals, ms/image**"] + [_fmt_ms(r.test_ms) for r in runs])
    if any("proposals" in r.timing_ms for r in runs):
        rows.append(["test time with proposals, ms/image"]
                    + [_fmt_ms(r.test_ms + r.timing_ms["proposals"])
                       if r.test_ms is not None and "proposals" in r.timing_ms else "n/a" for r in runs])
    if len(timed) >= 2:
        rows.append(["relative to the fastest (excluding proposals)"]
                    + [_fmt_ratio(r.test_ms / fastest) if r.test_ms else "n/a" for r in runs])
    rows += [["images/s"] + [_fmt(r.images_per_second, ".2f") for r in runs],
             ["peak memory, MB"] + [_fmt(r.peak_memory_mb, ",.0f") for r in runs],
             ["parameters"] + [_fmt(r.num_parameters, ",") for r in runs]]
    sources = "; ".join(sorted({f"{r.label}: {r.timing_source}" for r in timed})) or "none"
    section = Section([Heading("Speed"), Table(["", *[r.label for r in runs]], rows),
                       Text(f"Times are per test image ({sources}); peak memory is CUDA "
                            "max allocated on a GPU, the process's max RSS on a CPU.")])

    fast = [r for r in runs if r.detector == "fast_rcnn"]
    slow = [r for r in runs if r.detector == "rcnn"]
    benched = [r for r in runs if r.bench is not None]
    if benched:
        section.blocks += _bench_blocks(benched, bench)
    elif len(fast) == 1 and len(slow) == 1 and fast[0].test_ms and slow[0].test_ms:
        section.blocks.append(Text(
            f"R-CNN / Fast R-CNN = {_fmt_ratio(slow[0].test_ms / fast[0].test_ms)} test time per "
            f"image, excluding proposals ({slow[0].label}: {_fmt_ms(slow[0].test_ms)} ms, "
            f"{fast[0].label}: {_fmt_ms(fast[0].test_ms)} ms).", strong=True))
    elif len(timed) >= 2:
        best = next(r for r in timed if r.test_ms == fastest)
        section.blocks.append(Text(f"Fastest run excluding proposals: {best.label} "
                                   f"({_fmt_ms(best.test_ms)} ms/image); the table gives each "
                                   "run's ratio to it."))
    elif not timed:
        section.blocks.append(Text("Test-time speed: not available (no timing_ms_per_image)."))
    devices = sorted({r.device for r in timed})
    if len(devices) > 1:
        section.blocks.append(Text("Note: these runs were timed on different devices ("
                                   + "; ".join(devices) + "), so their ratios compare hardware too."))

    if timed:
        all_stages = ["proposals"] * any("proposals" in r.timing_ms for r in timed) + stages
        section.add_figure("stage_times.png", figures.stage_bars(timed, all_stages),
                           "Time per image by stage, selective search included.")
        section.add_figure("speed_vs_accuracy.png", figures.speed_vs_accuracy(timed), "AP50 against time per "
                           "image: detector only (filled) and end to end with selective search (hollow).")
    return section


def _pr_section(runs: list[Run]) -> Section:
    with_pr = [r for r in runs if r.pr_recall is not None and r.pr_precision]
    section = Section([Heading("Precision-recall at IoU 0.5"),
                       *_unavailable_for("Precision-recall curve", [r.label for r in runs if r not in with_pr])])
    if not with_pr:
        return section
    section.add_figure("pr_overall.png", figures.pr_overall(with_pr), "All classes (mean precision over "
                       "classes with ground truth, 101 recall points, 100 detections per image).")
    class_names = _union(c for r in with_pr for c in r.pr_precision if c != "all")
    if class_names:
        section.add_figure("pr_per_class.png", figures.pr_per_class(with_pr, class_names), "Per class.")
    return section


def _proposal_section(runs: list[Run]) -> Section:
    section = Section([Heading("Proposal recall"), *_unavailable_for(
        "Proposal recall", [r.label for r in runs if r.proposal_recall is None])])
    # Runs that share one proposal store report the same figures: show each distinct set once.
    recalls = [r.proposal_recall for r in runs if r.proposal_recall is not None]
    groups = [([r for r in runs if r.proposal_recall == recall], recall)
              for i, recall in enumerate(recalls) if recall not in recalls[:i]]
    if not groups:
        return section
    labels = [", ".join(r.label for r in members) for members, _ in groups]
    metrics = [k for k in ("recall@0.5", "recall@0.7", "AR", "MABO") if any(k in g for _, g in groups)]
    rows = [[label, f"{top_k:.0f}"] + [_fmt(recall[k][i]) if k in recall else "n/a" for k in metrics]
            for label, (_, recall) in zip(labels, groups) for i, top_k in enumerate(recall["top_k"])]
    section.blocks.append(Table(["runs", "proposals per image", *metrics], rows))
    png = figures.proposal_recall(labels, [members[0].color for members, _ in groups], [g for _, g in groups])
    section.add_figure("proposal_recall.png", png, "Recall of ground-truth boxes by the top-k proposals "
                       "(AR: average recall over IoU 0.5:0.95; MABO: mean best overlap).")
    return section


def _grid_dataset(runs: list[Run], data: dict[str, str] | None) -> tuple[Dataset | None, str]:
    """The grid's dataset, or None and why not. A load failure is an error for ``data``
    (``--data``) and only skips the grid for the first run's "data" (on another machine, say)."""
    explicit = data is not None
    if data is None:
        owner = next((r for r in runs if r.data and r.data.get("path")), None)
        if owner is None:
            return None, "no \"data\" in metrics.json; pass --data"
        data = {**owner.data, **{k: resolve_path(owner.data[k], owner.run_dir)  # from ".", else the run folder
                                 for k in ("path", "images") if owner.data.get(k)}}
    try:
        return load_dataset(data.get("format", "coco"), data["path"], data.get("images", ""),
                            data.get("split", ""), classes=data.get("classes") or None), ""
    except (FileNotFoundError, ValueError, ImageReadError, OSError) as e:
        if explicit:
            raise
        warn(f"detection grid skipped: dataset {data['path']!r} could not be loaded ({e})")
        return None, f"dataset {data['path']} could not be loaded; pass --data"


def _grid_section(runs: list[Run], dataset: Dataset | None, reason: str, num_images: int) -> Section:
    section = Section([Heading("Detections")])
    records = [] if num_images <= 0 or dataset is None else sorted(
        (r for r in dataset.records if len(r.gt_boxes) > 0), key=lambda r: r.image_id)[:num_images]
    if not records:
        why = ("not requested" if num_images <= 0 else f"not available ({reason})" if dataset is None
               else "not available (no image with ground truth)")
        section.blocks.append(Text(f"Detection grid: {why}."))
        return section
    image_ids = {r.image_id for r in records}
    classes = class_of_category(dataset.category_ids)
    detections_per_run = [_grid_detections(run, image_ids, classes) for run in runs]
    section.blocks += _unavailable_for("Detections", [r.label for r, d in zip(runs, detections_per_run) if d is None])
    section.add_figure(
        "detections.png", figures.detection_grid(records, dataset.class_names, runs, detections_per_run),
        f"The first {len(records)} val images (by image id) with ground truth; left the ground truth, "
        f"then each run's detections with score >= {GRID_SCORE_THRESH} (at most "
        f"{GRID_MAX_DETECTIONS} per image, best first).")
    return section


def _grid_detections(run: Run, image_ids: set[int], classes: dict[int, int]
                     ) -> dict[int, list[tuple[float, int, tuple[float, float, float, float]]]] | None:
    """A run's detections on ``image_ids`` with score >= ``GRID_SCORE_THRESH``: image id ->
    [(score, class 1..K, xyxy)], best first; malformed entries and unknown category ids are
    counted in one warning. None when the run has no usable detections.json."""
    if run.detections_path is None:
        return None
    try:
        entries = read_json(run.detections_path)
    except ValueError as e:
        warn(f"{e}; its detections are left out of the grid")
        return None
    if not isinstance(entries, list):
        warn(f"{run.detections_path}: expected a list of COCO results; left out of the grid")
        return None
    by_image: dict[int, list] = {i: [] for i in image_ids}
    malformed = unknown = 0
    for entry in entries:
        try:
            image_id = int(entry["image_id"])
            if image_id not in by_image:
                continue
            x, y, w, h = (float(v) for v in entry["bbox"])
            score, category_id = float(entry["score"]), int(entry["category_id"])
        except (KeyError, TypeError, ValueError):
            malformed += 1
            continue
        if category_id not in classes:
            unknown += 1
        elif score >= GRID_SCORE_THRESH:
            by_image[image_id].append((score, classes[category_id], (x, y, x + w, y + h)))
    if malformed or unknown:
        warn(f"{run.detections_path}: skipped {malformed} malformed entries and {unknown} with a "
              "category id not in the dataset")
    return {i: sorted(dets, key=lambda d: -d[0])[:GRID_MAX_DETECTIONS] for i, dets in by_image.items()}  # stable


def make_report(run_dirs: list[Path], output_dir: Path, *, timestamp: str | None = None,
                data: dict[str, str] | None = None, num_grid_images: int = 4,
                bench: str | Path | None = None, proposals: str = "") -> tuple[Path, Path]:
    """Compare the runs in ``run_dirs``; write ``report.md`` + PNGs and ``report.html``.

    ``data``: {"format", "path", "images", "split"} of the dataset (default: the first run's);
    ``timestamp``: the one varying line (default: now, UTC); ``bench``: a bench.json whose
    medians and intervals replace the runs' timings; ``proposals``: the store the viewer draws
    (default: each run's own). Returns (md_path, html_path).
    """
    if not run_dirs:
        raise ValueError("no run folders given")
    runs = [load_run(d) for d in run_dirs]
    for i, run in enumerate(runs):  # unique display names: a repeated name gets " (2)", ...
        n = sum(r.name == run.name for r in runs[:i]) + 1
        run.color = figures.RUN_COLORS[i % len(figures.RUN_COLORS)]
        run.label = run.name if n == 1 else f"{run.name} ({n})"
    bench_result = load_bench(bench) if bench else None
    if bench_result is not None and not apply_bench(runs, bench_result):
        warn(f"{bench}: none of its detectors matches a run (by checkpoint folder or name); not used")
    with_detections = all(r.detections_path for r in runs)
    dataset, reason = _grid_dataset(runs, data) if num_grid_images > 0 or with_detections else (None, "")
    acc = None
    if dataset is not None and with_detections:
        try:
            acc = box_accuracy(runs, dataset)
        except (KeyError, TypeError, ValueError) as e:
            warn(f"box-accuracy analysis skipped: a detections.json does not match the dataset ({e})")
    if timestamp is None:
        timestamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")

    with matplotlib.style.context("default"):  # the same pixels whatever the user's matplotlibrc
        opening = Section([Heading("Findings")] + [Text(line) for line in findings(acc, bench_result,
                                                                                   *like_for_like(runs))])
        sections = [opening, _runs_section(runs), _accuracy_section(runs),
                    explained_section(runs, acc), _speed_section(runs, bench_result),
                    _pr_section(runs), _proposal_section(runs),
                    _grid_section(runs, dataset, reason, num_grid_images)]
    blocks: list = [Heading("Detector comparison", 1)]
    output_dir = Path(output_dir)
    if acc is not None:  # the runs' detections match the dataset
        write_viewer(runs, dataset, output_dir, proposals=proposals)
        blocks.append(Text("Every image, the runs side by side, each box coloured by its error type: "
                           "viewer.html", href="viewer.html"))
    else:
        blocks.append(Text("Per-image viewer: not available (it needs each run's detections.json and the dataset)."))
    pngs: dict[str, bytes] = {}
    for section in sections:
        blocks += section.blocks
        pngs.update(section.pngs)

    for file_name, png in pngs.items():
        write_bytes_atomic(output_dir / file_name, png)
    md_path, html_path = output_dir / "report.md", output_dir / "report.html"
    write_text_atomic(md_path, render.render_markdown(blocks, timestamp))
    write_text_atomic(html_path, render.render_html(blocks, pngs, timestamp))
    return md_path, html_path
