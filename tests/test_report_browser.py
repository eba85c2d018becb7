"""report.html and viewer.html in a real headless browser (tests/check_report_html.py): every
image decodes, the console stays clean, the viewer's controls change what it draws. Skipped
where no Chromium is installed (apt-get install chromium)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detect.data.datasets import load_coco
from detect.proposals.store import write_store
from detect.report import viewer
from detect.report.runs import load_run
from detect.report.sections import make_report
import check_report_html as check_tool
from conftest import FAST_TIMING, RCNN_TIMING, write_run, write_tiny_coco

CHROMIUM = check_tool.find_chromium()
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed"), pytest.mark.slow]


def _png_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 10, 10)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_the_checker_catches_a_broken_image_and_a_console_error(tmp_path):
    page = tmp_path / "p.html"
    page.write_text(f'<html><body><img alt="good" src="data:image/png;base64,{_png_b64()}">'
                    '<img alt="broken" src="data:image/png;base64,AAAA"></body></html>')
    num, problems = check_tool.check_report(page, CHROMIUM)
    assert num == 2 and len(problems) == 1 and '"broken"' in problems[0]
    page.write_text("<html><body><script>throw new Error('boom')</script></body></html>")
    num, problems = check_tool.check_report(page, CHROMIUM)
    assert num == 0 and any("boom" in p for p in problems)


def test_a_report_loads_cleanly_in_the_browser(tmp_path):
    data = write_tiny_coco(tmp_path / "data")
    dets = [{"image_id": 2, "category_id": 3, "bbox": [6, 6, 30, 20], "score": 0.9}]
    runs = [write_run(tmp_path / "fast", detector="fast_rcnn", ap=0.5, timing=FAST_TIMING, data_json=data,
                       detections=dets),
            write_run(tmp_path / "slow", detector="rcnn", ap=0.4, timing=RCNN_TIMING, data_json=data,
                       detections=dets)]
    _, html = make_report(runs, tmp_path / "report", timestamp="T")
    num, problems = check_tool.check_report(html, CHROMIUM)
    assert problems == [] and num == html.read_text().count("<img")
    assert num >= 8


def _one_image_one_class(root: Path) -> tuple[list[Path], Path]:
    """A dataset of one 64x48 image with one "cell" at [10, 10, 30, 30], its proposal store,
    and two runs: one finds the cell at 0.9 and adds a background box at 0.2, one misses it."""
    root.mkdir(parents=True)
    Image.new("RGB", (64, 48), (40, 90, 160)).save(root / "cell.png")
    coco = {"images": [{"id": 1, "file_name": "cell.png", "width": 64, "height": 48}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "iscrowd": 0}],
            "categories": [{"id": 1, "name": "cell"}]}
    (root / "val.json").write_text(json.dumps(coco))
    store = write_store(root / "props", image_ids=[1], meta={"mode": "fast"},
                        boxes_per_image=[np.array([[0, 0, 64, 48], [40, 30, 60, 45]], np.float32)])
    found = [{"image_id": 1, "category_id": 1, "bbox": [10, 11, 20, 20], "score": 0.9},
             {"image_id": 1, "category_id": 1, "bbox": [45, 30, 10, 10], "score": 0.2}]
    runs = []
    for name, kind, dets in (("fast", "fast_rcnn", found), ("slow", "rcnn", [])):
        run = write_run(root / name, detector=kind, ap=0.5, timing=FAST_TIMING, data_json=root / "val.json",
                         detections=dets)
        metrics = json.loads((run / "metrics.json").read_text())
        (run / "metrics.json").write_text(json.dumps({**metrics, "proposals": str(store)}))
        runs.append(run)
    return runs, store


def test_the_viewer_of_one_class_and_one_image_passes_in_the_browser(tmp_path):
    runs, _ = _one_image_one_class(tmp_path / "data")
    _, html = make_report(runs, tmp_path / "report", timestamp="T")
    shot = tmp_path / "viewer.png"
    result, problems = check_tool.check_viewer(tmp_path / "report" / "viewer.html", CHROMIUM, screenshot=shot)
    assert problems == [] and result["images"] == 1
    assert result["checks"] == {"slider": "ok", "filter": "n/a: one class", "sort": "n/a: one image",
                                "proposals": "ok"}
    with Image.open(shot) as im:
        assert im.size == (1400, 1000) and len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 20  # drawn, not blank
    assert check_tool.main([str(html)]) == 0  # the report, then the viewer it links to


def test_the_viewer_with_its_files_beside_it_passes_and_broken_viewers_fail(tmp_path):
    data = write_tiny_coco(tmp_path / "data")
    dets = [{"image_id": 2, "category_id": 3, "bbox": [6, 6, 30, 20], "score": 0.9},
            {"image_id": 3, "category_id": 7, "bbox": [20, 10, 15, 30], "score": 0.4}]
    runs = [write_run(tmp_path / "fast", detector="fast_rcnn", ap=0.5, timing=FAST_TIMING, data_json=data,
                       detections=dets),
            write_run(tmp_path / "slow", detector="rcnn", ap=0.4, timing=RCNN_TIMING, data_json=data,
                       detections=dets[1:])]
    out = tmp_path / "out"
    loaded = [load_run(r) for r in runs]
    for r in loaded:
        r.label, r.color = r.name, "#333333"
    path = viewer.write_viewer(loaded, load_coco(data), out, embed_max=0, progress=False)
    result, problems = check_tool.check_viewer(path, CHROMIUM)
    assert problems == [] and result["images"] == 3
    assert result["checks"] == {"slider": "ok", "filter": "ok", "sort": "ok", "proposals": "n/a: no proposal store"}

    page = path.read_text()
    path.write_text(page.replace("state.t = Number(e.target.value); render();", "render();"))  # a dead slider
    assert any("slider: FAIL" in p for p in check_tool.check_viewer(path, CHROMIUM)[1])
    path.write_text(page)
    (out / "viewer" / "img" / "000001.jpg").write_bytes(b"not a jpeg")
    assert any("did not decode" in p for p in check_tool.check_viewer(path, CHROMIUM)[1])
    (out / "viewer" / "data" / "000000.js").unlink()  # on the first page: a console error, an error shown
    assert check_tool.check_viewer(path, CHROMIUM)[1] != []
