#!/usr/bin/env bash
# README command 2: set up, then the whole test suite (distributed tests launch real ranks through
# the deepspeed CLI on CPU/gloo). Extra arguments go to pytest, e.g. `bash launch/test.sh -m "not distributed"`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
. launch/env.sh
set +e
python -m pytest -q -ra "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$status"
