"""The training loop: one plain function for Fast R-CNN training and R-CNN fine-tuning.

It imports no detector: the caller's ``step_fn(model, iteration) -> losses`` builds the
mini-batch of that iteration from (seed, iteration), so a resumed run sees the same batches
with no sampler state. The loop does mixed precision on CUDA, the non-finite-loss guard, the
learning rate, JSON-lines logs (and TensorBoard), atomic checkpoints, exact resume and
periodic evaluation. Under ``torchrun`` the model is wrapped in DistributedDataParallel, only
rank 0 writes, and ``step_fn`` gives each rank its own share of the batch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from detect.common.checkpoints import (FORMAT_VERSION, TRAIN_FORMAT, last_checkpoint, load_checkpoint,
                                       save_checkpoint)
from detect.common.fileio import append_jsonl, write_text_atomic
from detect.common.runtime import (autocast_dtype, barrier, peak_memory_mb, rank_and_world, reset_peak_memory,
                                   gather_rng_states, rng_state_of_rank, set_rng_state)
from detect.training.tensorboard_log import open_tensorboard


def step_lr(base_lr: float, steps: list[int], gamma: float = 0.1, warmup_iters: int = 0,
            warmup_factor: float = 0.001) -> Callable[[int], float]:
    """Linear warm-up from ``base_lr * warmup_factor``, then x``gamma`` at each of ``steps``."""
    def lr_at(iteration: int) -> float:
        lr = base_lr * gamma ** sum(1 for s in steps if iteration >= s)
        if iteration < warmup_iters:
            alpha = iteration / warmup_iters
            lr *= warmup_factor * (1 - alpha) + alpha
        return lr

    return lr_at


def train_loop(*, model: nn.Module, step_fn: Callable[[nn.Module, int], dict[str, Tensor]],
               optimizer: torch.optim.Optimizer, lr_at: Callable[[int], float], max_iter: int,
               output_dir: str | Path, checkpoint_period: int, log_period: int = 20,
               amp: bool = True, device: torch.device = torch.device("cpu"),
               checkpoint_extra: dict | None = None, resume: bool = False,
               eval_fn: Callable[[nn.Module, int], dict] | None = None, eval_period: int = 0,
               keep_checkpoints: int = 2, desc: str = "train", tb_dir: str | Path | None = None) -> nn.Module:
    """Run ``step_fn`` from the last checkpoint (``resume``) or iteration 0 up to ``max_iter``.

    ``step_fn(model, iteration)`` returns a dict of scalar losses; their sum is minimised, each
    param group at ``lr_at(iteration)`` times its ``lr_scale``. A non-finite loss raises
    ``FloatingPointError`` (the newest checkpoint on disk is the last good one). TensorBoard
    scalars go to ``tb_dir`` (default ``output_dir/tb``).
    """
    output_dir = Path(output_dir)
    ckpt_dir = output_dir / "checkpoints"
    rank, world = rank_and_world()
    main = rank == 0
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(".*.tmp"):  # a checkpoint write cut short by a kill (atomic_path's)
            stale.unlink(missing_ok=True)
    model.to(device)

    use_amp = amp and device.type == "cuda"
    amp_dtype = autocast_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    start_iter, log_path = 0, output_dir / "log.jsonl"
    prev = last_checkpoint(output_dir)
    if prev is not None and not resume:
        raise ValueError(f"{output_dir}: holds checkpoints already ({prev.name}); pass --resume to "
                         "continue, or choose another --output-dir")
    if prev is not None:
        state = load_checkpoint(prev)
        if state.get("format") != TRAIN_FORMAT:
            raise ValueError(f"{prev}: not a training checkpoint")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_iter = int(state["iteration"])
        set_rng_state(rng_state_of_rank(state["rng"], rank, world))
        if main:
            print(f"resuming from {prev} at iteration {start_iter}")
            append_jsonl(log_path, {"iteration": start_iter, "resumed_from": str(prev)})

    train_model = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    train_model.train()

    def save(iteration: int) -> None:
        rng = gather_rng_states()  # a collective, before rank 0 alone writes: [world] states by rank
        if not main:
            return
        name = f"iter_{iteration:07d}.pt"
        save_checkpoint(ckpt_dir / name, {
            "format": TRAIN_FORMAT, "version": FORMAT_VERSION, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "iteration": iteration,
            "rng": rng, "lr_schedule": {"lr": lr_at(iteration)}, "extra": checkpoint_extra or {},
        })
        write_text_atomic(ckpt_dir / "last", name + "\n")
        for p in sorted(ckpt_dir.glob("iter_*.pt"))[:-keep_checkpoints]:
            p.unlink(missing_ok=True)

    tb = open_tensorboard(tb_dir or output_dir / "tb", max_iter=max_iter, start_iter=start_iter) if main else None
    bar = tqdm(total=max_iter, initial=start_iter, desc=desc, unit="it", disable=not main, dynamic_ncols=True)
    t_last, window_losses = time.perf_counter(), []
    reset_peak_memory(device)  # CUDA's allocator peak, or the process's resident-memory peak on a CPU
    for iteration in range(start_iter, max_iter):
        lr = lr_at(iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
            losses = step_fn(train_model, iteration)
        loss = sum(losses.values())
        if not torch.isfinite(loss.detach()).all():
            good = last_checkpoint(output_dir)
            raise FloatingPointError(
                f"non-finite loss at iteration {iteration} ({ {k: float(v.detach()) for k, v in losses.items()} }); "
                f"training stopped; last good checkpoint: {good or 'none yet'}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        window_losses.append({k: float(v.detach()) for k, v in losses.items()})
        done = iteration + 1
        bar.update(1)
        if done % log_period == 0 or done == max_iter:
            now = time.perf_counter()
            names = list(window_losses[0])
            means = torch.tensor([sum(w[k] for w in window_losses) / len(window_losses) for k in names],
                                 dtype=torch.float64)  # [L] this rank's mean losses over the window
            if world > 1:  # log the global batch's losses (the mean over ranks), not rank 0's share
                means = means.to(device)
                torch.distributed.all_reduce(means)
                means = means.cpu() / world
            if main:
                record = {"iteration": done, "lr": lr, **{k: float(v) for k, v in zip(names, means)},
                          "loss": float(means.sum()), "time_per_iter_s": (now - t_last) / len(window_losses),
                          "max_mem_mb": peak_memory_mb(device)}
                append_jsonl(log_path, record)
                if tb is not None:
                    tb.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2g}")
            t_last, window_losses = now, []
        if done % checkpoint_period == 0 or done == max_iter:
            save(done)
        if eval_fn is not None and eval_period > 0 and done % eval_period == 0 and done != max_iter:
            model.eval()
            metrics = eval_fn(model, done)
            model.train()
            if main:
                append_jsonl(log_path, {"iteration": done, "eval": metrics})
                if tb is not None:
                    tb.write({"iteration": done, "eval": metrics})
        if done % checkpoint_period == 0:
            barrier()
    bar.close()
    if tb is not None:
        tb.close()
    return model
