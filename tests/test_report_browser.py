"""report.html in a real headless browser (tools/check_report_html.py): every figure decodes and
the console stays clean. Skipped where no Chromium is installed (apt-get install chromium)."""

from __future__ import annotations

import base64
import importlib.util
import io
from pathlib import Path

import pytest
from PIL import Image

from detect.report.sections import make_report
from tests.test_report import FAST_TIMING, RCNN_TIMING, _write_run, _write_tiny_coco

TOOL = Path(__file__).resolve().parent.parent / "tools" / "check_report_html.py"
spec = importlib.util.spec_from_file_location("check_report_html", TOOL)
check_tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_tool)
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
    data = _write_tiny_coco(tmp_path / "data")
    dets = [{"image_id": 2, "category_id": 3, "bbox": [6, 6, 30, 20], "score": 0.9}]
    runs = [_write_run(tmp_path / "fast", detector="fast_rcnn", ap=0.5, timing=FAST_TIMING, data_json=data,
                       detections=dets),
            _write_run(tmp_path / "slow", detector="rcnn", ap=0.4, timing=RCNN_TIMING, data_json=data,
                       detections=dets)]
    _, html = make_report(runs, tmp_path / "report", timestamp="T")
    num, problems = check_tool.check_report(html, CHROMIUM)
    assert problems == [] and num == html.read_text().count("<img")
    assert num >= 8
