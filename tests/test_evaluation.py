"""detect.evaluation: COCO metrics through pycocotools, with its known traps pinned."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from detect.data.datasets import Dataset, ImageRecord
from detect.models.detector import Detections
from detect.evaluation.coco import COCO_KEYS as SUMMARY_KEYS
from detect.evaluation.coco import coco_results, evaluate_coco, evaluate_detections, format_metrics_table

def _gt(annotations, *, num_images=2, categories=((3, "cat"), (7, "dog"))) -> dict:
    """COCO gt dict; ``annotations`` are (image_id, category_id, [x, y, w, h]), ids from 1."""
    return {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 200}
                   for i in range(1, num_images + 1)],
        "annotations": [{"id": n + 1, "image_id": img, "category_id": cat, "bbox": list(bbox),
                         "area": bbox[2] * bbox[3], "iscrowd": 0}
                        for n, (img, cat, bbox) in enumerate(annotations)],
        "categories": [{"id": cid, "name": name} for cid, name in categories],
    }


# small (< 32^2), medium and large boxes of both (non-contiguous) categories on two images
GT_BOXES = [(1, 3, [10, 10, 20, 20]), (1, 7, [50, 40, 60, 50]), (1, 3, [100, 20, 99, 150]),
            (2, 7, [5, 5, 25, 15]), (2, 3, [30, 60, 120, 130])]


def _perfect_results(gt: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": 1.0} for a in gt["annotations"]]


def test_perfect_results_score_one():
    gt = _gt(GT_BOXES)
    metrics = evaluate_coco(gt, _perfect_results(gt))
    for key in SUMMARY_KEYS:  # every area range has ground truth here
        if key != "AR1":
            assert metrics[key] == pytest.approx(1.0), key
    # AR1 keeps 1 detection per image and class: image 1 has 2 cats, so cat recall is 2/3
    assert metrics["AR1"] == pytest.approx((2 / 3 + 1) / 2)
    assert metrics["per_class_AP"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    assert metrics["per_class_AP50"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    curves = metrics["pr_curve_50"]
    assert len(curves["recall"]) == 101
    assert curves["recall"][0] == 0.0 and curves["recall"][-1] == 1.0
    assert set(curves["precision"]) == {"all", "cat", "dog"}
    assert curves["precision"]["all"] == pytest.approx([1.0] * 101)
    assert metrics["num_images"] == 2 and metrics["num_detections"] == 5
    json.dumps(metrics, allow_nan=False)  # plain JSON-able numbers


def test_hand_computed_ap50():
    # One image, two gt boxes of one class. Detections, best score first:
    #   d1 score 0.9, IoU 0.9 with gt A -> TP: precision 1/1, recall 1/2
    #   d2 score 0.8, overlaps nothing  -> FP: precision 1/2, recall 1/2
    #   d3 score 0.7, equal to gt B     -> TP: precision 2/3, recall 2/2
    # COCO interpolates precision as the best precision at any recall >= r, sampled at the
    # 101 recall points r = 0.00, 0.01, ..., 1.00:
    #   r <= 0.5 (51 points): max(1, 1/2, 2/3) = 1;  r > 0.5 (50 points): 2/3.
    expected_ap50 = (51 * 1.0 + 50 * (2.0 / 3.0)) / 101
    gt = _gt([(1, 3, [10, 10, 40, 40]), (1, 3, [60, 60, 30, 30])], num_images=1,
             categories=[(3, "cat")])
    results = [{"image_id": 1, "category_id": 3, "bbox": [10, 10, 40, 36], "score": 0.9},
               {"image_id": 1, "category_id": 3, "bbox": [0, 150, 20, 20], "score": 0.8},
               {"image_id": 1, "category_id": 3, "bbox": [60, 60, 30, 30], "score": 0.7}]
    metrics = evaluate_coco(gt, results)
    assert metrics["AP50"] == pytest.approx(expected_ap50, abs=1e-6)
    assert metrics["AP75"] == pytest.approx(expected_ap50, abs=1e-6)  # both TPs have IoU >= 0.9
    assert metrics["per_class_AP50"]["cat"] == pytest.approx(expected_ap50, abs=1e-6)
    curve = metrics["pr_curve_50"]["precision"]["cat"]
    assert curve == pytest.approx([1.0] * 51 + [2.0 / 3.0] * 50)
    assert metrics["pr_curve_50"]["precision"]["all"] == pytest.approx(curve)
    assert metrics["AR100"] == pytest.approx(np.mean([1.0] * 9 + [0.5]))  # d1 misses IoU 0.95


def _dataset() -> Dataset:
    """Two images, classes 1 = cat (category id 3) and 2 = dog (category id 7)."""
    records = [ImageRecord(image_id=img, file_name=f"/nowhere/{img}.jpg", width=200, height=200)
               for img in (1, 2)]
    for img, cat, (x, y, w, h) in GT_BOXES:
        rec = records[img - 1]
        rec.gt_boxes = np.concatenate([rec.gt_boxes, np.float32([[x, y, x + w, y + h]])])
        rec.gt_classes = np.append(rec.gt_classes, {3: 1, 7: 2}[cat])
        rec.gt_difficult = np.append(rec.gt_difficult, False)
    return Dataset(name="tiny", records=records, class_names=["cat", "dog"], category_ids=[3, 7])


def _perfect_detections(dataset: Dataset) -> dict[int, Detections]:
    return {r.image_id: Detections(torch.as_tensor(r.gt_boxes), torch.ones(len(r.gt_boxes)),
                                   torch.as_tensor(r.gt_classes, dtype=torch.int64))
            for r in dataset.records}


def test_coco_results_maps_non_contiguous_category_ids_and_converts_to_xywh():
    dataset = _dataset()
    results = coco_results(dataset, _perfect_detections(dataset))
    expected = sorted((img, cat, bbox) for img, cat, bbox in GT_BOXES)
    got = sorted((r["image_id"], r["category_id"], r["bbox"]) for r in results)
    assert got == [(img, cat, [float(v) for v in bbox]) for img, cat, bbox in expected]
    metrics = evaluate_coco(_gt(GT_BOXES), results)
    assert metrics["per_class_AP"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}


@pytest.mark.parametrize("bad_label", [0, 3])
def test_coco_results_rejects_class_index_out_of_range(bad_label):
    dataset = _dataset()
    dets = {1: Detections(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([0.5]),
                          torch.tensor([bad_label]))}
    with pytest.raises(ValueError, match=f"class index {bad_label} is out of range 1..2"):
        coco_results(dataset, dets)


def test_coco_results_rejects_unknown_image_and_non_finite_boxes():
    dataset = _dataset()
    det = Detections(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([0.5]), torch.tensor([1]))
    with pytest.raises(ValueError, match="image id 99"):
        coco_results(dataset, {99: det})
    det.boxes[0, 2] = float("nan")
    with pytest.raises(ValueError, match="image 1: detection 0 has a non-finite"):
        coco_results(dataset, {1: det})


def test_detections_on_an_image_without_ground_truth_are_false_positives():
    # Image 2 has no ground truth. Ranked: FP on image 2 (0.9), TP on image 1 (0.5):
    # precision 0 then 1/2 at recall 1, so the interpolated precision is 1/2 everywhere.
    gt = _gt([(1, 3, [10, 10, 40, 40])], num_images=2, categories=[(3, "cat")])
    results = [{"image_id": 2, "category_id": 3, "bbox": [10, 10, 40, 40], "score": 0.9},
               {"image_id": 1, "category_id": 3, "bbox": [10, 10, 40, 40], "score": 0.5}]
    metrics = evaluate_coco(gt, results)
    assert metrics["AP50"] == pytest.approx(0.5)
    assert metrics["num_images"] == 2


@pytest.mark.parametrize("ids", [[0, 1, 2, 3, 4], [5, 5, 6, 7, 8]], ids=["from-0", "repeated"])
def test_annotation_ids_from_zero_or_repeated_are_renumbered(ids):
    gt = _gt(GT_BOXES)
    for ann, new_id in zip(gt["annotations"], ids):
        ann["id"] = new_id
    before = copy.deepcopy(gt)
    results = _perfect_results(gt)
    metrics = evaluate_coco(gt, results)
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["per_class_AP"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    assert gt == before  # the caller's dict is not re-numbered or annotated by pycocotools
    assert all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in results)


def test_empty_results_score_zero(tmp_path):
    gt = _gt(GT_BOXES)
    path = tmp_path / "results.json"
    path.write_text("[]")
    for results in ([], path, str(path)):
        metrics = evaluate_coco(gt, results)
        for key in SUMMARY_KEYS:
            assert metrics[key] == 0.0, key
        assert metrics["per_class_AP"] == {"cat": 0.0, "dog": 0.0}
        assert metrics["num_detections"] == 0


def test_ground_truth_and_results_from_files(tmp_path):
    gt = _gt(GT_BOXES)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(_perfect_results(gt)))
    metrics = evaluate_coco(tmp_path / "gt.json", str(tmp_path / "res.json"))
    assert metrics["AP"] == pytest.approx(1.0)


def test_bad_results_raise_value_errors_naming_the_file_or_entry(tmp_path):
    gt = _gt(GT_BOXES)
    bad_json = tmp_path / "broken.json"
    bad_json.write_text('[{"image_id": 1,')
    with pytest.raises(ValueError, match="broken.json: malformed JSON"):
        evaluate_coco(gt, bad_json)
    good = {"image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.5}
    cases = [({**good, "image_id": 42}, "entry 1: image_id 42 is not an image"),
             ({**good, "category_id": 4}, "entry 1: category_id 4 is not a category"),
             ({**good, "bbox": [0, 0, 5]}, "entry 1: 'bbox' must be 4 finite numbers"),
             ({**good, "score": float("nan")}, "entry 1: 'score' must be a finite number")]
    for entry, message in cases:
        with pytest.raises(ValueError, match=message):
            evaluate_coco(gt, [good, entry])
    with pytest.raises(ValueError, match="looks like a ground-truth file"):
        evaluate_coco(gt, gt)
    with pytest.raises(ValueError, match=r"annotations\[0\]: category_id 9"):
        evaluate_coco(_gt([(1, 9, [0, 0, 5, 5])]), [])


def test_pycocotools_prints_nothing_and_the_log_gets_it(tmp_path, capsys):
    gt = _gt(GT_BOXES)
    evaluate_coco(gt, _perfect_results(gt), log_path=tmp_path / "coco_eval.log")
    evaluate_coco(gt, [])
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in (tmp_path / "coco_eval.log").read_text()


def test_metrics_table_prints_percent_and_n_a():
    gt = _gt([(1, 3, [10, 10, 40, 40])], categories=[(3, "cat"), (7, "dog")])  # no dog, no small
    metrics = evaluate_coco(gt, _perfect_results(gt))
    assert metrics["APs"] == -1.0 and metrics["per_class_AP"]["dog"] == -1.0
    assert metrics["pr_curve_50"]["precision"]["all"] == pytest.approx([1.0] * 101)  # dog left out
    lines = format_metrics_table(metrics).splitlines()
    assert lines[1].split() == list(SUMMARY_KEYS)
    assert lines[2].split() == ["100.0", "100.0", "100.0", "n/a", "100.0", "n/a",
                                "100.0", "100.0", "100.0"]
    assert lines[-2].split() == ["cat", "100.0", "100.0"]
    assert lines[-1].split() == ["dog", "n/a", "n/a"]


def test_evaluate_detections_in_memory():
    dataset = _dataset()
    detections = _perfect_detections(dataset)
    assert evaluate_detections(dataset, detections)["AP"] == pytest.approx(1.0)
    del detections[2]  # an image without detections: its objects are missed
    metrics = evaluate_detections(dataset, detections)
    # one of two dogs found: precision 1 up to recall 0.5 (51 of 101 points), then 0
    assert metrics["per_class_AP"]["dog"] == pytest.approx(51 / 101)
    assert metrics["num_images"] == 2


def test_evaluate_detections_ignores_difficult_boxes():
    dataset = _dataset()
    detections = _perfect_detections(dataset)
    record = dataset.records[1]  # add a difficult dog, with no detection on it
    record.gt_boxes = np.concatenate([record.gt_boxes, np.float32([[150, 150, 190, 190]])])
    record.gt_classes = np.append(record.gt_classes, 2)
    record.gt_difficult = np.append(record.gt_difficult, True)
    assert evaluate_detections(dataset, detections)["per_class_AP"]["dog"] == pytest.approx(1.0)
    # a confident detection on the difficult box is neither a true nor a false positive
    dets = detections[2]
    detections[2] = Detections(torch.cat([dets.boxes, torch.tensor([[150.0, 150, 190, 190]])]),
                               torch.cat([dets.scores, torch.tensor([2.0])]),
                               torch.cat([dets.labels, torch.tensor([2])]))
    assert evaluate_detections(dataset, detections)["per_class_AP"]["dog"] == pytest.approx(1.0)


def test_cli_eval_needs_exactly_one_of_results_and_checkpoint(capsys):
    from detect.cli import main

    assert main(["eval", "--data", "gt.json"]) == 2
    assert main(["eval", "--data", "gt.json", "--results", "r.json", "--checkpoint", "c.pt"]) == 2
    assert "exactly one of --results" in capsys.readouterr().err


def test_cli_eval_scores_a_results_file(tmp_path, capsys):
    from detect.cli import main

    gt = _gt(GT_BOXES)
    gt_path = tmp_path / "instances.json"
    gt_path.write_text(json.dumps(gt))
    results_path = tmp_path / "run" / "results.json"
    results_path.parent.mkdir()
    results_path.write_text(json.dumps(_perfect_results(gt)))
    assert main(["eval", "--data", str(gt_path), "--results", str(results_path)]) == 0
    assert "100.0" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["AP"] == pytest.approx(1.0) and metrics["num_images"] == 2
    assert metrics["voc07"]["mAP"] == pytest.approx(1.0) and metrics["voc"]["mAP"] == pytest.approx(1.0)
    assert main(["eval", "--data", str(gt_path), "--results", str(results_path), "--metric", "voc07"]) == 0
    assert "VOC2007 11-point AP" in capsys.readouterr().out
    assert "Average Precision" in (tmp_path / "run" / "coco_eval.log").read_text()

    # --limit 1 scores image 1 only; results for image 2 are set aside, not an error
    out = tmp_path / "limited"
    assert main(["eval", "--data", str(gt_path), "--results", str(results_path), "--limit", "1",
                 "--output-dir", str(out)]) == 0
    limited = json.loads((out / "metrics.json").read_text())
    assert limited["num_images"] == 1 and limited["num_detections"] == 3
    assert limited["AP"] == pytest.approx(1.0)

    results_path.write_text('[{"image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1},'
                            ' {"image_id": 5, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1}]')
    assert main(["eval", "--data", str(gt_path), "--results", str(results_path)]) == 2
    assert f"{results_path}: entry 1: image_id 5" in capsys.readouterr().err


def test_print_metrics_prints_the_table_and_the_test_time_once(capsys):
    from detect.evaluation.run import print_metrics

    gt = _gt(GT_BOXES)
    flat = evaluate_coco(gt, _perfect_results(gt))  # a scored results file: COCO numbers at the top
    run = {"coco": {k: flat[k] for k in SUMMARY_KEYS}, "voc": {"mAP": 1.0, "per_class_AP": {"cat": 1.0}},
           **{k: flat[k] for k in ("per_class_AP", "per_class_AP50", "num_images", "num_detections")},
           "timing_ms_per_image": {"backbone": 2.0}, "images_per_second": 5.0, "device": "cpu",
           "skipped_images": [{"file": "bad.png", "reason": "not an image"}]}
    for metric, table in (("coco", "COCO box metrics"), ("voc", "VOC2010+ all-point AP")):
        print_metrics(run, metric)
        out = capsys.readouterr().out
        assert out.count(table) == 1 and out.count("test time (ms/image): backbone 2.0") == 1
        assert "skipped 1 unreadable image(s), scored with no detections: bad.png" in out
    print_metrics(flat)
    out = capsys.readouterr().out
    assert "100.0" in out and "test time" not in out


def test_numpy_only_modules_do_not_import_torch():
    """The proposal workers, `detect recall` and the tuner start without torch (detect.common.box_ops)."""
    modules = ("detect.proposals.batch, detect.evaluation.recall, detect.evaluation.matching, "
               "detect.evaluation.proposal_tuning")
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
