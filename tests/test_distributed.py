"""``detect`` under torchrun: 2 gloo ranks on the CPU against single-process runs.

Each test launches ``python -m torch.distributed.run --nproc_per_node=2 --master_port=<free>
-m detect ...`` (OMP_NUM_THREADS=1) and compares with the same command in one process:

- Fast R-CNN: 2 ranks x 1 image per batch see the global batches of 1 process x 2 images, so
  their weights agree to float rounding (all-reduced gradients sum in another order; the bound
  is 1e-5 of each tensor's largest value) and so do the logged losses (the mean over ranks). A
  2-rank run resumed by 1 process reaches the single-process weights: checkpoints hold no rank
  state and batches depend only on (seed, iteration, global batch). Dropout is 0 in these
  configs (each process draws its own masks).
- evaluation at the end of that training gathers every rank's detections: detections.json is
  byte-identical to a single-process ``detect eval`` of the same checkpoint, metrics equal.
- ``detect propose``: byte-identical stores from torchrun, one process, and ``--shard i/N`` runs.
- ``detect predict``: ranks split the images; merged outputs byte-identical to one process.
- R-CNN: all four stages under torchrun (fine-tuning with DDP, features split by rank, SVMs and
  box regression on rank 0 while rank 1 waits).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import (frcn_config, make_square_dataset, max_weight_difference, model_weights, rcnn_config,
                           run_ok, store_bytes, torchrun_cmd, write_config)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("one_thread"),  # in-process runs use one thread, as each rank does
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="needs torch.distributed with gloo"),
]

WEIGHT_TOLERANCE = 1e-5  # max |difference| / max |weight|, per tensor
PROPOSE_OVERRIDES = ["proposals.resize=160", "proposals.resize_side=longer", "proposals.min_size=8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_data")
    return {"root": root, "train": make_square_dataset(root, num_images=4, name="train"),
            "val": make_square_dataset(root, num_images=3, name="val", seed=1)}


def _log(path) -> list[dict]:
    """The logged iterations, without the train loop's resume records."""
    return [r for r in map(json.loads, path.read_text().splitlines()) if "resumed_from" not in r]


@pytest.fixture(scope="module")
def frcn_runs(data, tmp_path_factory, one_thread):
    """single: 1 process x 2 images, 6 iterations (checkpoints at 3 and 6). torchrun: 2 ranks x 1
    image, 3 iterations, then evaluated on val by both ranks."""
    from detect.cli import main

    root = tmp_path_factory.mktemp("frcn_runs")
    single_cfg = write_config(root / "single.yaml", frcn_config(data["train"], None, images_per_batch=2,
                                                               max_iter=6, checkpoint_period=3))
    dist_cfg = write_config(root / "dist.yaml", frcn_config(data["train"], data["val"], images_per_batch=1,
                                                           max_iter=3, checkpoint_period=3))
    assert main(["train", "--config", str(single_cfg), "--output-dir", str(root / "single"), "--device", "cpu"]) == 0
    run_ok(torchrun_cmd("train", "--config", str(dist_cfg), "--output-dir", str(root / "dist"), "--device", "cpu"))
    return {"root": root, "single": root / "single", "dist": root / "dist", "single_cfg": single_cfg}


def test_two_ranks_train_the_weights_of_one_process_with_the_same_global_batch(frcn_runs):
    single = model_weights(frcn_runs["single"] / "checkpoints" / "iter_0000003.pt")
    dist = model_weights(frcn_runs["dist"] / "model_final.pt")
    assert max_weight_difference(single, dist) < WEIGHT_TOLERANCE
    # The weights moved (the test could fail): three SGD steps change them far beyond the tolerance.
    from detect.common.checkpoints import load_checkpoint

    assert load_checkpoint(frcn_runs["single"] / "checkpoints" / "iter_0000003.pt")["iteration"] == 3
    assert max_weight_difference(single, model_weights(frcn_runs["single"] / "model_final.pt")) > 1e-3
    # Only rank 0 logs, and it logs the global batch's loss (the mean over ranks).
    dist_log, single_log = _log(frcn_runs["dist"] / "log.jsonl"), _log(frcn_runs["single"] / "log.jsonl")
    assert [r["iteration"] for r in dist_log] == [1, 2, 3]
    for d, s in zip(dist_log, single_log):
        assert d["loss"] == pytest.approx(s["loss"], rel=1e-5)
        assert d["loss_box"] == pytest.approx(s["loss_box"], rel=1e-4, abs=1e-7)


def test_a_two_rank_run_resumed_by_one_process_continues_exactly(frcn_runs, tmp_path, capsys):
    from detect.cli import main

    resumed = tmp_path / "resumed"
    shutil.copytree(frcn_runs["dist"], resumed)
    argv = ["train", "--config", str(frcn_runs["single_cfg"]), "--output-dir", str(resumed), "--device", "cpu",
            "--resume"]
    assert main(argv) == 0
    assert "at iteration 3" in capsys.readouterr().out
    assert [r["iteration"] for r in _log(resumed / "log.jsonl")] == [1, 2, 3, 4, 5, 6]
    reference = model_weights(frcn_runs["single"] / "model_final.pt")
    assert max_weight_difference(reference, model_weights(resumed / "model_final.pt")) < WEIGHT_TOLERANCE


def test_distributed_evaluation_equals_single_process_evaluation(frcn_runs, data, tmp_path):
    from detect.cli import main

    json_path, images, store = data["val"]
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(frcn_runs["dist"] / "model_final.pt"), "--data", str(json_path),
                 "--images", str(images), "--proposals", str(store), "--output-dir", str(out),
                 "--device", "cpu"]) == 0
    dist_detections = (frcn_runs["dist"] / "detections.json").read_bytes()
    assert dist_detections == (out / "detections.json").read_bytes()
    assert {d["image_id"] for d in json.loads(dist_detections)} == {1, 2, 3}  # both ranks' images
    dist_metrics = json.loads((frcn_runs["dist"] / "metrics.json").read_text())
    single_metrics = json.loads((out / "metrics.json").read_text())
    for key in ("coco", "per_class_AP", "per_class_AP50", "num_images", "proposal_recall"):
        assert dist_metrics[key] == single_metrics[key], key


def test_propose_under_torchrun_and_with_shards_gives_the_single_process_store(synthetic_dir, tmp_path,
                                                                              monkeypatch, capsys):
    from detect.cli import main

    monkeypatch.setenv("DETECT_PROPOSAL_CHUNK", "1")  # 4 images, 4 chunks: 2 per rank
    argv = ["propose", "--data", str(synthetic_dir / "val.json"), "--workers", "1", *PROPOSE_OVERRIDES]
    assert main([*argv, "--out", str(tmp_path / "single")]) == 0
    for shard in ("1/2", "0/2"):  # a job array: the last shard to finish merges
        assert main([*argv, "--out", str(tmp_path / "sharded"), "--shard", shard]) == 0
    assert "other shards' work" in capsys.readouterr().err
    run_ok(torchrun_cmd(*argv, "--out", str(tmp_path / "torchrun")), DETECT_PROPOSAL_CHUNK="1")
    reference = store_bytes(tmp_path / "single")
    assert len(reference) == 4
    assert store_bytes(tmp_path / "sharded") == reference
    assert store_bytes(tmp_path / "torchrun") == reference
    assert not (tmp_path / "torchrun.partial").exists()


def test_predict_under_torchrun_splits_images_and_merges_identical_outputs(frcn_runs, data, tmp_path):
    from detect.cli import main

    checkpoint = frcn_runs["single"] / "model_final.pt"
    argv = ["predict", "--checkpoint", str(checkpoint), "--input", str(data["root"] / "images"),
            "--device", "cpu", "--workers", "1", "--score-threshold", "0.05"]
    assert main([*argv, "--output-dir", str(tmp_path / "single")]) == 0
    run_ok(torchrun_cmd(*argv, "--output-dir", str(tmp_path / "dist")))
    for name in ("detections.json", "detections.jsonl", "images.json", "errors.json"):
        assert (tmp_path / "dist" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
    summaries = [json.loads((tmp_path / "dist" / f"summary.rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["num_processed"] for s in summaries] == [4, 3]  # 7 images, i % 2 == rank
    assert len(json.loads((tmp_path / "single" / "images.json").read_text())) == 7


def test_rcnn_trains_all_stages_under_torchrun(data, tmp_path):
    from detect.common.checkpoints import load_checkpoint
    from detect.models.build import load_detector

    config = write_config(tmp_path / "rcnn.yaml", rcnn_config(data["train"]))  # evaluation: see Fast R-CNN
    out = tmp_path / "run"
    run_ok(torchrun_cmd("train", "--config", str(config), "--output-dir", str(out), "--device", "cpu"))
    for stage in ("finetune", "features", "svm", "bbox_reg"):
        assert (out / stage / "done").is_file(), stage
    assert [r["iteration"] for r in _log(out / "finetune" / "log.jsonl")] == [1, 2, 3, 4]  # rank 0 only
    assert load_checkpoint(out / "model_final.pt")["kind"] == "rcnn"
    assert load_detector(out / "model_final.pt", "cpu").num_classes == 2
