"""The GPU check's CPU dry run: ``tools/gpu_check.sh --device cpu --quick`` runs every step.

GPU time is scarce, so the script that spends it must not fail on a typo: this runs all seven
steps with tiny settings (about a minute on 2 idle cores) and checks what they wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ["env", "tests", "train", "torchrun", "bench", "detect_bench", "proposal_scaling"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([str(REPO / "tools" / "gpu_check.sh"), "--device", "cpu", "--quick", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900, cwd=out)
    return out, proc


def test_every_step_is_ok_or_skipped_with_a_reason(dry_run):
    out, proc = dry_run
    results = [json.loads(p.read_text()) for p in sorted(out.glob("[0-9][0-9]_*.json"))]
    assert [r["step"] for r in results] == STEPS, proc.stdout + proc.stderr
    for r in results:
        assert r["status"] in ("ok", "skipped"), f"{r['step']}: {r.get('error')}\n{proc.stdout}"
        if r["status"] == "skipped":
            assert r["reason"]
        assert r["seconds"] >= 0
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_steps_measured_what_they_claim(dry_run):
    out, _ = dry_run
    step = {p.name[3:-5]: json.loads(p.read_text()) for p in out.glob("[0-9][0-9]_*.json")}
    assert step["env"]["cuda_available"] is False and step["env"]["torch"]
    assert step["tests"]["pytest"].get("skipped", 0) >= 1  # the gpu tests, skipped without CUDA
    frcn, rcnn = step["train"]["fast_rcnn"], step["train"]["rcnn"]
    # Killed at its first checkpoint, resumed from it (or a later one), and finished.
    assert 0 < frcn["killed_after_checkpoint"] <= frcn["resumed_at"] < frcn["last_iteration"]
    assert frcn["last_iteration"] == 12 and rcnn["last_iteration"] == 4
    for r in (frcn, rcnn):
        assert 0.0 <= r["AP"] <= 100.0
        assert r["cpu_reference_AP"] is not None  # tools/gpu_check_reference.json has the quick schedule
    assert (out / "train" / "fast_rcnn" / "model_final.pt").is_file()
    assert step["torchrun"]["probe_backend"] == "gloo" and step["torchrun"]["train"]["last_iteration"] == 2
    row = step["bench"]["rows"][0]
    for key in ("fast_rcnn_ms", "fast_rcnn_fp32_ms", "fast_rcnn_svd_ms", "rcnn_ms"):
        assert row[key]["median"] > 0 and row[key]["peak_mb"] > 0
    assert row["fast_rcnn_batched_images_per_s"] > 0
    assert any("not judged" in g for g in step["bench"]["goals"])  # no verdicts from a CPU run
    scaling = step["proposal_scaling"]
    assert scaling["stores_identical"] and set(scaling["workers"]) == {"1", "2"}
    assert scaling["workers"]["1"]["speedup"] == 1.0 and scaling["workers"]["2"]["images_per_s"] > 0
    assert set(scaling["threads"]) >= {"1", "2"} and all(scaling["threads"][t]["identical"] for t in ("1", "2"))


def test_the_summary_names_the_command_device_and_every_step(dry_run):
    out, _ = dry_run
    summary = (out / "summary.md").read_text()
    assert "--device cpu --quick" in summary and "GPU: none (CPU)" in summary and "date (UTC)" in summary
    for name in STEPS:
        assert f"| {name} |" in summary
    assert (out / "logs" / "bench_detectors.log").is_file()
