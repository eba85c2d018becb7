"""``detect demo``: the whole story on the built-in synthetic dataset, resumable.

Each step (``demo_steps``) is a ``detect`` command line, printed as it runs, so the demo doubles
as a tour of the CLI; a step whose output is complete is skipped. It imports nothing of the
package: ``detect.cli`` hands it ``run_command`` (its own ``main``).
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Callable

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# Demo sizes: the whole story in under 30 minutes on 2 CPU cores (the configs' own schedules,
# those of the README's benchmark table, are halved here).
NUM_TRAIN, NUM_VAL, SEED = 80, 30, 0
NUM_PREDICT = 6
BENCH_WARMUP = 3  # val images run by `detect bench` but not counted
ABLATION_TOP_KS = (10, 30, 100)  # proposals per image of the ablation evaluations (the runs use 300)
DETECTORS = ("fast_rcnn", "rcnn")
SHORT_SCHEDULE = {  # (and Fast R-CNN's val AP every 100 iterations, for TensorBoard: RUN/tb/)
    "fast_rcnn": ["train.max_iter=300", "train.steps=[225]", "train.checkpoint_period=100",
                  "train.eval_period=100"],
    "rcnn": ["rcnn.ft_max_iter=100", "rcnn.ft_steps=[75]"],
}


def demo_steps(out: Path, device: str = "") -> list[tuple[list[str], Path | None]]:
    """The demo as (``detect`` argv, done-file or None) pairs; a step whose done-file exists is skipped."""
    data = out / "data"
    device_flag = ["--device", device] if device else []
    stores = {split: out / "proposals" / split for split in ("train", "val")}
    steps: list[tuple[list[str], Path | None]] = [
        (["make-synthetic", "--out", str(data), "--train", str(NUM_TRAIN), "--val", str(NUM_VAL),
          "--seed", str(SEED)], data / "val.json")]
    for split, store in stores.items():
        steps.append((["propose", "--data", str(data / f"{split}.json"), "--out", str(store),
                       "--config", str(CONFIGS / "fast_rcnn_synthetic_cpu.yaml")], store / "meta.json"))
    steps.append((["recall", "--data", str(data / "val.json"), "--proposals", str(stores["val"]),
                   "--out", str(out / "proposals" / "val_recall.json")], None))
    data_overrides = [f"data.train.path={data / 'train.json'}", f"data.val.path={data / 'val.json'}",
                      f"data.train_proposals={stores['train']}", f"data.val_proposals={stores['val']}"]
    for name in DETECTORS:
        steps.append((["train", "--config", str(CONFIGS / f"{name}_synthetic_cpu.yaml"),
                       "--output-dir", str(out / name), "--resume", *device_flag, *data_overrides,
                       *SHORT_SCHEDULE[name]], out / name / "metrics.json"))
    val_images = [str(p) for p in sorted((data / "images" / "val").glob("*.png"))[:NUM_PREDICT]]
    for name in DETECTORS:
        # The val images exist only once make-synthetic has run: listed when the step runs.
        steps.append((["predict", "--checkpoint", str(out / name / "model_final.pt"), "--input",
                       *(val_images or [str(data / "images" / "val")]), "--output-dir",
                       str(out / "predict" / name), "--visualize", *device_flag], None))
    # Both detectors interleaved image by image (machine noise cancels), end to end.
    bench_json = out / "bench.json"
    steps.append((["bench", *(str(out / name / "model_final.pt") for name in DETECTORS), "--data",
                   str(data / "val.json"), "--warmup", str(BENCH_WARMUP), "--threads", "1",
                   "--output", str(bench_json), *device_flag], bench_json))
    steps.append((["compare", *(str(out / name) for name in DETECTORS), "--output-dir", str(out / "report"),
                   "--bench", str(bench_json)], None))
    # Test-time ablations ([RCNN] Table 2, [FRCN] Table 7 and section 5.5), no retraining.
    ablations = []
    for name in DETECTORS:
        variants = [(f"top{k}", ["--top-k", str(k)]) for k in ABLATION_TOP_KS]
        variants.append(("no_box_regression", ["--no-box-regression"]))
        if name == "fast_rcnn":
            variants.append(("svd", ["--svd", "on"]))
        for suffix, flags in variants:
            run = out / "ablations" / f"{name}_{suffix}"
            ablations.append(run)
            steps.append((["eval", "--checkpoint", str(out / name / "model_final.pt"), "--data",
                           str(data / "val.json"), "--proposals", str(stores["val"]),
                           "--output-dir", str(run), *flags, *device_flag], run / "metrics.json"))
    steps.append((["compare", *(str(out / name) for name in DETECTORS), *map(str, ablations),
                   "--output-dir", str(out / "report_ablations"), "--grid-images", "0"], None))
    return steps


def run_demo(output_dir: str, *, device: str, run_command: Callable[[list[str]], int]) -> int:
    """Run ``demo_steps`` with ``run_command`` (``detect.cli.main``), skipping finished steps."""
    out = Path(output_dir)
    t0 = time.perf_counter()
    for index in range(len(demo_steps(out, device))):
        argv, done = demo_steps(out, device)[index]  # re-listed: earlier steps make the inputs
        if done is not None and done.is_file():
            continue
        print(f"\n$ detect {shlex.join(argv)}", flush=True)
        t_step = time.perf_counter()
        code = run_command(argv)
        if code != 0:
            raise SystemExit(f"demo: `detect {shlex.join(argv)}` failed with status {code}")
        print(f"  ({time.perf_counter() - t_step:.0f} s)", flush=True)
    print(f"\ndemo finished in {(time.perf_counter() - t0) / 60:.1f} min")
    print(f"report:      {out / 'report' / 'report.html'} (and report.md; viewer.html: every image)")
    print(f"predictions: {out / 'predict'}/<detector>/vis/")
    return 0
