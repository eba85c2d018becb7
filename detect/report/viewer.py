"""The per-image viewer of ``detect compare``: ``viewer.html`` beside ``report.html``.

Every image of the dataset, the runs side by side (the reference first), the ground truth on
each and every detection coloured by its type in the error breakdown
(``detect.evaluation.matching.classify_detections``); a gt box is drawn as missed when no detection
above the score threshold is its true positive or its classification or localisation error.
Controls: the score threshold, a class filter, the sort (per-image AP50 difference to the
reference, ``detect.evaluation.matching.per_image_ap50``, images without gt last; misses; file
name) and each run's proposals (its top-k, at most ``MAX_PROPOSALS``; gt none covers at IoU
``COVER_IOU`` highlighted). The state is kept in the URL's fragment (``viewer.html#sort=d1&t=0.3``).

Offline: ``viewer_template.html`` (CSS and vanilla JavaScript) with the data inlined, the images
as JPEGs. Beyond ``EMBED_MAX_IMAGES`` images viewer.html holds an index (about 105 bytes plus the
file name per image) and each image's JPEG and boxes are files in ``FOLDER``, loaded with their page.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from detect.common.fileio import write_text_atomic
from detect.common.palette import TAB10_HEX
from detect.data.datasets import Dataset
from detect.data.images import ImageReadError, read_image
from detect.evaluation.matching import classify_detections, per_image_ap50
from detect.evaluation.recall import first_covering
from detect.proposals.store import ProposalStore
from detect.report.findings import image_boxes, reference_first
from detect.report.runs import Run, resolve_path, warn

VIEW_SIZE = 512  # longer side of the viewer's images, pixels (smaller images are kept as they are)
JPEG_QUALITY = 85
EMBED_MAX_IMAGES = 50  # up to this many images, viewer.html embeds them all (about 4 MB at most)
PAGE_SIZE = 20  # images per page
MAX_PROPOSALS = 2000  # proposals drawn per image at most (the first, in selective search's order)
INDEX_MAX_BYTES = 1_000_000  # viewer.html's size bound at 5,000 images (files in viewer/)
COVER_IOU = 0.5  # a ground-truth box is covered when a proposal reaches this IoU
TYPES = ("tp", "localisation", "classification", "both", "duplicate", "background", "ignored")
COLORS = {"tp": TAB10_HEX[2], "localisation": TAB10_HEX[1], "classification": TAB10_HEX[4],
          "both": TAB10_HEX[5], "duplicate": TAB10_HEX[8], "background": TAB10_HEX[3],
          "ignored": TAB10_HEX[7], "gt": "#ffffff", "missed": TAB10_HEX[9], "proposal": TAB10_HEX[6],
          "uncovered": TAB10_HEX[0]}
TEMPLATE = Path(__file__).with_name("viewer_template.html")
FOLDER = "viewer"  # beside viewer.html: img/NNNNNN.jpg and data/NNNNNN.js when not embedded


def _stores(runs: list[Run], dataset: Dataset, override: str) -> tuple[list[ProposalStore], list[int]]:
    """The runs' distinct proposal stores (``override``, else each run's "proposals", resolved by
    ``resolve_path``) and each run's index into them (-1: none, or not matching the dataset)."""
    opened: dict[str, ProposalStore] = {}  # real path -> store, in first-use order
    index = []
    for run in runs:
        name = override or run.proposals
        path = resolve_path(name, run.run_dir) if name else ""
        key = os.path.realpath(path) if name else ""
        if name and key not in opened:
            try:
                store = ProposalStore(path)
                store.check_dataset(dataset)
                opened[key] = store
            except (OSError, ValueError) as e:
                warn(f"viewer: no proposals for {run.label} ({e})")
        index.append(list(opened).index(key) if key in opened else -1)
    return list(opened.values()), index


def _thumbnail(path: str) -> bytes | None:
    """The image at ``path`` as a JPEG of at most VIEW_SIZE px a side; None when it cannot be read."""
    try:
        image = Image.fromarray(read_image(path))
    except ImageReadError:
        return None
    image.thumbnail((VIEW_SIZE, VIEW_SIZE), Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _ints(boxes: np.ndarray) -> list[list[int]]:
    return np.round(np.asarray(boxes, np.float64).reshape(-1, 4)).astype(int).tolist()


def _script_json(value) -> str:
    """JSON that is safe inside a <script> element."""
    return json.dumps(value, separators=(",", ":")).replace("</", "<\\/").replace("<!--", "<\\!--")


def viewer_data(runs: list[Run], dataset: Dataset, *, proposals: str = "") -> tuple[dict, list[dict]]:
    """The viewer's index ({"runs", "classes", "types", "colors", ..., "images": one entry per
    image, in dataset order}) and each image's boxes (rounded xyxy pixels): {"gt": [[x1, y1, x2,
    y2, class, ignored]], "det": per run [[x1, y1, x2, y2, class, score, type index, gt index or
    -1]], "prop": per store [[x1, y1, x2, y2]], "cover": per store [first covering rank or -1]}."""
    ordered = reference_first(runs)
    num_classes = len(dataset.class_names)
    n = len(dataset.records)
    dets_by_image, ap50, misses = [], [], []
    for run in ordered:
        images = image_boxes(run, dataset)  # the same ground truth for every run
        dets, _, missed = classify_detections(images, num_classes)
        by_image: list[list[list]] = [[] for _ in range(n)]
        for e in dets:
            box = images[e["image"]].boxes[e["index"]]
            target = -1 if e["target"] is None else e["target"][1]
            by_image[e["image"]].append(_ints(box)[0] + [e["label"], round(e["score"], 3),
                                                           TYPES.index(e["type"]), target])
        dets_by_image.append(by_image)
        ap50.append(per_image_ap50(dets, images, num_classes))
        misses.append(np.bincount([i for i, _ in missed], minlength=n).tolist())
    stores, store_of_run = _stores(ordered, dataset, proposals)
    top_ks = [min(k, MAX_PROPOSALS) if k > 0 else MAX_PROPOSALS
              for k in (int((r.test_settings or {}).get("proposal_top_k", 0)) for r in ordered)]
    store_k = [max(k for k, s in zip(top_ks, store_of_run) if s == j) for j in range(len(stores))]

    files = [r.file_name for r in dataset.records]
    root = os.path.commonpath(files) if files else ""
    if len(files) == 1 or os.path.isfile(root):
        root = os.path.dirname(root)
    index, boxes = [], []
    for i, (rec, gt) in enumerate(zip(dataset.records, images)):
        props = [store.get(rec.image_id)[:k] for store, k in zip(stores, store_k)]
        boxes.append({"gt": [b + [int(c), int(g)] for b, c, g in zip(_ints(gt.gt_boxes), gt.gt_classes, gt.gt_ignore)],
                      "det": [d[i] for d in dets_by_image],
                      "prop": [_ints(p) for p in props],
                      "cover": [first_covering(p, gt.gt_boxes, COVER_IOU).tolist() for p in props]})
        present = set(gt.gt_classes.tolist()) | {d[4] for run_dets in dets_by_image for d in run_dets[i]}
        index.append({"file": os.path.relpath(rec.file_name, root) if root else rec.file_name,
                      "w": int(rec.width), "h": int(rec.height),
                      "ap": [None if a[i] is None else round(a[i], 4) for a in ap50],
                      "miss": [m[i] for m in misses], "cls": sorted(int(c) for c in present)})
    return {"runs": [{"label": r.label, "kind": r.detector, "color": r.color, "store": s, "top_k": k}
                     for r, s, k in zip(ordered, store_of_run, top_ks)],
            "classes": list(dataset.class_names), "types": list(TYPES), "colors": COLORS,
            "page_size": PAGE_SIZE, "view_size": VIEW_SIZE, "cover_iou": COVER_IOU, "folder": FOLDER,
            "images": index}, boxes


def write_viewer(runs: list[Run], dataset: Dataset, output_dir: str | Path, *, proposals: str = "",
                 embed_max: int = EMBED_MAX_IMAGES, progress: bool = True) -> Path:
    """Write ``output_dir/viewer.html`` (and ``viewer/`` beyond ``embed_max`` images); returns its
    path. ``proposals``: a store for every run instead of their own."""
    output_dir = Path(output_dir)
    data, boxes = viewer_data(runs, dataset, proposals=proposals)
    embed = len(dataset.records) <= embed_max
    # The files go to a fresh folder, renamed into place at the end; then viewer.html (atomic).
    partial, folder = output_dir / f"{FOLDER}.partial", output_dir / FOLDER
    shutil.rmtree(partial, ignore_errors=True)
    if not embed:
        (partial / "img").mkdir(parents=True)
        (partial / "data").mkdir()
    unreadable = 0
    records = tqdm(dataset.records, desc="viewer", unit="img", disable=None if progress else True)
    for i, (rec, entry) in enumerate(zip(records, data["images"])):
        jpeg = _thumbnail(rec.file_name)
        unreadable += jpeg is None
        if embed:
            entry["src"] = None if jpeg is None else "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
            entry["data"] = boxes[i]
            continue
        entry["src"] = None if jpeg is None else f"{FOLDER}/img/{i:06d}.jpg"
        if jpeg is not None:
            (partial / "img" / f"{i:06d}.jpg").write_bytes(jpeg)
        (partial / "data" / f"{i:06d}.js").write_text(f"viewerData({i},{_script_json(boxes[i])});\n",
                                                      encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)  # the viewer's own files of an earlier report
    if not embed:
        partial.rename(folder)
    if unreadable:
        warn(f"viewer: {unreadable} unreadable image(s) shown as grey frames")
    path = output_dir / "viewer.html"
    write_text_atomic(path, TEMPLATE.read_text(encoding="utf-8").replace("__VIEWER_DATA__", _script_json(data)))
    return path
