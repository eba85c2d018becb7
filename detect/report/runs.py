"""The run folders ``detect compare`` reads: ``load_run`` checks them into ``Run`` objects.

Run-folder contract (written by ``detect train`` / ``detect eval``)
-------------------------------------------------------------------
``metrics.json`` (required): ``coco`` must be present (or, from ``detect eval --results``, its
numbers at the top level); any other key may be missing or null, and the report then says "not
available" there::

    {"detector": "fast_rcnn" | "rcnn", "name": str, "backbone": str,
     "device": "cpu" | "cuda: NVIDIA H100 ...", "num_parameters": int, "num_images": int,
     "coco": {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"},  # in [0, 1]; -1 = n/a
     "per_class_AP": {class name: float}, "per_class_AP50": {class name: float},    # -1 = no gt
     "voc07": {"mAP": float, "per_class_AP": {class name: float}},  # VOC2007 11-point AP; -1 = n/a
     "voc": {"mAP": float, "per_class_AP": {class name: float}},    # VOC2010+ all-point AP
     "ap_per_iou": {"iou": [0.5, ..., 0.95], "AP": [10 floats]},
     "test_settings": {"box_regression": bool, "proposal_top_k": int},  # 0 = all proposals
     "pr_curve_50": {"recall": [101 floats],
                     "precision": {"all": [101 floats], class name: [101 floats]}},  # -1 = n/a
     "timing_ms_per_image": {stage: ms},   # mean over all images
     "timing_ms_median": {stage: ms},      # median after the first images (warm-up); preferred
     "timing_ms_per_image_list": {stage: [ms per image]},
         # stages: [proposals,] backbone, roi_head, postprocess (fast_rcnn) or [proposals,] warp,
         # features, svm, bbox_reg, postprocess (rcnn); "proposals" only where it was measured
     "images_per_second": float,
     "peak_memory_mb": float,          # CUDA max allocated on a GPU, max RSS of the process on CPU
     "train_time_s": float | null,
     "proposal_recall": {"top_k": [100, 300, 1000, 2000], "recall@0.5": [...], "recall@0.7": [...],
                         "AR": [...], "MABO": [...]} | null,       # one value per top_k
     "proposals": str | null,          # the proposal store evaluated with (the viewer draws it)
     "proposal_settings": {setting: value} | null,  # the store's, or selective search's
     "data": {"format": "coco" | "voc", "path": str, "images": str, "split": str,
              "classes": [class names]}}   # classes: VOC only, the evaluated class order

Optional beside it: ``config.yaml`` (the resolved config, read as plain YAML for
``detect.report.findings.like_for_like``); ``detections.json`` (COCO results); for the training
cost, rcnn_stages.json {"seconds": {stage: s}}, features/done {"bytes": {"total"}} (R-CNN's
feature cache) and the peak "max_mem_mb" of log.jsonl / finetune/log.jsonl.

Test time "excluding proposals" is the sum of all stages but ``proposals``: the detectors' own
cost, as [FRCN] Table 4 compares them (selective search is the same for both).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from detect.common.fileio import read_json
from detect.evaluation.coco import COCO_KEYS


def warn(message: str) -> None:
    print(f"detect compare: warning: {message}", file=sys.stderr)


def resolve_path(path: str, run_dir: Path) -> str:
    """A path a run folder names: as given when it exists from the current folder (or is
    absolute), else from ``run_dir`` when it exists there."""
    from_run_dir = not Path(path).is_absolute() and not Path(path).exists() and (run_dir / path).exists()
    return str(run_dir / path) if from_run_dir else path


@dataclass(eq=False)
class Run:
    """One run folder's ``metrics.json``, checked; missing pieces are None or empty."""

    run_dir: Path
    name: str
    detector: str
    backbone: str
    device: str
    coco: dict[str, float | None]  # COCO_KEYS -> value in [0, 1]; None = n/a
    per_class_ap: dict[str, float | None]
    per_class_ap50: dict[str, float | None]
    voc_map: dict[str, float | None]  # "voc07" / "voc" -> mAP (None = n/a or not in metrics.json)
    pr_recall: list[float] | None  # [101] recall points of the IoU 0.5 curve
    pr_precision: dict[str, list[float]]  # "all" or class name -> [101] precision, NaN = n/a
    timing_ms: dict[str, float]  # stage -> ms per image
    images_per_second: float | None
    peak_memory_mb: float | None
    train_time_s: float | None
    num_parameters: int | None
    num_images: int | None
    proposal_recall: dict[str, list[float]] | None  # "top_k", "recall@0.5", ... -> [T]
    data: dict | None  # str values, but "classes": list[str]
    detections_path: Path | None  # detections.json, when the folder has one
    timing_source: str = "mean over all images"  # what timing_ms holds
    ap_per_iou: dict[str, list[float]] | None = None  # {"iou": [T], "AP": [T]}
    test_settings: dict | None = None  # {"box_regression": bool, "proposal_top_k": int} (ablations)
    bench: dict | None = None  # this run's detector entry of a bench.json (``apply_bench``)
    train_stage_s: dict[str, float] | None = None  # R-CNN's seconds per training stage
    train_peak_mb: float | None = None  # peak memory while training (log.jsonl max_mem_mb)
    feature_cache_bytes: int | None = None  # R-CNN's feature cache on disk
    proposals: str | None = None  # the proposal store it was evaluated with, as metrics.json names it
    proposal_settings: dict | None = None  # the settings of those proposals (metrics.json)
    config: dict | None = None  # config.yaml beside metrics.json, as plain YAML
    label: str = ""  # unique display name (set by make_report)
    color: str = ""  # this run's colour in every figure (set by make_report)

    @property
    def test_ms(self) -> float | None:
        """Test time per image excluding proposals: the sum of the other stages (ms)."""
        stages = [ms for stage, ms in self.timing_ms.items() if stage != "proposals"]
        return sum(stages) if stages else None


def _number(value, where: str, path: Path, *, minus_one_is_na: bool = False) -> float | None:
    """A float from JSON; None for null/NaN (and -1, COCO's n/a, where flagged)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{path}: key '{where}' should be a number, got {value!r}")
    value = float(value)
    return None if math.isnan(value) or (minus_one_is_na and value < 0) else value


def _mapping(m: dict, key: str, path: Path) -> dict | None:
    value = m.get(key)
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{path}: key '{key}' should be an object, got {type(value).__name__}")
    return value


def _curve(values, where: str, path: Path, length: int | None) -> list[float]:
    if not isinstance(values, list):
        raise ValueError(f"{path}: key '{where}' should be a list of numbers")
    curve = [_number(v, where, path, minus_one_is_na=True) for v in values]
    if length is not None and len(curve) != length:
        raise ValueError(f"{path}: key '{where}' has {len(curve)} values, expected {length}")
    return [math.nan if v is None else v for v in curve]


def load_run(run_dir: str | Path) -> Run:
    """Read and check ``run_dir/metrics.json`` (format: module docstring)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run folder not found")
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.json in this folder (expected the output "
                                "folder of `detect train` or `detect eval`)")
    m = read_json(path)
    if not isinstance(m, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(m).__name__}")
    detector = m.get("detector") or "n/a"
    if not isinstance(detector, str):
        raise ValueError(f"{path}: key 'detector' should be 'fast_rcnn' or 'rcnn', got {detector!r}")
    coco = _mapping(m, "coco", path)
    coco = m if coco is None and "AP" in m else coco  # `detect eval --results`: COCO numbers at the top
    if coco is None:
        raise ValueError(f"{path}: key 'coco' is missing (the COCO summary numbers)")

    def per_class(key: str) -> dict[str, float | None]:
        values = _mapping(m, key, path) or {}
        return {str(k): _number(v, f"{key}.{k}", path, minus_one_is_na=True) for k, v in values.items()}

    voc_map = {key: _number((_mapping(m, key, path) or {}).get("mAP"), f"{key}.mAP", path, minus_one_is_na=True)
               for key in ("voc07", "voc")}

    pr_recall, pr_precision = None, {}
    pr = _mapping(m, "pr_curve_50", path)
    if pr is not None and pr.get("recall") is not None:
        pr_recall = _curve(pr["recall"], "pr_curve_50.recall", path, None)
        precision = pr.get("precision") or {}
        if not isinstance(precision, dict):
            raise ValueError(f"{path}: key 'pr_curve_50.precision' should be an object")
        pr_precision = {str(k): _curve(v, f"pr_curve_50.precision.{k}", path, len(pr_recall))
                        for k, v in precision.items()}

    recall = _mapping(m, "proposal_recall", path)
    if recall is not None:
        top_k = recall.get("top_k")
        if not isinstance(top_k, list) or not top_k:
            raise ValueError(f"{path}: key 'proposal_recall.top_k' should be a non-empty list")
        recall = {k: _curve(v, f"proposal_recall.{k}", path, len(top_k))
                  for k, v in recall.items() if v is not None}

    timing_key, timing_source = "timing_ms_per_image", "mean over all images"
    if _mapping(m, "timing_ms_median", path):
        warmup = int(_number(m.get("timing_warmup_images"), "timing_warmup_images", path) or 0)
        timing_key, timing_source = "timing_ms_median", f"median per image after {warmup} warm-up image(s)"
    timing = _mapping(m, timing_key, path) or {}
    timing_ms = {str(k): _number(v, f"{timing_key}.{k}", path) for k, v in timing.items()}
    counts = {k: _number(m.get(k), k, path) for k in ("num_parameters", "num_images")}
    data = _mapping(m, "data", path)
    detections = run_dir / "detections.json"
    return Run(
        run_dir=run_dir,
        name=str(m.get("name") or run_dir.name),
        detector=detector,
        backbone=str(m.get("backbone") or "n/a"),
        device=str(m.get("device") or "n/a"),
        coco={k: _number(coco.get(k), f"coco.{k}", path, minus_one_is_na=True) for k in COCO_KEYS},
        per_class_ap=per_class("per_class_AP"),
        per_class_ap50=per_class("per_class_AP50"),
        voc_map=voc_map,
        pr_recall=pr_recall,
        pr_precision=pr_precision,
        timing_ms={k: v for k, v in timing_ms.items() if v is not None},
        **{k: _number(m.get(k), k, path) for k in ("images_per_second", "peak_memory_mb", "train_time_s")},
        **{k: None if v is None else int(v) for k, v in counts.items()},
        proposal_recall=recall,
        data={str(k): [str(c) for c in v] if k == "classes" and isinstance(v, list) else str(v)
              for k, v in data.items() if v is not None} if data else None,
        detections_path=detections if detections.is_file() else None,
        timing_source=timing_source,
        ap_per_iou=_ap_per_iou(m, path),
        test_settings=_mapping(m, "test_settings", path),
        proposals=str(m["proposals"]) if m.get("proposals") else None,
        proposal_settings=_mapping(m, "proposal_settings", path),
        config=_config(run_dir / "config.yaml"),
        **_training_cost(run_dir),
    )


def _config(path: Path) -> dict | None:
    if not path.is_file():
        return None
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected the resolved config (a YAML mapping), got {type(cfg).__name__}")
    return cfg


def _training_cost(run_dir: Path) -> dict:
    """Training time per stage, peak memory and feature-cache bytes from the files a training run
    leaves beside metrics.json; what is missing or unreadable stays None (the report says n/a)."""
    out: dict = {}
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        stages = read_json(run_dir / "rcnn_stages.json")["seconds"]
        out["train_stage_s"] = {str(k): float(v) for k, v in stages.items()}
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        out["feature_cache_bytes"] = int(read_json(run_dir / "features" / "done")["bytes"]["total"])
    peaks = []
    for log in (run_dir / "log.jsonl", run_dir / "finetune" / "log.jsonl"):
        with contextlib.suppress(OSError):  # no log
            for line in log.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):  # a line without max_mem_mb
                    peaks.append(float(json.loads(line)["max_mem_mb"]))
    if peaks:
        out["train_peak_mb"] = max(peaks)
    return out


def _ap_per_iou(m: dict, path: Path) -> dict[str, list[float]] | None:
    curve = _mapping(m, "ap_per_iou", path)
    if curve is None or curve.get("iou") is None:
        return None
    iou = _curve(curve["iou"], "ap_per_iou.iou", path, None)
    return {"iou": iou, "AP": _curve(curve.get("AP"), "ap_per_iou.AP", path, len(iou))}


def load_bench(path: str | Path) -> dict:
    """A ``detect bench`` result (bench.json), checked for the keys the report reads."""
    path = Path(path)
    b = read_json(path)
    if not isinstance(b, dict) or not isinstance(b.get("detectors"), list) or "proposals" not in b:
        raise ValueError(f"{path}: not a bench.json from `detect bench` (needs 'detectors' and 'proposals')")
    for i, d in enumerate(b["detectors"]):
        for key in ("name", "stages", "detector", "end_to_end"):
            if key not in d:
                raise ValueError(f"{path}: key 'detectors[{i}].{key}' is missing")
    return b


def apply_bench(runs: list[Run], bench: dict) -> list[Run]:
    """Give each run its bench entry, matched by checkpoint folder, else by name; its stage times
    become the bench's medians (plus the shared proposals). Returns the runs that matched."""
    checkpoints = bench.get("checkpoints") or [""] * len(bench["detectors"])
    matched = []
    for run in runs:
        for ckpt, entry in zip(checkpoints, bench["detectors"]):
            same_dir = bool(ckpt) and Path(ckpt).resolve().parent == run.run_dir.resolve()
            if same_dir or entry["name"] == run.name:
                run.bench = entry
                run.timing_ms = {s: v["median"] for s, v in entry["stages"].items()}
                run.timing_ms["proposals"] = bench["proposals"]["median"]
                run.timing_source = (f"bench median per image, {bench.get('num_images')} images after "
                                     f"{bench.get('warmup')} warm-up, detectors interleaved")
                matched.append(run)
                break
    return matched
