"""COCO box evaluation: a thin wrapper around pycocotools' ``COCOeval(iouType="bbox")``.

The one place where boxes and classes leave the internal format (xyxy pixels, classes 1..K) for
COCO's (xywh pixels, the dataset's category ids, range-checked), for results
(``detections_to_coco``) and ground truth (``dataset_to_coco``), and come back (``class_of_category``).

Known traps, each pinned by a test in tests/test_evaluation.py: ``COCO.loadRes`` crashes on an
empty results list (we build the empty index: AP 0.0); an annotation id of 0 breaks COCOeval's
matching (pytorch/vision#1530), so ids 0, repeated or missing are renumbered 1..N on a copy;
category ids need not be contiguous; images without ground truth are allowed; pycocotools'
prints go to ``log_path`` (or nowhere). Metrics are in [0, 1], -1.0 where not defined ("n/a").
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from pathlib import Path

import numpy as np

from detect.common.box_ops import xyxy_to_xywh
from detect.common.fileio import read_json, write_text_atomic
from detect.data.datasets import Dataset, gt_flags
from detect.models.detector import Detections

# pycocotools' stats[0:9], in its order.
COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


def category_ids_of(labels: np.ndarray, category_ids: list[int], where: str) -> list[int]:
    """Class indices 1..K [D] -> the dataset's category ids; ValueError naming ``where`` when an
    index is out of range (0 is background)."""
    labels = np.asarray(labels, np.int64).reshape(-1)
    bad = (labels < 1) | (labels > len(category_ids))
    if bad.any():
        raise ValueError(f"{where}: class index {int(labels[bad][0])} is out of range "
                         f"1..{len(category_ids)} (0 is background)")
    return [int(category_ids[k - 1]) for k in labels.tolist()]


def class_of_category(category_ids: list[int]) -> dict[int, int]:
    """The inverse mapping: dataset category id -> class index 1..K."""
    return {int(cat_id): k + 1 for k, cat_id in enumerate(category_ids)}


def detections_to_coco(image_id: int, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                       category_ids: list[int]) -> list[dict]:
    """COCO results entries ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` of
    one image's detections: ``boxes`` [D, 4] xyxy pixels, ``scores`` [D], ``labels`` [D] 1..K."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)  # [D, 4] xyxy
    scores = np.asarray(scores, np.float64).reshape(-1)  # [D]
    labels = np.asarray(labels).reshape(-1)  # [D]
    where = f"image {image_id}"
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"{where}: {len(boxes)} boxes, {len(scores)} scores and {len(labels)} "
                         "labels; they must match")
    cats = category_ids_of(labels, category_ids, where)
    finite = np.isfinite(boxes).all(axis=1) & np.isfinite(scores)
    if not finite.all():
        raise ValueError(f"{where}: detection {int(np.flatnonzero(~finite)[0])} has a non-finite box or score")
    return [{"image_id": int(image_id), "category_id": cat, "bbox": box, "score": score}
            for box, score, cat in zip(xyxy_to_xywh(boxes).tolist(), scores.tolist(), cats)]


def coco_results(dataset: Dataset, detections: dict[int, Detections]) -> list[dict]:
    """COCO results entries of ``detections`` (image id -> ``Detections``); ValueError for an
    image id not in ``dataset``."""
    if len(dataset.category_ids) != dataset.num_classes:
        raise ValueError(f"dataset {dataset.name!r}: {len(dataset.category_ids)} category ids "
                         f"for {dataset.num_classes} class names")
    image_ids = {r.image_id for r in dataset.records}
    results: list[dict] = []
    for image_id in sorted(detections):
        if image_id not in image_ids:
            raise ValueError(f"detections for image id {image_id}, which is not in dataset "
                             f"{dataset.name!r}")
        dets = detections[image_id]
        results += detections_to_coco(image_id, dets.boxes.detach().cpu().double().numpy(),
                                      dets.scores.detach().cpu().double().numpy(),
                                      dets.labels.detach().cpu().numpy(), dataset.category_ids)
    return results


def evaluate_detections(dataset: Dataset, detections: dict[int, Detections]) -> dict:
    """COCO metrics of in-memory ``detections`` (image id -> ``Detections``) on ``dataset``; its
    images missing from ``detections`` count as images with no detections."""
    return evaluate_coco(dataset_to_coco(dataset), coco_results(dataset, detections))


def evaluate_coco(coco_gt: dict | str | Path, results: list[dict] | str | Path, *,
                  log_path: str | Path | None = None) -> dict:
    """Score COCO box ``results`` against ground truth ``coco_gt`` with pycocotools' COCOeval.

    ``coco_gt``: a COCO instances dict or JSON file; ``results``: ``detections_to_coco``'s entries
    or a JSON file of them. Only the images of ``coco_gt`` count. The inputs are not modified (the
    traps above, a missing ``area`` = w * h and ``iscrowd`` = 0 are handled on copies); malformed input
    raises ValueError naming the file and entry. Returns the ``COCO_KEYS``, "per_class_AP",
    "per_class_AP50", "pr_curve_50" and "ap_per_iou" as metrics.json holds them
    (``detect.report.runs``), "num_images" and "num_detections".
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = _clean_ground_truth(*_read(coco_gt, "ground truth"))
    entries = _clean_results(*_read(results, "results"), gt)

    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        if entries:
            coco_dt = coco.loadRes(entries)
        else:  # loadRes indexes results[0]: build the empty index ourselves
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(gt["images"]), "annotations": [],
                               "categories": copy.deepcopy(gt["categories"])}
            coco_dt.createIndex()
        coco_eval = COCOeval(coco, coco_dt, iouType="bbox")
        coco_eval.params.imgIds = sorted(img["id"] for img in gt["images"])
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    if log_path is not None:
        write_text_atomic(log_path, log.getvalue())

    return {**{key: float(v) for key, v in zip(COCO_KEYS, coco_eval.stats[:9])},
            **_precision_metrics(coco_eval, gt["categories"]),
            "num_images": len(gt["images"]), "num_detections": len(entries)}


def _read(source, name: str) -> tuple:
    """(the JSON in file ``source``, its path) or, for an object, (``source``, ``name``)."""
    return (read_json(source), str(source)) if isinstance(source, (str, Path)) else (source, name)


def _precision_metrics(coco_eval, categories: list[dict]) -> dict:
    """Per-class AP and AP50, IoU-0.5 PR curves and AP per IoU from ``coco_eval.eval["precision"]``
    (area "all", 100 detections), keyed by category name (a repeated name gets its id appended)."""
    params = coco_eval.params
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]  # [T iou, R recall, K classes] of [T, R, K, A, M]
    iou50 = int(np.flatnonzero(np.isclose(params.iouThrs, 0.5))[0])
    names = [str(c.get("name", c["id"])) for c in categories]
    name_by_id = {c["id"]: f"{n} (id {c['id']})" if names.count(n) > 1 else n for n, c in zip(names, categories)}
    classes = [name_by_id[cat_id] for cat_id in params.catIds]  # [K]
    curves = {name: precision[iou50, :, k].tolist() for k, name in enumerate(classes)}
    with_gt = [c for c in curves.values() if c[0] > -1]  # a class without ground truth is all -1
    mean_curve = np.mean(with_gt, axis=0) if with_gt else -np.ones(len(params.recThrs))
    return {"per_class_AP": {name: mean_defined(precision[:, :, k]) for k, name in enumerate(classes)},
            "per_class_AP50": {name: mean_defined(precision[iou50, :, k]) for k, name in enumerate(classes)},
            "pr_curve_50": {"recall": [float(r) for r in params.recThrs],
                            "precision": {"all": [float(v) for v in mean_curve], **curves}},
            "ap_per_iou": {"iou": [round(float(t), 2) for t in params.iouThrs],
                           "AP": [mean_defined(p) for p in precision]}}


def mean_defined(values) -> float:
    """The mean of the defined values (> -1, COCO's and VOC's n/a), -1.0 when there is none."""
    values = np.asarray(values, np.float64)
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else -1.0


def _clean_ground_truth(gt, source: str) -> dict:
    """Validated shallow copy of a COCO gt dict (pycocotools adds keys to the annotations)."""
    if not isinstance(gt, dict):
        raise ValueError(f"{source}: expected a COCO instances object, got {type(gt).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise ValueError(f"{source}: no {key!r} list (is this a COCO instances file?)")
    images = [dict(img) for img in gt["images"]]
    image_ids = _unique_ids(images, "images", "image", source)
    categories = [dict(c) for c in gt["categories"]]
    cat_ids = _unique_ids(categories, "categories", "category", source)

    annotations = [dict(a) for a in gt["annotations"]]
    for i, ann in enumerate(annotations):
        ann["bbox"] = _checked_bbox(ann, f"{source}: annotations[{i}]", image_ids, cat_ids)
        ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
        ann.setdefault("iscrowd", 0)
    ids = [a.get("id") for a in annotations]
    if not all(_is_int(x) and x >= 1 for x in ids) or len(set(ids)) != len(ids):
        for i, ann in enumerate(annotations):
            ann["id"] = i + 1
    return {**gt, "images": images, "annotations": annotations, "categories": categories}


def _clean_results(results, source: str, gt: dict) -> list[dict]:
    """Validated copies of results entries (``loadRes`` writes into the entries it gets)."""
    if not isinstance(results, list):
        gt_like = isinstance(results, dict) and "annotations" in results
        raise ValueError(f"{source}: expected a list of results entries, got {type(results).__name__}"
                         + " (this looks like a ground-truth file)" * gt_like)
    image_ids = {img["id"] for img in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    entries = []
    for i, r in enumerate(results):
        where = f"{source}: entry {i}"
        if not isinstance(r, dict):
            raise ValueError(f"{where}: expected an object, got {type(r).__name__}")
        bbox = _checked_bbox(r, where, image_ids, cat_ids)
        score = r.get("score")
        if not _is_number(score) or not math.isfinite(score):
            raise ValueError(f"{where}: 'score' must be a finite number, got {score!r}")
        entries.append({"image_id": r["image_id"], "category_id": r["category_id"], "bbox": bbox,
                        "score": float(score)})
    return entries


def _checked_bbox(entry: dict, where: str, image_ids: set, cat_ids: set) -> list[float]:
    """The ``bbox`` of an annotation or results entry as 4 floats, once the entry is checked:
    an image and a category of the ground truth, 4 finite numbers, no negative size."""
    for key, ids, noun in (("image_id", image_ids, "an image"), ("category_id", cat_ids, "a category")):
        if entry.get(key) not in ids:
            raise ValueError(f"{where}: {key} {entry.get(key)!r} is not {noun} of the ground truth")
    bbox = entry.get("bbox")
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(_is_number(v) and math.isfinite(v) for v in bbox)):
        raise ValueError(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    if bbox[2] < 0 or bbox[3] < 0:
        raise ValueError(f"{where}: 'bbox' {list(bbox)} has a negative width or height")
    return [float(v) for v in bbox]


def _unique_ids(entries: list[dict], key: str, noun: str, source: str) -> set[int]:
    """The integer ``id``s of ``entries`` (gt[key]); ValueError for a missing or repeated one."""
    ids: set[int] = set()
    for i, entry in enumerate(entries):
        if not _is_int(entry.get("id")):
            raise ValueError(f"{source}: {key}[{i}] has no integer 'id'")
        if entry["id"] in ids:
            raise ValueError(f"{source}: {key}[{i}]: {noun} id {entry['id']} is repeated")
        ids.add(entry["id"])
    return ids


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def format_metrics_table(metrics: dict) -> str:
    """Fixed-width table of the 9 summary numbers, then per-class AP and AP50, in percent."""

    def pct(v) -> str:
        return "n/a" if v is None or v < 0 else f"{100.0 * v:.1f}"

    lines = [f"COCO box metrics (%): {metrics.get('num_images', '?')} images, "
             f"{metrics.get('num_detections', '?')} detections",
             "".join(f"{k:>7}" for k in COCO_KEYS),
             "".join(f"{pct(metrics.get(k)):>7}" for k in COCO_KEYS)]
    per_class_ap = metrics.get("per_class_AP", {})
    per_class_ap50 = metrics.get("per_class_AP50", {})
    if per_class_ap:
        width = max(len("class"), *(len(name) for name in per_class_ap))
        lines += ["", f"{'class':<{width}}{'AP':>7}{'AP50':>7}"]
        lines += [f"{name:<{width}}{pct(ap):>7}{pct(per_class_ap50.get(name)):>7}"
                  for name, ap in per_class_ap.items()]
    return "\n".join(lines)


def dataset_to_coco(dataset: Dataset) -> dict:
    """A COCO ground-truth dict for ``dataset``; annotation ids from 1, ``area`` from
    ``detect.data.datasets.ImageRecord.gt_areas``. Difficult and crowd boxes become ``iscrowd=1``,
    which COCOeval ignores as VOC ignores difficult ones (but a crowd box matches by intersection
    over the detection's area, so the detections inside it are ignored too)."""
    images, annotations = [], []
    for record in dataset.records:
        images.append({"id": int(record.image_id), "file_name": record.file_name,
                       "width": int(record.width), "height": int(record.height)})
        areas = record.gt_areas.tolist() if len(record.gt_areas) == len(record.gt_boxes) else []
        boxes = xyxy_to_xywh(np.asarray(record.gt_boxes, np.float64)).tolist()
        cats = category_ids_of(record.gt_classes, dataset.category_ids, f"image id {record.image_id}")
        difficult_flags = gt_flags(record.gt_difficult, len(boxes)).tolist()
        for j, (bbox, category_id, difficult) in enumerate(zip(boxes, cats, difficult_flags)):
            area = areas[j] if areas and areas[j] > 0 else bbox[2] * bbox[3]  # NaN > 0 is False: the box area
            annotations.append({"id": len(annotations) + 1, "image_id": int(record.image_id),
                                "category_id": category_id, "bbox": bbox, "area": area, "iscrowd": int(difficult)})
    return {"info": {"description": dataset.name}, "images": images, "annotations": annotations,
            "categories": [{"id": int(cat_id), "name": name}
                           for cat_id, name in zip(dataset.category_ids, dataset.class_names)]}

