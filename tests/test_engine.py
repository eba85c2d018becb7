"""The training loop: exact resume, the non-finite guard, safe checkpoint loading, the LR."""

from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from detect.common import checkpoints, runtime
from detect.training import engine


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1))


def _step_fn(nan_at: int | None = None):
    def step(model: nn.Module, iteration: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + iteration)  # the batch of this iteration
        x = torch.randn(8, 4, generator=g)
        y = x.sum(dim=1, keepdim=True)
        loss = ((model(x) - y) ** 2).mean()
        if nan_at is not None and iteration == nan_at:
            loss = loss * float("nan")
        return {"loss_mse": loss}
    return step


def _train(out, max_iter, resume=False, nan_at=None, period=3):
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return engine.train_loop(model=model, step_fn=_step_fn(nan_at), optimizer=opt,
                             lr_at=engine.step_lr(0.01, [7], 0.1, 2, 0.1), max_iter=max_iter,
                             output_dir=out, checkpoint_period=period, log_period=2, resume=resume)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    straight = _train(tmp_path / "a", 10)
    _train(tmp_path / "b", 6)  # "killed" after the checkpoint at iteration 6
    resumed = _train(tmp_path / "b", 10, resume=True)
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k  # dropout masks and momentum included
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [2, 4, 6, 6, 8, 10]  # the resume is logged at its checkpoint
    assert log[3]["resumed_from"].endswith("iter_0000006.pt") and "loss" not in log[3]


def test_existing_checkpoints_need_resume(tmp_path):
    _train(tmp_path, 3)
    with pytest.raises(ValueError, match="--resume"):
        _train(tmp_path, 6)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match="iteration 7.*iter_0000006.pt"):
        _train(tmp_path, 10, nan_at=7)
    last = checkpoints.last_checkpoint(tmp_path)
    assert last.name == "iter_0000006.pt"
    state = checkpoints.load_checkpoint(last)
    assert state["iteration"] == 6 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_step_lr_warmup_and_steps():
    lr_at = engine.step_lr(0.1, [10, 20], gamma=0.1, warmup_iters=4, warmup_factor=0.5)
    assert lr_at(0) == pytest.approx(0.05)
    assert lr_at(2) == pytest.approx(0.075)
    assert lr_at(4) == pytest.approx(0.1)
    assert lr_at(10) == pytest.approx(0.01)
    assert lr_at(25) == pytest.approx(0.001)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARKER']}",))


def test_a_crafted_pickle_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    bad = tmp_path / "model.pt"
    with open(bad, "wb") as f:
        pickle.dump({"format": "detect-detector", "x": _Evil()}, f)
    with pytest.raises(ValueError, match="model.pt: not a loadable checkpoint"):
        checkpoints.load_checkpoint(bad)
    torch.save({"format": "detect-detector", "x": _Evil()}, tmp_path / "evil2.pt")
    with pytest.raises(ValueError, match="evil2.pt"):
        checkpoints.load_checkpoint(tmp_path / "evil2.pt")
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a checkpoint at all")
    with pytest.raises(ValueError, match="junk.pt"):
        checkpoints.load_checkpoint(junk)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not a detect checkpoint"):
        checkpoints.load_checkpoint(tmp_path / "other.pt")


def test_each_rank_resumes_its_own_random_state():
    """Rank 0 saves every rank's state (gather_rng_states); rank r restores entry r, and a
    checkpoint from another world size falls back to rank 0's with a warning."""
    states, draws = [], []
    for rank in range(2):  # a fake world of two ranks, seeded seed + rank as training does
        runtime.seed_everything(5 + rank)
        states.append(runtime.rng_state())
        draws.append((torch.rand(3), np.random.rand(), random.random()))
    assert not torch.equal(draws[0][0], draws[1][0])  # dropout masks differ per rank
    for rank in (1, 0):
        runtime.set_rng_state(runtime.rng_state_of_rank(states, rank, 2))
        assert torch.equal(torch.rand(3), draws[rank][0])
        assert np.random.rand() == draws[rank][1] and random.random() == draws[rank][2]
    with pytest.warns(UserWarning, match="written by 2"):
        runtime.set_rng_state(runtime.rng_state_of_rank(states, 2, 3))
    assert torch.equal(torch.rand(3), draws[0][0])
    assert len(runtime.gather_rng_states()) == 1  # no process group: this process alone


def test_checkpoints_hold_one_random_state_per_rank(tmp_path):
    _train(tmp_path, 3)
    saved = checkpoints.load_checkpoint(tmp_path / "checkpoints" / "iter_0000003.pt")["rng"]
    assert isinstance(saved, list) and len(saved) == 1 and set(saved[0]) >= {"torch", "numpy", "python"}


def _gloo_rank(rank: int, init_file: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    runtime.seed_everything(11 + rank)
    states = runtime.gather_rng_states()
    if rank == 0:
        torch.save(states, os.path.join(out, "states.pt"))
    torch.save(torch.rand(4), os.path.join(out, f"draw{rank}.pt"))
    torch.distributed.barrier()
    torch.manual_seed(999)  # "killed"; the resumed rank restores its own entry
    saved = torch.load(os.path.join(out, "states.pt"), weights_only=False)
    runtime.set_rng_state(runtime.rng_state_of_rank(saved, rank, 2))
    torch.save(torch.rand(4), os.path.join(out, f"resumed{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_gather_and_restore_their_own_states(tmp_path):
    torch.multiprocessing.spawn(_gloo_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    draws = [torch.load(tmp_path / f"draw{r}.pt") for r in range(2)]
    assert not torch.equal(draws[0], draws[1])
    for r in range(2):
        assert torch.equal(torch.load(tmp_path / f"resumed{r}.pt"), draws[r])
