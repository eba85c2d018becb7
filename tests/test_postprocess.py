"""detect.detector.postprocess: the decode/clip/threshold/NMS/top-k step both detectors share."""

from __future__ import annotations

import math

import pytest
import torch

from detect.models.detector import ProposalScores, postprocess


def _out(proposal_boxes, scores, deltas=None) -> ProposalScores:
    proposal_boxes = torch.as_tensor(proposal_boxes, dtype=torch.float32).reshape(-1, 4)  # [R, 4]
    scores = torch.as_tensor(scores, dtype=torch.float32)
    scores = scores.reshape(proposal_boxes.shape[0], -1)  # [R, K]
    if deltas is None:
        deltas = torch.zeros(scores.shape + (4,))  # [R, K, 4]
    return ProposalScores(proposal_boxes, scores, torch.as_tensor(deltas, dtype=torch.float32))


def test_zero_deltas_return_the_proposals_sorted_by_score_with_labels_1_to_k():
    proposal_boxes = [[0, 0, 10, 10], [20, 20, 40, 50], [50, 10, 90, 30]]
    scores = [[0.9, 0.2], [0.3, 0.8], [0.6, 0.1]]  # [R=3, K=2]
    dets = postprocess(_out(proposal_boxes, scores), 100, 100, score_thresh=0.05, nms_thresh=0.3)
    # Slow reference: every (proposal, class) pair above the threshold, best score first.
    expected = sorted(((s, r, k + 1) for r, row in enumerate(scores) for k, s in enumerate(row)),
                      reverse=True)
    assert len(dets) == len(expected) == 6
    for i, (score, r, label) in enumerate(expected):
        assert math.isclose(dets.scores[i].item(), score, rel_tol=1e-6)
        assert dets.labels[i].item() == label
        assert torch.allclose(dets.boxes[i], torch.tensor(proposal_boxes[r], dtype=torch.float32))


def test_decoded_boxes_are_clipped_to_the_image():
    deltas = torch.tensor([[[0.0, 0.0, math.log(2.0), 0.0]]])  # double the width
    dets = postprocess(_out([[-10, -5, 120, 90]], [[0.9]], deltas), 80, 100)
    assert dets.boxes.tolist() == [[0.0, 0.0, 100.0, 80.0]]
    # the doubled width (260 px wide around x = 55) would reach x = -75 .. 185 unclipped
    dets = postprocess(_out([[10, 10, 30, 30]], [[0.9]], deltas), 80, 100)
    assert torch.allclose(dets.boxes, torch.tensor([[0.0, 10.0, 40.0, 30.0]]))


def test_score_threshold_drops_low_scores():
    proposal_boxes = [[0, 0, 10, 10], [50, 50, 60, 60], [20, 0, 30, 10]]
    dets = postprocess(_out(proposal_boxes, [[0.04], [0.06], [0.5]]), 100, 100, score_thresh=0.05)
    assert sorted(dets.scores.tolist()) == [torch.tensor(0.06).item(), 0.5]
    dets = postprocess(_out(proposal_boxes, [[0.04], [0.06], [0.5]]), 100, 100, score_thresh=0.1)
    assert dets.scores.tolist() == [0.5]


def test_nms_is_per_class():
    boxes = [[0, 0, 10, 10], [0, 2, 10, 12]]  # IoU 80 / 120 = 0.67 > 0.3
    # different classes: both kept
    dets = postprocess(_out(boxes, [[0.9, 0.0], [0.0, 0.8]]), 100, 100, nms_thresh=0.3)
    assert sorted(dets.labels.tolist()) == [1, 2]
    # same class: the lower-scored one is suppressed
    dets = postprocess(_out(boxes, [[0.9, 0.0], [0.8, 0.0]]), 100, 100, nms_thresh=0.3)
    assert dets.scores.tolist() == [torch.tensor(0.9).item()]
    assert dets.boxes.tolist() == [[0.0, 0.0, 10.0, 10.0]]
    # same class below the NMS threshold (IoU 30 / 170 = 0.18): both kept
    dets = postprocess(_out([[0, 0, 10, 10], [7, 0, 17, 10]], [[0.9], [0.8]]), 100, 100,
                       nms_thresh=0.3)
    assert len(dets) == 2


def test_top_k_keeps_the_best_scores():
    proposal_boxes = [[12 * i, 0, 12 * i + 10, 10] for i in range(8)]  # disjoint
    scores = [[0.1 * (i + 1)] for i in (3, 7, 0, 5, 1, 6, 2, 4)]
    dets = postprocess(_out(proposal_boxes, scores), 100, 100, detections_per_image=3)
    assert len(dets) == 3
    assert torch.allclose(dets.scores, torch.tensor([0.8, 0.7, 0.6]))
    assert dets.boxes[0].tolist() == [12.0, 0.0, 22.0, 10.0]  # the 0.8 proposal


def test_zero_proposals_give_empty_detections_with_the_right_shapes():
    out = ProposalScores(torch.zeros((0, 4)), torch.zeros((0, 3)), torch.zeros((0, 3, 4)))
    for dets in (postprocess(out, 50, 60),
                 # proposals there, but none above the threshold: the same empty result
                 postprocess(_out([[0, 0, 10, 10]], [[0.01, 0.02, 0.0]]), 50, 60)):
        assert len(dets) == 0
        assert dets.boxes.shape == (0, 4) and dets.boxes.dtype == torch.float32
        assert dets.scores.shape == (0,) and dets.scores.dtype == torch.float32
        assert dets.labels.shape == (0,) and dets.labels.dtype == torch.int64


def test_non_finite_deltas_and_scores_never_reach_the_output():
    proposal_boxes = [[10, 10, 30, 30]] * 5 + [[60, 60, 80, 80]]
    nan, inf = float("nan"), float("inf")
    deltas = torch.tensor([[[nan, 0, 0, 0]], [[inf, 0, 0, 0]], [[0, 0, inf, inf]],
                           [[0, 0, -inf, 0]], [[0, 0, 0, 0]], [[0, 0, 0, 0]]])  # [R=6, K=1, 4]
    scores = [[0.9], [0.9], [0.9], [0.9], [nan], [0.5]]
    dets = postprocess(_out(proposal_boxes, scores, deltas), 100, 100)
    assert torch.isfinite(dets.boxes).all() and torch.isfinite(dets.scores).all()
    assert (dets.boxes[:, 2:] > dets.boxes[:, :2]).all()  # no empty boxes
    assert (dets.boxes >= 0).all() and (dets.boxes <= 100).all()
    # the healthy proposal survives untouched
    assert [60.0, 60.0, 80.0, 80.0] in dets.boxes.tolist()


def test_per_class_top_k_keeps_the_best_boxes_of_each_class_before_nms():
    proposal_boxes = [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]]  # disjoint
    scores = [[0.9, 0.1], [0.8, 0.95], [0.7, 0.2], [0.6, 0.3]]  # [R=4, K=2]
    dets = postprocess(_out(proposal_boxes, scores), 100, 100, per_class_top_k=2)
    # class 1 keeps 0.9 and 0.8, class 2 keeps 0.95 and 0.3; then all sorted by score
    assert [round(s, 2) for s in dets.scores.tolist()] == [0.95, 0.9, 0.8, 0.3]
    assert dets.labels.tolist() == [2, 1, 1, 2]
    assert dets.boxes[:, 0].tolist() == [20.0, 0.0, 20.0, 60.0]
    # before NMS, as rcnn_test.m: a suppressed box still used up a place of its class
    overlapping = [[0, 0, 10, 10], [0, 0, 10, 11], [40, 0, 50, 10]]  # box 1 overlaps box 0 (IoU 10/11)
    out = _out(overlapping, [[0.9], [0.8], [0.7]])
    assert postprocess(out, 100, 100, per_class_top_k=2).scores.tolist() == pytest.approx([0.9])
    assert postprocess(out, 100, 100, per_class_top_k=0).scores.tolist() == pytest.approx([0.9, 0.7])
    # the global cap applies after NMS, over all classes; 0 = no cap
    assert postprocess(out, 100, 100, detections_per_image=1).scores.tolist() == pytest.approx([0.9])
    many = _out([[i * 12, 0, i * 12 + 10, 10] for i in range(8)], [[0.5 + i / 100] for i in range(8)])
    assert len(postprocess(many, 100, 100, detections_per_image=0)) == 8
    assert len(postprocess(many, 100, 100, detections_per_image=0, per_class_top_k=3)) == 3
