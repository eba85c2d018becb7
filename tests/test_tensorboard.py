"""TensorBoard event files of `detect train` (detect/training/tensorboard_log.py), read back with
tensorboard's own reader; and the run without the package. The reading tests skip where
tensorboard is not installed (it is the optional extra `.[tb]`, which `.[dev]` pulls in)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import frcn_config, make_square_dataset
from torch import nn

from detect.commands import train_from_config
from detect.common.config import from_dict
from detect.training import engine, tensorboard_log


def _scalars(tb_dir) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of every event file in ``tb_dir`` (tensorboard's EventAccumulator,
    which drops the events a purge_step hides)."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(tb_dir))
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step twice: {steps}"
        out[tag] = {e.step: e.value for e in events}
    return out


def test_fast_rcnn_training_logs_under_detectron2s_tags(tmp_path):
    pytest.importorskip("tensorboard")
    train = make_square_dataset(tmp_path / "data", num_images=2, name="train")
    val = make_square_dataset(tmp_path / "data", num_images=2, name="val", seed=1)
    cfg = from_dict(frcn_config(train, val, max_iter=4, checkpoint_period=4, eval_period=2))
    train_from_config(cfg, tmp_path / "run", progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    scalars = _scalars(tmp_path / "run" / "tb")
    assert {"total_loss", "loss_cls", "loss_box_reg", "lr", "time", "eta_seconds", "max_mem_mb",
            "bbox/AP", "bbox/AP50"} <= set(scalars)
    for record in log:
        step = record["iteration"]
        if "eval" in record:
            assert scalars["bbox/AP50"][step] == pytest.approx(100 * record["eval"]["AP50"], abs=1e-4)
            continue
        assert scalars["total_loss"][step] == pytest.approx(record["loss"], rel=1e-6)
        assert scalars["loss_box_reg"][step] == pytest.approx(record["loss_box"], rel=1e-6)
        assert scalars["lr"][step] == pytest.approx(record["lr"], rel=1e-6)
        assert scalars["eta_seconds"][step] == pytest.approx(record["time_per_iter_s"] * (4 - step), rel=1e-5)
    assert sorted(scalars["total_loss"]) == [r["iteration"] for r in log if "eval" not in r]


def _toy_train(out, max_iter, *, resume=False, nan_at=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def step(m, iteration):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(iteration))
        loss = ((m(x) - x.sum(dim=1, keepdim=True)) ** 2).mean()
        return {"loss_mse": loss * float("nan") if iteration == nan_at else loss}

    engine.train_loop(model=model, step_fn=step, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                      lr_at=lambda it: 0.01, max_iter=max_iter, output_dir=out, checkpoint_period=3,
                      log_period=2, resume=resume)


def test_a_resumed_run_hides_what_the_killed_run_logged_after_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    with pytest.raises(FloatingPointError):
        _toy_train(tmp_path, 10, nan_at=8)  # logged 2, 4, 6, 8; last checkpoint at 6
    _toy_train(tmp_path, 10, resume=True)  # from 6: logs 8 again, and 10
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [2, 4, 6, 8, 6, 8, 10]
    assert log[4]["resumed_from"].endswith("iter_0000006.pt") and "loss_mse" not in log[4]
    losses = _scalars(tmp_path / "tb")["loss_mse"]  # keys without a detectron2 name are kept
    assert sorted(losses) == [2, 4, 6, 8, 10]
    assert losses[8] == pytest.approx(log[5]["loss_mse"], rel=1e-6)  # the resumed run's value


def test_without_tensorboard_a_run_says_so_once_and_writes_no_events(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tensorboard_log, "SummaryWriter", None)
    monkeypatch.setattr(tensorboard_log, "_said_off", False)
    _toy_train(tmp_path / "a", 4)
    _toy_train(tmp_path / "b", 4)
    err = capsys.readouterr().err
    assert err.count("TensorBoard logging is off") == 1 and "pip install" in err
    assert not (tmp_path / "a" / "tb").exists() and (tmp_path / "a" / "log.jsonl").is_file()
    tensorboard_log.log_final_eval(tmp_path / "a" / "tb", 4, {"coco": {"AP": 0.5, "AP50": 0.7}})
    assert not (tmp_path / "a" / "tb").exists()
