#!/usr/bin/env bash
# The trainer, loss and resume tests (tests/test_resume.py included) at the lowest supported transformers (the floor of
# slmkd.training.trainer.SUPPORTED_TRANSFORMERS, also in setup.py), in a venv of their own.
#
#   bash scripts/ci_floor.sh            # trainer (incl. the kill -9 resume test), losses, bnb
#   FLOOR_FAST=1 bash scripts/ci_floor.sh   # without the tests marked slow
#
# FLOOR_VENV (default /tmp/venv-floor) is reused when it already holds the floor release.
set -euo pipefail
cd "$(dirname "$0")/.."
floor=$(sed -n 's/^TRANSFORMERS_MIN = "\(.*\)"$/\1/p' slmkd/training/trainer.py)
[ -n "$floor" ] || { echo "ci_floor: TRANSFORMERS_MIN not found in slmkd/training/trainer.py" >&2; exit 2; }
grep -q "\"transformers>=${floor%.0}," setup.py || {
  echo "ci_floor: setup.py's transformers floor differs from TRANSFORMERS_MIN=$floor" >&2; exit 2; }
venv=${FLOOR_VENV:-/tmp/venv-floor}
t0=$(date +%s)
if ! "$venv/bin/python" -c "import transformers, sys; sys.exit(transformers.__version__ != '$floor')" \
    2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q torch==2.13.0  # the pinned CPU wheel first
  "$venv/bin/python" -m pip install -q -e ".[dev]" "transformers==$floor"
fi
"$venv/bin/python" -c "import transformers; print('ci_floor: transformers', transformers.__version__)"
t1=$(date +%s)
export SLMKD_DRIVE_ROOT="$(mktemp -d)/drive" SLMKD_PROFILE=tiny
marker=()
if [ "${FLOOR_FAST:-0}" = "1" ]; then marker=(-m "not slow"); fi
set +e
"$venv/bin/python" -m pytest -q -p no:cacheprovider "${marker[@]}" \
  tests/test_trainer.py tests/test_resume.py tests/test_losses.py tests/test_bnb_cpu.py
rc=$?
set -e
echo "ci_floor: install $((t1 - t0)) s, tests $(( $(date +%s) - t1 )) s, rc=$rc"
exit "$rc"
