"""The report's Findings sentences on fixed numbers, and the like-for-like check on fake run folders."""

from __future__ import annotations

import copy

import pytest

from detect.report.findings import findings, like_for_like
from detect.report.runs import load_run

from conftest import FAST_TIMING, RCNN_TIMING, write_run


def iv(value, lo, hi):
    return {"value": value, "lo": lo, "hi": hi}


def _acc(drop_diff, ap50_diff=iv(-0.08, -0.15, -0.01), ap75_diff=iv(-0.02, -0.09, 0.04),
         rcnn_ap50=iv(0.62, 0.5, 0.7)):
    """Fast R-CNN (reference, index 0) and R-CNN (index 1)."""
    return {"labels": ["fast_rcnn", "rcnn"], "kinds": ["fast_rcnn", "rcnn"], "num_images": 30,
            "bootstrap": {"ap": [{0.5: iv(0.70, 0.6, 0.8), 0.75: iv(0.40, 0.3, 0.5)},
                                 {0.5: rcnn_ap50, 0.75: iv(0.38, 0.3, 0.46)}],
                          "diff_to_first": [None, {0.5: ap50_diff, 0.75: ap75_diff}],
                          "drop": [iv(0.30, 0.25, 0.35), iv(0.24, 0.18, 0.30)],
                          "drop_diff_to_first": [None, drop_diff]},
            "errors": [{"dAP50": {"localisation": 0.05}}, {"dAP50": {"localisation": 0.04}}]}


BENCH = {"num_images": 27, "reference": "fast_rcnn", "paper_flops": {"rcnn_over_fast_rcnn": 73.1},
         "detectors": [{"name": "fast_rcnn"},
                       {"name": "rcnn", "flops_ratio_to_reference": 9.5,
                        "ratio_to_reference": {"detector": {"ratio": 10.2, "lo": 9.1, "hi": 11.0},
                                               "end_to_end": {"ratio": 1.8, "lo": 1.7, "hi": 1.9}}}]}


def test_significant_and_insignificant_accuracy_differences():
    text = findings(_acc(iv(-0.06, -0.1, 0.01)), None)
    assert text[0] == ("At loose IoU (AP50), rcnn scores 62.0 (95% CI 50.0 to 70.0) and fast_rcnn 70.0 (95% CI "
                       "60.0 to 80.0): fast_rcnn is more accurate by 8.0 points (difference -8.0 (95% CI -15.0 "
                       "to -1.0)).")
    assert text[1].endswith("no significant difference (difference -2.0 (95% CI -9.0 to 4.0), the interval "
                            "contains 0).")
    assert text[-1].startswith("Speed: no bench given")


def test_the_localisation_claim_verdicts():
    # R-CNN's drop minus Fast R-CNN's is the stored difference; Fast's minus R-CNN's is its negation.
    supported = findings(_acc(iv(-0.06, -0.1, -0.02)), None)[2]
    assert supported.startswith('Claim "Fast R-CNN localises boxes worse than R-CNN": supported by these data')
    assert "(Fast R-CNN's drop minus R-CNN's: 6.0 (95% CI 2.0 to 10.0))" in supported
    assert "by 30.0 (95% CI 25.0 to 35.0) points for fast_rcnn (it loses 43% of its AP50)" in supported
    assert "24.0 (95% CI 18.0 to 30.0) points for rcnn (it loses 39% of its AP50)" in supported
    assert "localisation errors cost 5.0 and 4.0 AP50 points" in supported
    assert "not supported by these data" in findings(_acc(iv(-0.06, -0.1, 0.01)), None)[2]
    assert "contradicted by these data" in findings(_acc(iv(0.06, 0.02, 0.1)), None)[2]


def test_speed_and_flop_sentences_come_from_the_bench():
    text = findings(None, BENCH)
    assert text[0].startswith("Accuracy intervals: not available")
    assert text[1] == ("Speed (27 images, interleaved): rcnn takes 10.20x (95% CI 9.10-11.00) the time of "
                       "fast_rcnn detector-only and 1.80x (95% CI 1.70-1.90) end to end with selective search; "
                       "it needs 9.50x the FLOPs.")
    assert "R-CNN would need 73x the FLOPs of Fast R-CNN" in text[2]


def test_no_drop_is_called_smaller_near_the_floor():
    """R-CNN's AP50 interval reaches below 5 points: its small drop is bounded by its AP50."""
    text = findings(_acc(iv(-0.06, -0.1, -0.02), rcnn_ap50=iv(0.30, 0.04, 0.5)), None)[2]
    assert "cannot be judged: the AP50 of rcnn is near zero (its 95% interval reaches below 5.0 points)" in text
    assert "supported" not in text
    assert "points for rcnn (it loses 80% of its AP50)" in text


def test_a_bench_at_different_top_k_says_so():
    bench = copy.deepcopy(BENCH)
    bench["detectors"][0]["test_settings"] = {"proposal_top_k": 2000}
    bench["detectors"][1]["test_settings"] = {"proposal_top_k": 300}
    assert findings(None, bench)[1].endswith("FLOPs. Not like for like: they differ in proposal top_k.")
    assert findings(None, BENCH)[1].endswith("FLOPs.")


# Like for like: a Fast R-CNN and an R-CNN run that share everything _setup checks ...
CONFIG = {"model": {"weights": "default"},
          "data": {"train": {"path": "train.json", "split": ""}, "train_proposals": "proposals/train"},
          "train": {"max_iter": 600, "images_per_batch": 2, "rois_per_image": 64, "lr": 0.001, "steps": [450]},
          "rcnn": {"ft_max_iter": 600, "ft_batch_size": 128, "ft_lr": 0.001, "ft_steps": [450]}}
METRICS = {"data": {"format": "coco", "path": "val.json"}, "proposals": "proposals/val",
           "proposal_settings": {"mode": "fast", "resize": 500, "top_k": 2000},
           "test_settings": {"box_regression": True, "proposal_top_k": 0}}

# ... and what each change to the R-CNN run makes them differ in: (metrics.json keys, config.yaml keys).
CHANGES = {
    "store": ({"proposals": "proposals/val_quality",
               "proposal_settings": {"mode": "quality", "resize": 500, "top_k": 2000}}, {},
              {"proposal store": "proposals/val (frcn) vs proposals/val_quality (rcnn)",
               "proposal settings": "mode fast (frcn) vs mode quality (rcnn)"}),
    "top_k": ({"test_settings": {"box_regression": True, "proposal_top_k": 300}}, {},
              {"proposal top_k": "2000 (frcn) vs 300 (rcnn)"}),
    "val set": ({"data": {"format": "coco", "path": "other_val.json"}}, {},
                {"validation set": "val.json, 3 images (frcn) vs other_val.json, 3 images (rcnn)"}),
    "backbone": ({"backbone": "vgg16"}, {}, {"backbone": "efficientnet_lite0 (frcn) vs vgg16 (rcnn)"}),
    "weights": ({}, {"model": {"weights": "none"}}, {"backbone weights": "default (frcn) vs none (rcnn)"}),
    "training images": ({}, {"data": {"train": {"path": "train_half.json"}, "train_proposals": "proposals/train"}},
                        {"training images": "train.json, proposals proposals/train (frcn) vs train_half.json, "
                                            "proposals proposals/train (rcnn)"}),
    "schedule": ({}, {"rcnn": {"ft_max_iter": 200, "ft_batch_size": 128, "ft_lr": 0.001, "ft_steps": [150]}},
                 {"schedule": "600 iterations of 128 RoIs at lr 0.001, steps [450] (frcn) vs 200 iterations of "
                              "128 RoIs at lr 0.001, steps [150] (rcnn)"}),
}


def _runs(tmp_path, metrics=None, config=None):
    """frcn and rcnn, alike but for ``metrics`` and ``config`` on rcnn; labelled by folder name."""
    runs = []
    for name, kind, timing, m, c in (("frcn", "fast_rcnn", FAST_TIMING, {}, {}),
                                      ("rcnn", "rcnn", RCNN_TIMING, metrics or {}, config or {})):
        run = load_run(write_run(tmp_path / name, detector=kind, ap=0.5, timing=timing, data_json=None,
                                 config={**CONFIG, **c}, **{**METRICS, **m}))
        run.label = run.name
        runs.append(run)
    return runs


def _acc_of(labels):
    acc = _acc(iv(-0.06, -0.1, -0.02))
    acc["labels"] = labels
    return acc


def test_like_for_like_runs_get_no_caveat_and_the_box_claim_is_judged(tmp_path):
    differ, unknown = like_for_like(_runs(tmp_path))
    assert differ == {} and unknown == []
    text = findings(_acc_of(["frcn", "rcnn"]), None, differ, unknown)
    assert not any("like for like" in line or "Not checked" in line for line in text)
    assert "Claim \"Fast R-CNN localises boxes worse than R-CNN\": supported by these data" in text[2]


@pytest.mark.parametrize("change", CHANGES)
def test_each_difference_is_named_and_only_it(tmp_path, change):
    metrics, config, expected = CHANGES[change]
    differ, unknown = like_for_like(_runs(tmp_path, metrics, config))
    assert unknown == []
    assert {what: " vs ".join(f"{v} ({label})" for label, v in values.items())
            for what, values in differ.items()} == expected
    text = findings(_acc_of(["frcn", "rcnn"]), None, differ, unknown)
    assert text[0] == ("These runs are not like for like: " + "; ".join(f"{w} {v}" for w, v in expected.items())
                       + ". Every verdict below that depends on it says so.")
    assert text[1].endswith(f"Not like for like: they differ in {', '.join(expected)}.")  # the AP50 verdict
    assert "cannot be judged, as the runs differ in " + ", ".join(expected) in text[3]


def test_what_a_run_folder_does_not_record_is_not_checked(tmp_path):
    bare = [load_run(write_run(tmp_path / n, detector="fast_rcnn", ap=0.5, timing=FAST_TIMING, data_json=None))
            for n in ("a", "b")]
    for run in bare:
        run.label = run.name
    differ, unknown = like_for_like(bare)
    assert differ == {}  # both "none (selective search at test time)"
    assert unknown == ["proposal settings", "proposal top_k", "validation set", "backbone weights",
                       "training images", "schedule"]
    text = findings(_acc_of(["a", "b"]), None, differ, unknown)
    assert text[0].startswith("Not checked, as not every run folder records it")
    assert ("cannot be judged, as proposal settings, proposal top_k, validation set, backbone weights, training "
            "images, schedule not checked") in text[-2]
