"""The report's Findings sentences on fixed numbers."""

from __future__ import annotations

from detect.report.findings import findings


def iv(value, lo, hi):
    return {"value": value, "lo": lo, "hi": hi}


def _acc(drop_diff, ap50_diff=iv(-0.08, -0.15, -0.01), ap75_diff=iv(-0.02, -0.09, 0.04)):
    """Fast R-CNN (reference, index 0) and R-CNN (index 1)."""
    return {"labels": ["fast_rcnn", "rcnn"], "kinds": ["fast_rcnn", "rcnn"], "num_images": 30,
            "bootstrap": {"ap": [{0.5: iv(0.70, 0.6, 0.8), 0.75: iv(0.40, 0.3, 0.5)},
                                 {0.5: iv(0.62, 0.5, 0.7), 0.75: iv(0.38, 0.3, 0.46)}],
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
    assert "by 30.0 (95% CI 25.0 to 35.0) points for fast_rcnn" in supported
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
