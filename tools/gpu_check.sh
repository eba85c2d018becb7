#!/usr/bin/env bash
# The GPU check: environment, `pytest -m gpu`, short AMP training with a SIGKILL and
# resume, torchrun, detector speed, the interleaved bench, proposal scaling over CPU cores. Under
# 9.5 minutes on one H100/H200.
#
#   tools/gpu_check.sh                          # on the GPU machine: writes runs/gpu_check/
#   tools/gpu_check.sh --out DIR                # elsewhere
#   tools/gpu_check.sh --device cpu --quick     # the CPU dry run (about a minute; CI runs it)
#
# One JSON file per step and summary.md go to --out as each step finishes, so a killed run keeps
# what it measured. Exit status 1 if any step failed. Options: python tools/gpu_check.py --help.
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
export GPU_CHECK_ENTRY="${GPU_CHECK_ENTRY:-tools/gpu_check.sh}"
exec "$PYTHON" "$repo/tools/gpu_check.py" "$@"
