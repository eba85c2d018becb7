"""``detect compare``: tables, speed ratio, self-contained HTML, determinism, missing pieces."""

from __future__ import annotations

import base64
import io
import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from detect.cli import main
from detect.report.runs import load_run
from detect.report.sections import make_report

from conftest import FAST_TIMING, RCNN_TIMING, write_run, write_tiny_coco

@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    data_json = write_tiny_coco(root / "data")
    detections = [{"image_id": 2, "category_id": 3, "bbox": [6, 6, 30, 20], "score": 0.9},
                  {"image_id": 3, "category_id": 7, "bbox": [18, 12, 40, 30], "score": 0.7},
                  {"image_id": 3, "category_id": 3, "bbox": [1, 1, 10, 10], "score": 0.2}]
    return [write_run(root / "fast", detector="fast_rcnn", ap=0.512, timing=FAST_TIMING,
                       data_json=data_json, detections=detections),
            write_run(root / "slow", detector="rcnn", ap=0.431, timing=RCNN_TIMING,
                       data_json=data_json, detections=detections[:1])]


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory) -> tuple[Path, Path]:
    return make_report(runs, tmp_path_factory.mktemp("report"), timestamp="2024-01-01 00:00:00 UTC")


def test_tables_hold_the_runs_numbers(report):
    md = report[0].read_text()
    assert ("| fast | Fast R-CNN | efficientnet_lite0 | 0.512 | 0.801 | 0.550 | n/a | 0.400 | 0.600 | 0.650 "
            "| 0.712 | n/a |") in md  # then VOC07 mAP and VOC mAP (-1: n/a)
    assert "| slow | R-CNN | efficientnet_lite0 | 0.431 | 0.801 |" in md
    assert "| cat | 0.612 | 0.900 | 0.531 | 0.900 |" in md  # per-class AP and AP50 of both runs
    assert "| dog | 0.324 | n/a | 0.324 | n/a |" in md  # -1 (no ground truth) prints n/a
    assert md.count("| cat |") == 1  # classes named by both AP and AP50 listed once
    assert "| **test time excluding proposals, ms/image** | 15.0 | 338.0 |" in md
    assert "| relative to the fastest (excluding proposals) | 1.00x | 22.5x |" in md
    assert "| warp, ms/image | - | 30.0 |" in md
    assert "| parameters | 3,412,345 | 3,412,345 |" in md
    assert "| training time | 1.6 min | 1.6 min |" in md
    assert "**R-CNN / Fast R-CNN = 22.5x test time per image, excluding proposals" in md
    assert "| fast, slow | 1000 | 0.900 | 0.600 | 0.600 | 0.800 |" in md  # one shared proposal set
    assert "The first 2 val images" in md  # image 1 has no ground truth
    html = report[1].read_text()
    assert "<td>0.512</td>" in html and "R-CNN / Fast R-CNN = 22.5x" in html
    assert "not available" not in md


def test_markdown_figures_exist_and_html_embeds_them(report):
    md_path, html_path = report
    md, html = md_path.read_text(), html_path.read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(figures) == ["ap_vs_iou.png", "detections.png", "error_breakdown.png",
                               "per_class_ap.png", "pr_overall.png", "pr_per_class.png", "proposal_recall.png",
                               "speed_vs_accuracy.png", "stage_times.png"]
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(embedded) == len(figures)
    on_disk = {(md_path.parent / f).read_bytes() for f in figures}
    for data in embedded:
        png = base64.b64decode(data, validate=True)
        assert png in on_disk
        with Image.open(io.BytesIO(png)) as im:
            im.load()
            assert im.format == "PNG" and im.width > 100 and im.height > 100


def test_html_references_nothing_outside_itself(report):
    html = report[1].read_text()
    assert not re.search(r"https?://|ftp://", html, re.I)
    # one relative link, to the viewer beside the report
    assert re.findall(r"""(?:src|href|action)\s*=\s*(?!["']?data:)["']?[^"' >]*""", html, re.I) == ['href="viewer.html']
    assert not re.search(r"url\(\s*['\"]?(?!data:)|@import|<script|<link|<iframe", html, re.I)
    assert not re.search(r"""["'(]//""", html)  # protocol-relative URLs


def _without_timestamp(text: str) -> list[str]:
    lines = text.splitlines()
    assert sum("Generated:" in line for line in lines) == 1
    return [line for line in lines if "Generated:" not in line]


def test_same_runs_give_the_same_report(runs, report, tmp_path):
    md2, html2 = make_report(runs, tmp_path / "again")  # default timestamp: now
    assert _without_timestamp(md2.read_text()) == _without_timestamp(report[0].read_text())
    assert _without_timestamp(html2.read_text()) == _without_timestamp(report[1].read_text())
    assert md2.read_text() != report[0].read_text()  # only the timestamp line differs
    pngs = sorted(p.name for p in report[0].parent.glob("*.png"))
    assert pngs == sorted(p.name for p in md2.parent.glob("*.png")) and len(pngs) == 9
    for name in pngs:
        assert (md2.parent / name).read_bytes() == (report[0].parent / name).read_bytes(), name


def test_missing_optional_pieces_say_not_available(tmp_path):
    bare = write_run(tmp_path / "bare", detector="rcnn", ap=0.2, timing={}, data_json=None, full=False)
    md, html = make_report([bare], tmp_path / "report", timestamp="t")
    text = md.read_text()
    assert "| bare | R-CNN | n/a | 0.200 |" in text
    for piece in ("Per-class AP: not available", "Test-time speed: not available",
                  "Precision-recall curve not available for: bare", "Proposal recall not available for: bare",
                  "Detection grid: not available"):
        assert piece in text
    assert "data:image/png" not in html.read_text() and not list((tmp_path / "report").glob("*.png"))


def test_grid_without_detections_file_and_bad_entries(runs, tmp_path, capsys):
    # A relative dataset path is found from the run folder (it does not exist from the cwd).
    data_json = Path(os.path.relpath(load_run(runs[0]).data["path"], tmp_path / "odd"))
    entries = [{"image_id": 2, "category_id": 99, "bbox": [1, 1, 5, 5], "score": 0.9},  # unknown id
               {"image_id": 2, "bbox": [1, 1, 5, 5], "score": 0.9}]  # no category_id
    odd = write_run(tmp_path / "odd", detector="fast_rcnn", ap=0.3, timing={}, data_json=data_json,
                     detections=entries, full=False)
    none = write_run(tmp_path / "none", detector="rcnn", ap=0.3, timing={}, data_json=None, full=False)
    md, _ = make_report([odd, none], tmp_path / "report", timestamp="t", num_grid_images=1)
    text = md.read_text()
    assert "Detections not available for: none." in text
    assert "The first 1 val images" in text and (tmp_path / "report" / "detections.png").is_file()
    assert not (Path.cwd() / data_json).exists()
    assert "skipped 1 malformed entries and 1 with a category id not in the dataset" in capsys.readouterr().err


def test_duplicate_names_are_told_apart(runs, tmp_path):
    md, _ = make_report([runs[0], runs[0]], tmp_path / "report", timestamp="t", num_grid_images=0)
    text = md.read_text()
    assert "| fast | Fast R-CNN |" in text and "| fast (2) | Fast R-CNN |" in text
    assert "R-CNN / Fast R-CNN" not in text  # two fast_rcnn runs: ratios to the fastest instead
    assert "| relative to the fastest (excluding proposals) | 1.00x | 1.00x |" in text


def test_bad_run_folders_give_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no metrics.json"):
        load_run(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere: run folder not found"):
        load_run(tmp_path / "nowhere")
    bad = write_run(tmp_path / "bad", detector="rcnn", ap=0.2, timing={}, data_json=None, full=False)
    metrics = json.loads((bad / "metrics.json").read_text())
    metrics["coco"]["AP50"] = "high"
    (bad / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match=r"bad/metrics.json: key 'coco.AP50' should be a number"):
        load_run(bad)
    (bad / "metrics.json").write_text(json.dumps({"detector": "rcnn", "AR": 0.5}))
    with pytest.raises(ValueError, match="key 'coco' is missing"):
        load_run(bad)
    # `detect eval --results` output: no detector, COCO numbers at the top level.
    (bad / "metrics.json").write_text(json.dumps({"AP": 0.25, "AP50": -1.0, "per_class_AP": {"cat": 0.25}}))
    run = load_run(bad)
    assert (run.detector, run.coco["AP"], run.coco["AP50"], run.per_class_ap) == ("n/a", 0.25, None, {"cat": 0.25})
    (bad / "metrics.json").write_text("{")
    with pytest.raises(ValueError, match="malformed JSON"):
        load_run(bad)


def test_cli_compare(runs, tmp_path, capsys):
    bare = write_run(tmp_path / "bare", detector="rcnn", ap=0.2, timing={}, data_json=None, full=False)
    assert main(["compare", str(bare), "--output-dir", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.html").is_file() and (tmp_path / "r" / "report.md").is_file()
    assert main(["compare", str(runs[0]), str(tmp_path / "missing"), "--output-dir", str(tmp_path / "s")]) == 2
    assert "missing: run folder not found" in capsys.readouterr().err
    assert not (tmp_path / "s" / "report.md").exists()
    # An explicit --data that cannot be loaded is an error, not a skipped grid.
    assert main(["compare", str(runs[0]), "--output-dir", str(tmp_path / "t"),
                 "--data", str(tmp_path / "no.json")]) == 2
    assert "no.json" in capsys.readouterr().err


def test_a_bench_replaces_the_runs_timings_and_gives_the_ratio_interval(runs, tmp_path):
    def entry(name, kind, stages, ratio=None):
        s = {k: {"median": v, "p10": v * 0.9, "p90": v * 1.2, "n": 20} for k, v in stages.items()}
        total = sum(stages.values())
        d = {"name": name, "kind": kind, "stages": s,
             "detector": {"median": total, "p10": total, "p90": total, "n": 20},
             "end_to_end": {"median": total + 500, "p10": total + 500, "p90": total + 500, "n": 20}}
        d.update(flops_total=total * 1e9, flops_ratio_to_reference=total / 10.0)
        if ratio:
            d["ratio_to_reference"] = {"detector": {"ratio": ratio, "lo": ratio - 1, "hi": ratio + 2},
                                       "end_to_end": {"ratio": 1.5, "lo": 1.4, "hi": 1.6}}
        return d
    bench = {"reference": "fast", "num_images": 20, "warmup": 3, "device": "cpu",
             "proposals": {"median": 500.0, "p10": 400.0, "p90": 600.0, "n": 20},
             "checkpoints": [str(runs[0] / "model_final.pt"), "elsewhere/slow/model_final.pt"],
             "detectors": [entry("fast", "fast_rcnn", {"backbone": 7.0, "roi_head": 3.0}),
                           entry("slow", "rcnn", {"features": 90.0, "warp": 10.0}, ratio=10.0)],
             "paper_flops": {"settings": "VGG16", "fast_rcnn": {"a": 1e12}, "rcnn": {"b": 6e13},
                             "rcnn_over_fast_rcnn": 60.0}, "flops_num_proposals": 50,
             "environment": {"torch": "2.x", "torch_threads": 2, "opencv": "4.x", "opencv_threads": 2,
                             "numpy": "1.x"}}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    md_path, _ = make_report(runs, tmp_path / "report", timestamp="T", num_grid_images=0,
                             bench=tmp_path / "bench.json")
    md = md_path.read_text()
    assert "slow / fast: 10.0x (95% CI 9.00-12.00) detector only, 1.50x (95% CI 1.40-1.60) end to end" in md
    assert "| end to end (proposals + detector), ms | 510.0 [510.0, 510.0] | 600.0 [600.0, 600.0] |" in md
    assert "bench median per image, 20 images after 3 warm-up" in md
    assert "end to end (ratio of medians; paired bootstrap over images); FLOP ratio 10.0x." in md
    assert "R-CNN needs 60.0 TFLOPs per image and Fast R-CNN 1.00 TFLOPs: 60.0x" in md
    assert "| GFLOPs per image (detector) | 10.00 | 100.00 |" in md
    assert "| features, ms/image | - | 90.0 |" in md  # the bench's medians, not the run's 300 ms
    (tmp_path / "bad.json").write_text(json.dumps({"detectors": [{}], "proposals": {}}))
    with pytest.raises(ValueError, match=r"bad.json: key 'detectors\[0\].name'"):
        make_report(runs, tmp_path / "r2", timestamp="T", num_grid_images=0, bench=tmp_path / "bad.json")


def test_run_medians_are_preferred_to_means(tmp_path):
    run = write_run(tmp_path / "m", detector="fast_rcnn", ap=0.5, timing=FAST_TIMING, data_json=None)
    m = json.loads((run / "metrics.json").read_text())
    m.update(timing_ms_median={"backbone": 5.0, "proposals": 1000.0}, timing_warmup_images=3)
    (run / "metrics.json").write_text(json.dumps(m))
    loaded = load_run(run)
    assert loaded.timing_ms == {"backbone": 5.0, "proposals": 1000.0}
    assert loaded.timing_source == "median per image after 3 warm-up image(s)"


def test_runs_that_differ_in_proposals_get_a_sweep_figure(tmp_path):
    runs = []
    for k in (10, 100, 0):
        run = write_run(tmp_path / f"k{k}", detector="fast_rcnn", ap=0.3, timing=FAST_TIMING, data_json=None)
        m = json.loads((run / "metrics.json").read_text())
        m["test_settings"] = {"box_regression": True, "proposal_top_k": k}
        (run / "metrics.json").write_text(json.dumps(m))
        runs.append(run)
    md_path, _ = make_report(runs, tmp_path / "report", timestamp="T", num_grid_images=0)
    md = md_path.read_text()
    assert "| k10 | Fast R-CNN | efficientnet_lite0 | cpu | 3 | top-10 proposals |" in md
    assert "These runs are not like for like: proposal top_k 10 (k10) vs 100 (k100) vs all (k0)." in md
    assert "| all proposals |" in md and "proposals_sweep.png" in md
    assert (tmp_path / "report" / "proposals_sweep.png").is_file()
    # each run's proposal recall@0.5 at the number of proposals its detector scored (all: the largest k)
    assert "| top-100 proposals | 0.600 |" in md and "| all proposals | 0.950 |" in md
    assert "| top-10 proposals | n/a |" in md  # not measured at 10


def test_training_cost_side_by_side(tmp_path):
    """R-CNN's time per stage, the peak memory of training and the feature cache on disk, from
    the files training leaves beside metrics.json (n/a or - where a run has none)."""
    fast = write_run(tmp_path / "fast", detector="fast_rcnn", ap=0.5, timing=FAST_TIMING, data_json=None)
    slow = write_run(tmp_path / "slow", detector="rcnn", ap=0.4, timing=RCNN_TIMING, data_json=None)
    (fast / "log.jsonl").write_text('{"iteration": 20, "max_mem_mb": 812.4}\n{"iteration": 40, "max_mem_mb": 950.2}\n')
    (slow / "rcnn_stages.json").write_text(json.dumps({"seconds": {"finetune": 4000.0, "features": 7200.0,
                                                                   "svm": 30.0, "bbox_reg": 2.0}}))
    (slow / "features").mkdir()
    (slow / "features" / "done").write_text(json.dumps({"settings": {}, "bytes": {"total": 3 * 2**30}}))
    (slow / "finetune").mkdir()
    (slow / "finetune" / "log.jsonl").write_text('{"iteration": 20, "max_mem_mb": 2048.0}\nnot json\n')
    md, _ = make_report([fast, slow], tmp_path / "report", timestamp="t", num_grid_images=0)
    text = md.read_text()
    assert "| training: finetune | - | 1.11 h |" in text.replace("n/a", "-")
    assert "| training: features | - | 2.00 h |" in text.replace("n/a", "-")
    assert "| training peak memory, MB | 950 | 2,048 |" in text
    assert "| feature cache on disk | - | 3,072.0 MiB |" in text
