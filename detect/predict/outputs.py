"""The outputs of ``detect predict`` (formats: ``detect.predict.batch``): the resume journal, the
final files, output names that never leave ``output_dir`` (``safe_relative_name``), and boxes
drawn with OpenCV on uint8 RGB images [H, W, 3]: detections (``detect predict --visualize``) and
proposal recall (``detect recall --visualize``)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from detect.common.fileio import write_bytes_atomic, write_json_atomic, write_text_atomic
from detect.common.palette import TAB10_RGB
from detect.data.datasets import ImageRecord
from detect.data.images import ImageReadError, read_image
from detect.evaluation.coco import detections_to_coco
from detect.evaluation.recall import best_proposals, counted_gt
from detect.models.detector import Detections
from detect.proposals.selective_search import first_proposals

try:
    import fcntl  # POSIX: serialises the ranks' merges
except ImportError:  # Windows: one process at a time anyway
    fcntl = None


_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")


def safe_relative_name(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """``path`` relative to ``root`` (else its file name) plus ".jpg" (``a/b.png`` ->
    ``a/b.png.jpg``), as a name that cannot leave the folder it is joined to: parts reduced to
    ``[A-Za-z0-9._-]``, hidden ones prefixed with ``_``, long ones cut, and when anything changed
    a short hash of the full path added, so two inputs never share a name."""
    path = os.path.abspath(path)
    root = os.path.abspath(root)
    try:
        rel = os.path.relpath(path, root)
    except ValueError:  # different drives (Windows)
        rel = os.path.basename(path)
    parts = [p for p in Path(rel).parts if p not in ("", os.sep)]
    if not parts or parts[0] == "..":
        parts = [os.path.basename(path) or "image"]
    safe_parts = [_SAFE_CHARS.sub("_", part)[:100] for part in parts]
    safe_parts = [safe if safe and not safe.startswith(".") else "_" + safe for safe in safe_parts]
    name = "/".join(safe_parts)
    if safe_parts != parts:
        digest = hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        name = f"{name}-{digest}"
    return name + ".jpg"


def open_journal(path: Path):
    """Open a journal for appending, first cutting off a torn last line (no final newline)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.read_bytes() if path.exists() else b""
    if data and not data.endswith(b"\n"):
        os.truncate(path, data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


def load_results(partial_dir: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """All journals -> (file -> result record, file -> error reason, unreadable lines skipped, not
    counting a torn last line); a file may have both (a retried failure that now works)."""
    results: dict[str, dict] = {}
    errors: dict[str, str] = {}
    bad = 0
    for path in sorted(partial_dir.glob("done*.jsonl")):
        *lines, _ = path.read_bytes().split(b"\n")
        for line in filter(bytes.strip, lines):
            try:
                rec = json.loads(line)
                if not (isinstance(rec, dict) and isinstance(rec.get("file"), str)
                        and ("error" in rec or isinstance(rec.get("detections"), list))):
                    raise ValueError("not a record")
            except ValueError:
                bad += 1
                continue
            if "error" in rec:
                errors[rec["file"]] = str(rec["error"])
            else:
                results[rec["file"]] = rec
    return results, errors, bad


def write_outputs(output_dir: str | os.PathLike, files: list[str], *, class_names: list[str],
                  category_ids: list[int], unsupported: list[str] = ()) -> dict[str, int]:
    """Rewrite the final files from every journal in ``output_dir/partial``, keeping only
    ``files`` (image id = position + 1), ``unsupported`` files last in errors.json. Returns
    counts {"images", "errors", "detections"}."""
    output_dir = Path(output_dir)
    partial_dir = output_dir / "partial"
    partial_dir.mkdir(parents=True, exist_ok=True)
    with open(partial_dir / "merge.lock", "a") as lock:
        if fcntl is not None:  # ranks merging at once: the last one sees everything
            fcntl.flock(lock, fcntl.LOCK_EX)
        results, errors, bad = load_results(partial_dir)
        if bad:
            print(f"detect predict: warning: skipped {bad} unreadable journal line(s) in "
                  f"{partial_dir}", file=sys.stderr)
        coco, images, lines, error_list = [], [], [], []
        for image_id, file in enumerate(files, start=1):
            rec = results.get(file)
            if rec is None:
                if file in errors:
                    error_list.append({"file": file, "reason": errors[file]})
                continue
            size = {"width": rec["width"], "height": rec["height"]}
            images.append({"id": image_id, "file_name": file, **size})
            found = rec["detections"]
            entries = detections_to_coco(image_id, [d["box"] for d in found], [d["score"] for d in found],
                                         [int(d["label"]) for d in found], category_ids)
            coco += [{**entry, "bbox": [round(v, 3) for v in entry["bbox"]]} for entry in entries]
            dets = [{"box": d["box"], "label": class_names[int(d["label"]) - 1], "score": d["score"]}
                    for d in found]
            lines.append(json.dumps({"image_id": image_id, "file": file, **size, "detections": dets}))
        error_list += [{"file": file, "reason": "unsupported file type"} for file in unsupported]
        categories = [{"id": c, "name": n} for c, n in zip(category_ids, class_names)]
        write_json_atomic(output_dir / "detections.json", coco, indent=None)
        write_json_atomic(output_dir / "images.json", images, indent=None)
        write_json_atomic(output_dir / "categories.json", categories)
        write_text_atomic(output_dir / "detections.jsonl", "".join(line + "\n" for line in lines))
        write_json_atomic(output_dir / "errors.json", error_list)
    return {"images": len(images), "errors": len(error_list), "detections": len(coco)}


def journal_record(file: str, image: np.ndarray, dets: Detections, score_threshold: float) -> dict:
    keep = dets.scores >= score_threshold
    found = zip(dets.boxes[keep].tolist(), dets.labels[keep].tolist(), dets.scores[keep].tolist())
    return {"file": file, "width": int(image.shape[1]), "height": int(image.shape[0]),
            "detections": [{"box": [round(float(v), 3) for v in box], "label": int(label),
                            "score": round(float(score), 6)} for box, label, score in found]}


# Proposal recall: a ground-truth box some proposal reaches, one none reaches, the best proposal.
REACHED_RGB, UNREACHED_RGB, PROPOSAL_RGB = TAB10_RGB[2], TAB10_RGB[3], TAB10_RGB[0]


def draw_boxes(image: np.ndarray, boxes: np.ndarray, colors: list[tuple[int, int, int]],
               texts: list[str] | None = None) -> np.ndarray:
    """Draw ``boxes`` [N, 4] (xyxy) on a copy of ``image``, box i in RGB ``colors[i]`` with
    ``texts[i]`` on a tab of that colour above its top-left corner (below, at the top edge)."""
    canvas = np.ascontiguousarray(image.copy())
    height, width = canvas.shape[:2]
    thickness = max(1, round(min(height, width) / 300))
    font_scale = max(0.35, min(height, width) / 900)
    for i, box in enumerate(np.asarray(boxes).reshape(-1, 4)):
        color = tuple(int(c) for c in colors[i])
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness)
        if not texts or not texts[i]:
            continue
        (tw, th), base = cv2.getTextSize(texts[i], cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        ty = y1 - 2 if y1 - th - base - 2 >= 0 else min(y1 + th + base + 2, height - 1)
        cv2.rectangle(canvas, (x1, ty - th - base), (x1 + tw + 2, ty + base // 2), color, -1)
        luma = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        text_color = (0, 0, 0) if luma > 140 else (255, 255, 255)
        cv2.putText(canvas, texts[i], (x1 + 1, ty - base // 2), cv2.FONT_HERSHEY_SIMPLEX,
                    font_scale, text_color, 1, cv2.LINE_AA)
    return canvas


def draw_proposal_recall(image: np.ndarray, gt_boxes: np.ndarray, proposal_boxes: np.ndarray, *,
                         iou: float = 0.5, min_side: int = 512) -> np.ndarray:
    """``gt_boxes`` [G, 4] (red: reached by no proposal at ``iou``, else green) and each one's
    best of ``proposal_boxes`` [R, 4] in blue, labelled with its IoU, under a caption; an image
    with a shorter side under ``min_side`` is enlarged first. Returns uint8 RGB [H', W', 3]."""
    gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    proposal_boxes = np.asarray(proposal_boxes, np.float64).reshape(-1, 4)
    best, best_iou = best_proposals(proposal_boxes, gt_boxes)  # [G], [G]
    scale = max(1.0, min_side / max(1, min(image.shape[:2])))
    if scale > 1:
        image = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)),
                           interpolation=cv2.INTER_CUBIC)
    reached = best_iou >= iou
    has_best = best >= 0
    boxes = np.concatenate([proposal_boxes[best[has_best]], gt_boxes]) * scale
    colors = [PROPOSAL_RGB] * int(has_best.sum()) + [REACHED_RGB if r else UNREACHED_RGB for r in reached]
    texts = [f"{v:.2f}" for v in best_iou[has_best]] + [""] * len(gt_boxes)
    caption = (f"{int(reached.sum())}/{len(gt_boxes)} boxes reached at IoU {iou:g} by {len(proposal_boxes)} "
               "proposals; red: by none; blue: the best, its IoU")
    canvas = draw_boxes(image, boxes, colors, texts)
    # The caption: one line on a white strip above the drawing, shrunk to fit its width.
    (width_at_1, _), _ = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, 1.0, 1)
    font_scale = min(max(0.4, canvas.shape[1] / 1400), (canvas.shape[1] - 8) / width_at_1)
    (_, th), base = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
    strip = np.full((th + base + 8, canvas.shape[1], 3), 255, np.uint8)
    cv2.putText(strip, caption, (4, th + 4), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([strip, canvas])


def write_jpeg(path: Path, canvas: np.ndarray, quality: int = 90) -> None:
    """Write an RGB canvas as a JPEG, atomically."""
    ok, buf = cv2.imencode(".jpg", canvas[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"could not encode {path}")
    write_bytes_atomic(path, buf.tobytes())


def write_visualisation(vis_dir: Path, name: str, image: np.ndarray, record: dict,
                        class_names: list[str]) -> None:
    """A journal record's boxes, class names and scores drawn on ``image``, as ``vis_dir/name``."""
    path = vis_dir / name
    if os.path.commonpath([os.path.abspath(path), os.path.abspath(vis_dir)]) != os.path.abspath(vis_dir):
        raise ValueError(f"refusing to write {path}: outside {vis_dir}")  # safe_relative_name prevents it
    dets = record["detections"]
    colors = [TAB10_RGB[(int(d["label"]) - 1) % len(TAB10_RGB)] for d in dets]
    texts = [f"{class_names[int(d['label']) - 1]} {d['score']:.2f}" for d in dets]
    write_jpeg(path, draw_boxes(image, np.array([d["box"] for d in dets], np.float64), colors, texts))


def write_recall_drawings(records: list[ImageRecord], get_proposals: Callable[[int], np.ndarray],
                          out_dir: str | Path, num_images: int, *, top_k: int = 0) -> list[Path]:
    """``draw_proposal_recall`` of the first ``num_images`` records with counted ground truth and
    the first ``top_k`` proposals of ``get_proposals(image_id)`` (0: all), as
    ``out_dir/<image id>_<file name>.jpg``; returns the paths (an unreadable image is skipped)."""
    if num_images < 0 or top_k < 0:
        raise ValueError(f"recall drawings: the number of images and top_k must be >= 0, got {num_images}, {top_k}")
    out_dir = Path(out_dir)
    written: list[Path] = []
    for record in records:
        if len(written) >= num_images:
            break
        gt_boxes, _ = counted_gt(record)
        if len(gt_boxes) == 0:
            continue
        try:
            image = read_image(record.file_name)
        except ImageReadError as e:
            warnings.warn(f"recall drawing skipped: {e}")
            continue
        proposals = first_proposals(get_proposals(record.image_id), top_k)
        name = safe_relative_name(record.file_name, Path(record.file_name).parent)
        path = out_dir / f"{record.image_id:06d}_{name}"
        write_jpeg(path, draw_proposal_recall(image, gt_boxes, proposals))
        written.append(path)
    return written
