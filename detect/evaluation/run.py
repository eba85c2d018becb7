"""Run a detector over a dataset and score it: ``detect eval --checkpoint`` and ``detect train``.

Both detectors go through the same code here: the same proposals (a store, or selective
search timed as the "proposals" stage), the same ``Detector.detect`` (hence the same
post-processing) and the same COCO and VOC evaluation. A run directory ends up with
``detections.json`` (COCO results), ``metrics.json`` (its keys: the contract in
``detect.report.runs``) and ``coco_eval.log`` (what pycocotools printed).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from detect.common.fileio import read_json, write_json_atomic
from detect.common.runtime import device_name, peak_memory_mb, rank_and_world, reset_peak_memory
from detect.data.datasets import Dataset, ImageRecord
from detect.data.images import ImageReadError, read_image
from detect.evaluation.coco import COCO_KEYS, coco_results, dataset_to_coco, evaluate_coco, format_metrics_table
from detect.evaluation.recall import RECALL_TOP_KS, proposal_recall
from detect.evaluation.voc import detections_from_results, evaluate_voc_metrics, format_voc_table
from detect.models.detector import Detections, Detector, StageTimer

TIMING_WARMUP = 3  # images left out of the medians: the first calls pay for allocation and caches


def run_detector(detector: Detector, records: list[ImageRecord], *, store=None, progress: bool = True,
                 per_image_ms: list[dict[str, float]] | None = None,
                 skipped: list[dict] | None = None) -> dict[int, Detections]:
    """Detect on every record (this rank's share under torchrun), with the module docstring's proposals
    (``store``: a ``ProposalStore``); returns {image_id: Detections}. ``per_image_ms`` receives each
    of this rank's images' {stage: ms}. An unreadable image gets no detections, a warning and an entry
    {"file", "reason"} in ``skipped`` (every rank's, on every rank); no rank raises, so the ranks stay
    in step for the gather."""
    rank, world = rank_and_world()
    mine = records[rank::world]
    results: dict[int, Detections] = {}
    unreadable: list[dict] = []
    for rec in tqdm(mine, desc="detect", unit="img", disable=not progress or rank != 0, dynamic_ncols=True):
        try:
            image = read_image(rec.file_name)
        except ImageReadError as e:
            warnings.warn(f"evaluation: no detections for an unreadable image: {e}")
            unreadable.append({"file": e.path, "reason": e.reason})
            results[rec.image_id] = Detections.empty()
            continue
        proposals = None
        timer = StageTimer(detector.device)  # this image's stages
        if store is not None:
            with timer("proposal_load"):
                proposals = store.get(rec.image_id)
        results[rec.image_id] = detector.detect(image, proposals, timer=timer)
        if per_image_ms is not None:
            per_image_ms.append(dict(timer.totals_ms))
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, (results, unreadable))
        results = {k: v for part, _ in gathered for k, v in part.items()}
        unreadable = [entry for _, part in gathered for entry in part]
    if skipped is not None:
        skipped.extend(sorted(unreadable, key=lambda e: e["file"]))
    return results


def evaluate_detector(detector: Detector, dataset: Dataset, output_dir: str | Path, *, store=None,
                      data_spec: dict | None = None, train_time_s: float | None = None) -> dict:
    """Run ``detector`` over ``dataset``, write detections.json and metrics.json, return metrics."""
    output_dir = Path(output_dir)
    device = detector.device
    reset_peak_memory(device)
    per_image, skipped = [], []  # {stage: ms} per image; unreadable images
    t0 = time.perf_counter()
    detections = run_detector(detector, dataset.records, store=store, per_image_ms=per_image, skipped=skipped)
    elapsed = time.perf_counter() - t0
    if rank_and_world()[0] != 0:
        return {}
    results = coco_results(dataset, detections)
    write_json_atomic(output_dir / "detections.json", results, indent=None)
    m = evaluate_coco(dataset_to_coco(dataset), results, log_path=output_dir / "coco_eval.log")
    timings, recall = timing_lists(per_image), None
    if store is not None:  # also at the detector's own top-k (0: all, the store's largest count)
        own = detector.proposal_top_k or max((store.num_boxes(r.image_id) for r in dataset.records), default=1)
        recall = proposal_recall(dataset, store, top_ks=sorted({*RECALL_TOP_KS, max(own, 1)}))
    metrics = {
        "detector": detector.kind, "name": output_dir.name, "backbone": detector.backbone_name,
        "device": device_name(device), "num_parameters": sum(p.numel() for p in detector.parameters()),
        "num_images": len(dataset), "num_detections": m["num_detections"], "coco": {k: m[k] for k in COCO_KEYS},
        **{k: m[k] for k in ("per_class_AP", "per_class_AP50", "pr_curve_50")},
        **evaluate_voc_metrics(dataset, detections), "ap_per_iou": m["ap_per_iou"],  # "voc07", "voc"
        "test_settings": {"box_regression": detector.box_regression, "proposal_top_k": detector.proposal_top_k},
        "timing_ms_per_image": {s: sum(v) / max(len(dataset), 1)  # over every image, unreadable ones too
                                for s, v in timings["timing_ms_per_image_list"].items()},
        **timings,
        "images_per_second": len(dataset) / max(elapsed, 1e-9),
        "peak_memory_mb": peak_memory_mb(device),
        "train_time_s": train_time_s,
        "proposal_recall": recall,
        "proposals": None if store is None else str(store.path),
        "proposal_settings": detector.proposal_settings if store is None else store.settings,
        "data": data_spec or {},
        "skipped_images": skipped,  # unreadable images, scored as having no detections
    }
    write_json_atomic(output_dir / "metrics.json", metrics)
    return metrics


def timing_lists(per_image: list[dict[str, float]], warmup: int = TIMING_WARMUP) -> dict:
    """metrics.json's per-image timings: every image's ms per stage (0 where it skipped one) and
    per-stage medians over the images after ``warmup`` (all, when there are no more)."""
    stages = list(dict.fromkeys(s for st in per_image for s in st))
    lists = {s: [st.get(s, 0.0) for st in per_image] for s in stages}
    skip = warmup if len(per_image) > warmup else 0
    medians = {s: float(np.median(v[skip:])) for s, v in lists.items()}
    return {"timing_ms_per_image_list": lists, "timing_ms_median": medians, "timing_warmup_images": skip}


def print_metrics(metrics: dict, metric: str = "coco") -> None:
    """Print the COCO table (``metric="coco"``) or the VOC AP table ("voc07", "voc") of a run's
    or a results file's metrics, then the test time and the skipped images, when there are."""
    if metric in ("voc07", "voc"):
        print(format_voc_table(metrics[metric], metric))
    else:  # a run nests the COCO numbers under "coco"; a scored results file has them at the top
        print(format_metrics_table({**metrics, **metrics.get("coco", {})}))
    if "timing_ms_per_image" in metrics:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in metrics["timing_ms_per_image"].items())
        print(f"test time (ms/image): {stages}; {metrics['images_per_second']:.2f} images/s on {metrics['device']}")
    if metrics.get("skipped_images"):
        print(f"skipped {len(metrics['skipped_images'])} unreadable image(s), scored with no detections: "
              + ", ".join(e["file"] for e in metrics["skipped_images"][:5]))


def score_results_file(dataset: Dataset, results_path: Path, output_dir: Path, *, limit: int = 0) -> dict:
    """``detect eval --results``: COCO and VOC metrics of a COCO results file on ``dataset``
    (its first ``limit`` images when > 0) -> ``output_dir``/metrics.json and coco_eval.log."""
    results = read_json(results_path)
    if limit > 0:
        dataset.records = dataset.records[:limit]
        kept = {r.image_id for r in dataset.records}
        if isinstance(results, list):
            results = [r for r in results if not isinstance(r, dict) or r.get("image_id") in kept]
    try:
        metrics = evaluate_coco(dataset_to_coco(dataset), results, log_path=output_dir / "coco_eval.log")
    except ValueError as e:  # name the results file, not the in-memory list
        if not str(e).startswith("results: "):
            raise
        raise ValueError(f"{results_path}: {str(e).removeprefix('results: ')}") from None
    if isinstance(results, list):  # evaluate_coco checked every entry
        metrics.update(evaluate_voc_metrics(dataset, detections_from_results(dataset, results)))
    write_json_atomic(output_dir / "metrics.json", metrics)
    print(f"wrote {output_dir / 'metrics.json'} and {output_dir / 'coco_eval.log'}")
    return metrics
