# Sourced by the launch scripts: the venv, and DeepSpeed's CPU accelerator where there is no GPU.
_omoe_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$_omoe_root/.venv/bin/activate"
# DeepSpeed's JIT-built ops live with the venv they were built against: another checkout's build (or
# a stale lock from one killed mid-build) can neither stall nor invalidate them. setup.sh builds them.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$_omoe_root/.venv/torch_extensions}
unset _omoe_root
if [ -z "${DS_ACCELERATOR:-}" ] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  export DS_ACCELERATOR=cpu
fi
# On CPU every rank is a process: one OpenMP thread each keeps 2 ranks from fighting over 2 cores.
if [ "${DS_ACCELERATOR:-}" = cpu ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
