"""The per-image viewer of `detect compare` (detect/report/viewer.py): its data (each box's error
type, misses, per-image AP50, proposal cover), embedded and file modes, the page-size bound at
5,000 images, and the report's link. The browser half is in tests/test_report_browser.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detect.data.datasets import Dataset, ImageRecord, load_coco
from detect.proposals.store import write_store
from detect.report import viewer
from detect.report.runs import load_run
from detect.report.sections import make_report
from conftest import FAST_TIMING, RCNN_TIMING, write_run, write_tiny_coco


def viewer_json(html_path: Path) -> dict:
    text = html_path.read_text(encoding="utf-8")
    return json.loads(re.search(r'<script id="viewer-data" type="application/json">(.*?)</script>', text, re.S)[1])


# The tiny dataset (tests/test_report.py): image 1 no ground truth, image 2 a cat at xyxy
# [5, 6, 35, 26], image 3 a dog at [20, 10, 60, 40]. Class 1 cat, 2 dog.
FAST_DETS = [{"image_id": 2, "category_id": 3, "bbox": [6, 6, 30, 20], "score": 0.9},    # tp
             {"image_id": 2, "category_id": 3, "bbox": [5, 6, 30, 20], "score": 0.3},    # duplicate
             {"image_id": 3, "category_id": 7, "bbox": [20, 10, 15, 30], "score": 0.8},  # localisation
             {"image_id": 1, "category_id": 3, "bbox": [40, 30, 10, 10], "score": 0.6}]  # background
RCNN_DETS = [{"image_id": 3, "category_id": 3, "bbox": [21, 10, 40, 30], "score": 0.7}]  # classification


@pytest.fixture
def runs(tmp_path):
    data = write_tiny_coco(tmp_path / "data")
    store = write_store(tmp_path / "props", image_ids=[1, 2, 3], meta={"mode": "fast"}, boxes_per_image=[
        np.array([[0, 0, 10, 10]], np.float32),
        np.array([[0, 0, 64, 48], [5, 6, 35, 26]], np.float32),  # the cat's cover is rank 1
        np.array([[0, 0, 10, 10]], np.float32)])                  # nothing covers the dog
    # R-CNN first on the command line: the viewer still puts the reference (Fast R-CNN) first
    slow = write_run(tmp_path / "slow", detector="rcnn", ap=0.4, timing=RCNN_TIMING, data_json=data,
                      detections=RCNN_DETS)
    fast = write_run(tmp_path / "fast", detector="fast_rcnn", ap=0.5, timing=FAST_TIMING, data_json=data,
                      detections=FAST_DETS)
    for run, top_k in ((slow, 1), (fast, 0)):
        metrics = json.loads((run / "metrics.json").read_text())
        metrics.update(proposals=str(store), test_settings={"box_regression": True, "proposal_top_k": top_k})
        (run / "metrics.json").write_text(json.dumps(metrics))
    return [slow, fast], data


def _loaded(run_dirs):
    runs = [load_run(d) for d in run_dirs]
    for r, color in zip(runs, ("#111111", "#222222")):
        r.label, r.color = r.name, color
    return runs


def test_every_box_gets_its_error_type_and_every_image_its_misses_ap50_and_cover(runs, tmp_path):
    run_dirs, data = runs
    path = viewer.write_viewer(_loaded(run_dirs), load_coco(data), tmp_path / "out", progress=False)
    d = viewer_json(path)
    assert [r["label"] for r in d["runs"]] == ["fast", "slow"] and d["classes"] == ["cat", "dog"]
    assert [(r["store"], r["top_k"]) for r in d["runs"]] == [(0, viewer.MAX_PROPOSALS), (0, 1)]
    types = d["types"]
    kinds = [[sorted((types[det[6]], det[7]) for det in im["data"]["det"][r]) for r in range(2)]
             for im in d["images"]]
    assert kinds == [[[("background", -1)], []],
                     [[("duplicate", -1), ("tp", 0)], []],
                     [[("localisation", 0)], [("classification", 0)]]]
    assert [im["miss"] for im in d["images"]] == [[0, 0], [0, 1], [0, 0]]  # the dog is "found" by both errors
    assert [im["ap"] for im in d["images"]] == [[None, None], [1.0, 0.0], [0.0, 0.0]]
    assert [im["cls"] for im in d["images"]] == [[1], [1], [1, 2]]
    assert d["images"][1]["data"]["gt"] == [[5, 6, 35, 26, 1, 0]]
    assert [im["data"]["cover"] for im in d["images"]] == [[[]], [[1]], [[-1]]]
    assert d["images"][1]["data"]["det"][0][0][:6] == [6, 6, 36, 26, 1, 0.9]
    assert all(im["src"].startswith("data:image/jpeg;base64,") for im in d["images"])
    assert not (tmp_path / "out" / viewer.FOLDER).exists()
    html = path.read_text()
    # offline: no URL but the SVG namespace's name (never fetched)
    assert not re.search(r"https?://|<link|@import", html.replace('"http://www.w3.org/2000/svg"', ""))


def test_beyond_the_embedding_cap_images_and_boxes_are_files_beside_the_page(runs, tmp_path):
    run_dirs, data = runs
    dataset = load_coco(data)
    path = viewer.write_viewer(_loaded(run_dirs), dataset, tmp_path / "out", embed_max=2, progress=False)
    d = viewer_json(path)
    assert [im["src"] for im in d["images"]] == [f"viewer/img/{i:06d}.jpg" for i in range(3)]
    assert all("data" not in im for im in d["images"])
    embedded = viewer.viewer_data(_loaded(run_dirs), dataset)[1]
    for i in range(3):
        script = (tmp_path / "out" / "viewer" / "data" / f"{i:06d}.js").read_text()
        assert script.startswith(f"viewerData({i},") and json.loads(script[len(f"viewerData({i},"):-3]) == embedded[i]
        with Image.open(tmp_path / "out" / d["images"][i]["src"]) as im:
            assert im.format == "JPEG" and im.size == (64, 48)  # small images are not enlarged
    viewer.write_viewer(_loaded(run_dirs), dataset, tmp_path / "out", progress=False)  # embedded again
    assert not (tmp_path / "out" / "viewer").exists()  # its stale files are gone


def test_the_page_stays_under_its_bound_with_5000_images(tmp_path, monkeypatch):
    """viewer.html holds only the index beyond the cap: INDEX_MAX_BYTES for 5,000 images with
    COCO-length file names, three boxes each and detections from two runs. (The images are not
    read: every one is the same small JPEG.)"""
    n = 5000
    jpeg = viewer._thumbnail(str(write_tiny_coco(tmp_path / "data").parent / "im1.png"))
    monkeypatch.setattr(viewer, "_thumbnail", lambda path: jpeg)
    rng = np.random.default_rng(0)
    records, dets = [], []
    for i in range(1, n + 1):
        xy = rng.uniform(0, 300, (3, 2))
        boxes = np.concatenate([xy, xy + [40, 60]], axis=1)  # [3, 4] xyxy
        records.append(ImageRecord(i, f"/data/coco/val2014/COCO_val2014_{i:012d}.jpg", 640, 480,
                                   boxes.astype(np.float32), rng.integers(1, 81, 3), np.zeros(3, bool)))
        dets += [{"image_id": i, "category_id": int(c), "bbox": [float(b[0]) + 2, float(b[1]), 40.0, 60.0],
                  "score": 0.8} for b, c in zip(xy, records[-1].gt_classes)]
    dataset = Dataset("big", records, [f"class{k}" for k in range(1, 81)], list(range(1, 81)))
    run_dirs = [write_run(tmp_path / name, detector=kind, ap=0.5, timing=FAST_TIMING, data_json=None,
                           detections=dets) for name, kind in (("fast", "fast_rcnn"), ("slow", "rcnn"))]
    path = viewer.write_viewer(_loaded(run_dirs), dataset, tmp_path / "out", progress=False)
    size = path.stat().st_size
    assert 100 * n < size < viewer.INDEX_MAX_BYTES  # the index, not the boxes
    d = viewer_json(path)
    assert len(d["images"]) == n and d["images"][-1]["file"] == f"COCO_val2014_{n:012d}.jpg"
    assert len(list((tmp_path / "out" / "viewer" / "img").iterdir())) == n


def test_the_report_links_the_viewer_only_when_it_can_draw_it(runs, tmp_path):
    run_dirs, _ = runs
    md, html = make_report(run_dirs, tmp_path / "report", timestamp="T", num_grid_images=0)
    assert (tmp_path / "report" / "viewer.html").is_file()
    assert "(viewer.html)" in md.read_text() and 'href="viewer.html"' in html.read_text()
    (run_dirs[0] / "detections.json").unlink()
    md, html = make_report(run_dirs, tmp_path / "report2", timestamp="T", num_grid_images=0)
    assert not (tmp_path / "report2" / "viewer.html").exists()
    assert "Per-image viewer: not available" in md.read_text() and "href=" not in html.read_text()
