# Sourced by the launch scripts: the venv, and DeepSpeed's CPU accelerator where there is no GPU.
. "$(dirname "${BASH_SOURCE[0]}")/../.venv/bin/activate"
if [ -z "${DS_ACCELERATOR:-}" ] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  export DS_ACCELERATOR=cpu
fi
# On CPU every rank is a process: one OpenMP thread each keeps 2 ranks from fighting over 2 cores.
if [ "${DS_ACCELERATOR:-}" = cpu ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
