"""The outputs of ``detect predict`` (formats: ``detect.predict.batch``): the resume journal, the
final files, and output names that never leave ``output_dir`` (``safe_relative_name``)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

from detect.common.fileio import write_bytes_atomic, write_json_atomic
from detect.evaluation.coco import detections_to_coco
from detect.models.detector import Detections

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
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
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
        for index, file in enumerate(files):
            image_id = index + 1
            rec = results.get(file)
            if rec is None:
                if file in errors:
                    error_list.append({"file": file, "reason": errors[file]})
                continue
            images.append({"id": image_id, "file_name": file, "width": rec["width"],
                           "height": rec["height"]})
            found = rec["detections"]
            entries = detections_to_coco(image_id, [d["box"] for d in found], [d["score"] for d in found],
                                         [int(d["label"]) for d in found], category_ids)
            coco += [{**entry, "bbox": [round(v, 3) for v in entry["bbox"]]} for entry in entries]
            dets = [{"box": d["box"], "label": class_names[int(d["label"]) - 1], "score": d["score"]}
                    for d in found]
            lines.append(json.dumps({"image_id": image_id, "file": file, "width": rec["width"],
                                     "height": rec["height"], "detections": dets}))
        error_list += [{"file": file, "reason": "unsupported file type"} for file in unsupported]
        categories = [{"id": c, "name": n} for c, n in zip(category_ids, class_names)]
        write_json_atomic(output_dir / "detections.json", coco, indent=None)
        write_json_atomic(output_dir / "images.json", images, indent=None)
        write_json_atomic(output_dir / "categories.json", categories)
        write_bytes_atomic(output_dir / "detections.jsonl",
                           "".join(line + "\n" for line in lines).encode("utf-8"))
        write_json_atomic(output_dir / "errors.json", error_list)
    return {"images": len(images), "errors": len(error_list), "detections": len(coco)}


def journal_record(file: str, image: np.ndarray, dets: Detections, score_threshold: float) -> dict:
    keep = dets.scores >= score_threshold
    found = zip(dets.boxes[keep].tolist(), dets.labels[keep].tolist(), dets.scores[keep].tolist())
    return {"file": file, "width": int(image.shape[1]), "height": int(image.shape[0]),
            "detections": [{"box": [round(float(v), 3) for v in box], "label": int(label),
                            "score": round(float(score), 6)} for box, label, score in found]}
