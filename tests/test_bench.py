"""``detect bench``: interleaving, warm-up, and the statistics on timings with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from detect.cli import build_parser, main
from detect.common.checkpoints import save_detector_checkpoint
from detect.common.config import Config, to_dict
from detect.data.datasets import load_coco
from detect.evaluation.run import timing_lists
from detect.models.build import build_backbone_from, build_fast_rcnn, build_rcnn
from detect.proposals.store import write_store
from detect.data.datasets import ImageRecord
from detect.demo import demo_steps
from detect.evaluation import bench
from detect.evaluation.bench import (bench_summary, ratio_of_medians, reference_index, run_interleaved,
                                     summarize)
from detect.models.detector import Detector, ProposalScores


class FakeDetector(Detector):
    """Records (name, image id) of every call; 'scores' nothing."""

    def __init__(self, name: str, calls: list, kind: str = "fast_rcnn"):
        super().__init__(class_names=["a"])
        self.name, self.calls, self.kind = name, calls, kind

    def score_proposals(self, image, proposal_boxes, timer=None):
        self.calls.append((self.name, int(image[0, 0, 0]), len(proposal_boxes)))
        with timer("head"):
            pass
        r = proposal_boxes.shape[0]
        return ProposalScores(proposal_boxes, torch.zeros(r, 1), torch.zeros(r, 1, 4))


def _records(n: int) -> list[ImageRecord]:
    return [ImageRecord(image_id=i + 1, file_name=str(i + 1), width=4, height=4) for i in range(n)]


def _fake_images(monkeypatch):
    """Image "n" is filled with the value n."""
    monkeypatch.setattr(bench, "read_image", lambda f: np.full((4, 4, 3), int(f), np.uint8))


def test_detectors_run_interleaved_image_by_image_and_warmup_is_not_counted(monkeypatch):
    calls: list = []
    a, b = FakeDetector("A", calls), FakeDetector("B", calls)
    proposed: list = []

    def propose(image, **settings):
        proposed.append(int(image[0, 0, 0]))
        return np.array([[0, 0, 2, 2]] * int(image[0, 0, 0]), np.float32)

    _fake_images(monkeypatch)
    monkeypatch.setattr(bench, "selective_search", propose)
    out = run_interleaved([a, b], _records(5), warmup=2, progress=False)
    assert [c[:2] for c in calls] == [(n, i) for i in range(1, 6) for n in "AB"]
    assert proposed == [1, 2, 3, 4, 5]  # once per image, shared
    assert [c[2] for c in calls if c[0] == "B"] == [1, 2, 3, 4, 5]  # the same proposals to both
    assert len(out["proposals"]) == 3
    for stages in out["detectors"]:
        assert set(stages) == {"head", "postprocess"}
        assert all(len(v) == 3 for v in stages.values())


def test_a_store_replaces_selective_search_and_too_few_images_is_an_error(monkeypatch):
    calls: list = []
    a = FakeDetector("A", calls)
    _fake_images(monkeypatch)
    out = run_interleaved([a], _records(2), warmup=0, progress=False,
                          get_proposals=lambda i: np.zeros((7, 4), np.float32))
    assert [c[2] for c in calls] == [7, 7] and len(out["proposals"]) == 2
    with pytest.raises(ValueError, match="warm-up"):
        run_interleaved([a], _records(2), warmup=2, progress=False)


def test_summarize_gives_median_and_interpolated_percentiles():
    s = summarize(list(range(11)))  # 0..10: p10 = 1, median 5, p90 = 9 exactly
    assert (s["median"], s["p10"], s["p90"], s["n"]) == (5.0, 1.0, 9.0, 11)
    assert np.isnan(summarize([])["median"])


def test_ratio_of_medians_is_exact_for_proportional_timings_and_brackets_noise():
    rng = np.random.default_rng(0)
    b = rng.uniform(10, 20, 50)
    r = ratio_of_medians(3 * b, b, num_resamples=500)
    assert r["ratio"] == pytest.approx(3.0) and r["lo"] == pytest.approx(3.0) and r["hi"] == pytest.approx(3.0)
    # Independent noise: the interval brackets the point estimate and the true ratio 2.
    a = 2 * rng.uniform(10, 20, 200)
    r = ratio_of_medians(a, rng.uniform(10, 20, 200), num_resamples=1000)
    assert r["lo"] < r["ratio"] < r["hi"] and r["lo"] < 2.0 < r["hi"]
    # Seeded: the same interval twice.
    assert ratio_of_medians(a, b[:1].repeat(200), seed=3) == ratio_of_medians(a, b[:1].repeat(200), seed=3)
    with pytest.raises(ValueError, match="length"):
        ratio_of_medians([1, 2], [1])


def test_summary_takes_ratios_against_fast_rcnn_and_adds_proposals_end_to_end():
    assert reference_index(["rcnn", "fast_rcnn"]) == 1 and reference_index(["x", "y"]) == 0
    timings = {"proposals": [100.0, 100.0, 100.0],
               "detectors": [{"features": [1000.0, 1000.0, 1000.0]}, {"backbone": [90.0] * 3, "roi_head": [10.0] * 3}]}
    s = bench_summary(timings, ["r", "f"], ["rcnn", "fast_rcnn"], num_resamples=100)
    assert s["reference"] == "f"
    r, f = s["detectors"]
    assert f["detector"]["median"] == 100.0 and f["end_to_end"]["median"] == 200.0
    assert r["ratio_to_reference"]["detector"]["ratio"] == pytest.approx(10.0)
    assert r["ratio_to_reference"]["end_to_end"]["ratio"] == pytest.approx(1100 / 200)
    assert "ratio_to_reference" not in f


def _tiny_fast_rcnn_checkpoint(path, dataset, seed: int):
    cfg = Config()  # a small random Fast R-CNN, as tests/test_readme.py builds it
    cfg.model.backbone, cfg.model.weights, cfg.model.freeze_at = "efficientnet_lite0", "none", ""
    cfg.model.head_dim, cfg.model.roi_size = 32, 3
    cfg.test.scale, cfg.test.max_size = 64, 96
    cfg.proposals.resize, cfg.proposals.top_k = 96, 20
    torch.manual_seed(seed)
    model = build_fast_rcnn(cfg, dataset.class_names, dataset.category_ids)
    save_detector_checkpoint(path, kind="fast_rcnn", config=to_dict(cfg), class_names=dataset.class_names,
                             category_ids=dataset.category_ids, state_dict=model.state_dict())


def test_detect_bench_writes_bench_json(synthetic_dir, tmp_path, one_thread):
    dataset = load_coco(synthetic_dir / "val.json")
    for name in ("a", "b"):
        _tiny_fast_rcnn_checkpoint(tmp_path / name / "model_final.pt", dataset, seed=len(name))
    write_store(tmp_path / "store", image_ids=[r.image_id for r in dataset.records],
                boxes_per_image=[np.array([[0, 0, 30, 30], [5, 5, 60, 50]], np.float32)] * len(dataset.records),
                meta={"mode": "fast"})
    out = tmp_path / "bench.json"
    assert main(["bench", str(tmp_path / "a" / "model_final.pt"), str(tmp_path / "b" / "model_final.pt"),
                 "--data", str(synthetic_dir / "val.json"), "--proposals", str(tmp_path / "store"),
                 "--warmup", "1", "--resamples", "50", "--output", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["num_images"] == len(dataset.records) - 1 and result["warmup"] == 1
    assert [d["name"] for d in result["detectors"]] == ["a", "b"] and result["reference"] == "a"
    assert set(result["detectors"][0]["stages"]) >= {"backbone", "roi_head", "postprocess"}
    assert len(result["detectors"][1]["per_image_ms"]["backbone"]) == result["num_images"]
    assert result["environment"]["torch_threads"] == 1
    r = result["detectors"][1]["ratio_to_reference"]["detector"]
    assert r["lo"] <= r["ratio"] <= r["hi"]
    assert result["flops_num_proposals"] == 2 and result["detectors"][0]["flops_ratio_to_reference"] == 1.0
    assert result["detectors"][0]["flops"] == result["detectors"][1]["flops"]  # same architecture
    assert result["paper_flops"]["rcnn_over_fast_rcnn"] > 50
    assert main(["bench", str(tmp_path / "a" / "model_final.pt"), "--data", str(synthetic_dir / "val.json")]) == 2


def test_timing_lists_keep_every_image_and_take_medians_after_warmup():
    per_image = [{"a": 100.0}, {"a": 50.0, "b": 1.0}, {"a": 1.0}, {"a": 2.0, "b": 3.0}, {"a": 4.0}]
    t = timing_lists(per_image, warmup=2)
    assert t["timing_ms_per_image_list"] == {"a": [100.0, 50.0, 1.0, 2.0, 4.0], "b": [0.0, 1.0, 0.0, 3.0, 0.0]}
    assert t["timing_ms_median"] == {"a": 2.0, "b": 0.0} and t["timing_warmup_images"] == 2
    assert timing_lists(per_image[:2], warmup=2)["timing_ms_median"]["a"] == 75.0  # too few: all count


def test_detect_eval_writes_per_image_timings(synthetic_dir, tmp_path, one_thread):
    dataset = load_coco(synthetic_dir / "val.json")
    _tiny_fast_rcnn_checkpoint(tmp_path / "a" / "model_final.pt", dataset, seed=0)
    assert main(["eval", "--checkpoint", str(tmp_path / "a" / "model_final.pt"), "--data",
                 str(synthetic_dir / "val.json"), "--device", "cpu"]) == 0
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    lists = m["timing_ms_per_image_list"]
    assert all(len(v) == len(dataset.records) for v in lists.values()) and "proposals" in lists
    for stage, mean in m["timing_ms_per_image"].items():  # the lists sum to the old means
        assert sum(lists[stage]) / len(dataset.records) == pytest.approx(mean)
    assert m["timing_ms_median"]["backbone"] == pytest.approx(float(np.median(lists["backbone"][3:])))


def test_the_demo_benches_both_detectors_and_compares_with_the_bench(tmp_path):
    steps = [argv for argv, _ in demo_steps(tmp_path)]
    names = [argv[0] for argv in steps]
    assert names.index("train") < names.index("bench") < names.index("compare")
    bench_argv, compare_argv = steps[names.index("bench")], steps[names.index("compare")]
    assert sum(a.endswith("model_final.pt") for a in bench_argv) == 2
    assert compare_argv[compare_argv.index("--bench") + 1] == bench_argv[bench_argv.index("--output") + 1]
    args = build_parser().parse_args(bench_argv)  # the step parses
    assert args.warmup == 3 and args.proposals == ""


@pytest.mark.slow
def test_eval_bench_compare_end_to_end(synthetic_dir, tmp_path, one_thread):
    dataset = load_coco(synthetic_dir / "val.json")
    ckpts = []
    for name in ("a", "b"):
        _tiny_fast_rcnn_checkpoint(tmp_path / name / "model_final.pt", dataset, seed=len(name))
        ckpts.append(str(tmp_path / name / "model_final.pt"))
    store = tmp_path / "store"
    write_store(store, image_ids=[r.image_id for r in dataset.records],
                boxes_per_image=[np.array([[0, 0, 30, 30], [5, 5, 60, 50]], np.float32)] * len(dataset.records),
                meta={"mode": "fast"})
    data = ["--data", str(synthetic_dir / "val.json")]
    for c in ckpts:
        assert main(["eval", "--checkpoint", c, *data, "--proposals", str(store), "--device", "cpu"]) == 0
    assert main(["bench", *ckpts, *data, "--proposals", str(store), "--warmup", "1", "--resamples", "20",
                 "--output", str(tmp_path / "bench.json"), "--device", "cpu"]) == 0
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--output-dir", str(tmp_path / "report"),
                 "--bench", str(tmp_path / "bench.json"), "--grid-images", "0"]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert md.index("## Findings") < md.index("## Runs")
    assert "b / a: " in md and "Speed (3 images, interleaved): b takes" in md
    assert "Error breakdown (TIDE-style)" in md and "ap_vs_iou.png" in md


def test_eval_ablations_box_regression_off_and_top_k(synthetic_dir, tmp_path, one_thread):
    dataset = load_coco(synthetic_dir / "val.json")
    _tiny_fast_rcnn_checkpoint(tmp_path / "a" / "model_final.pt", dataset, seed=0)
    write_store(tmp_path / "store", image_ids=[r.image_id for r in dataset.records],
                boxes_per_image=[np.array([[0, 0, 30, 30], [5, 5, 60, 50]], np.float32)] * len(dataset.records),
                meta={"mode": "fast"})
    out = tmp_path / "ablated"
    assert main(["eval", "--checkpoint", str(tmp_path / "a" / "model_final.pt"), "--data",
                 str(synthetic_dir / "val.json"), "--proposals", str(tmp_path / "store"), "--output-dir", str(out),
                 "--no-box-regression", "--top-k", "1", "--svd", "on", "--device", "cpu"]) == 0
    dets = json.loads((out / "detections.json").read_text())
    assert dets and all(d["bbox"] == [0, 0, 30, 30] for d in dets)  # the first proposal, unregressed
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_settings"] == {"box_regression": False, "proposal_top_k": 1}


def _tiny_rcnn_checkpoint(path, dataset):
    cfg = Config()
    cfg.detector = "rcnn"
    cfg.model.backbone, cfg.model.weights, cfg.model.freeze_at = "efficientnet_lite0", "none", ""
    cfg.model.head_dim, cfg.model.roi_size = 32, 3
    cfg.rcnn.crop_size, cfg.rcnn.context_pad = 32, 4
    backbone = build_backbone_from(cfg, weights="none")
    k, d, d5 = len(dataset.class_names), backbone.head_dim, backbone.out_channels * backbone.roi_size ** 2
    g = torch.Generator().manual_seed(0)
    extra = {"svm_weight": torch.randn(k, d, generator=g), "svm_bias": torch.zeros(k), "feat_scale": 1.0,
             "bbox_weight": 1e-3 * torch.randn(k, d5, 4, generator=g), "bbox_bias": torch.zeros(k, 4),
             "bbox_target_mean": torch.zeros(k, 4), "bbox_target_std": torch.ones(k, 4)}
    model = build_rcnn(cfg, dataset.class_names, extra, dataset.category_ids, backbone=backbone)
    save_detector_checkpoint(path, kind="rcnn", config=to_dict(cfg), class_names=dataset.class_names,
                             category_ids=dataset.category_ids, state_dict=model.state_dict(), extra=extra)
    return model


@pytest.mark.slow
def test_bench_of_rcnn_against_fast_rcnn_takes_fast_rcnn_as_reference(synthetic_dir, tmp_path, one_thread):
    dataset = load_coco(synthetic_dir / "val.json")
    rcnn = _tiny_rcnn_checkpoint(tmp_path / "r" / "model_final.pt", dataset)
    _tiny_fast_rcnn_checkpoint(tmp_path / "f" / "model_final.pt", dataset, seed=0)
    write_store(tmp_path / "store", image_ids=[r.image_id for r in dataset.records],
                boxes_per_image=[np.array([[0, 0, 30, 30], [5, 5, 60, 50]], np.float32)] * len(dataset.records),
                meta={"mode": "fast"})
    out = tmp_path / "bench.json"
    assert main(["bench", str(tmp_path / "r" / "model_final.pt"), str(tmp_path / "f" / "model_final.pt"),
                 "--data", str(synthetic_dir / "val.json"), "--proposals", str(tmp_path / "store"),
                 "--warmup", "0", "--resamples", "20", "--output", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["reference"] == "f"
    r = result["detectors"][0]
    assert set(r["stages"]) >= {"warp", "features", "svm", "bbox_reg"}
    k, d = len(dataset.class_names), rcnn.svm_weight.shape[1]
    assert r["flops"]["svm"] == 2 * 2 * d * k  # 2 proposals x 2 FLOPs x D x K
    assert r["flops"]["bbox_reg"] == 2 * 2 * rcnn.bbox_weight.shape[1] * 4 * k
    assert r["flops"]["warp"] == 2 * 3 * 32 * 32 * 8
    assert "ratio_to_reference" in r and "ratio_to_reference" not in result["detectors"][1]
