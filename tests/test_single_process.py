"""Without the deepspeed launcher (plain `python -m …`), jobs run as one rank instead of falling into
DeepSpeed's MPI discovery (which needs mpi4py and an MPI launch)."""
import json
import os
import sys

from omoe_ds.core.environment import LAUNCHER_ENV

import launching

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_small_job_runs_as_one_rank_without_a_launcher(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (*LAUNCHER_ENV, "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    out = tmp_path / "small.json"
    proc = launching.run([sys.executable, "-m", "omoe_ds.small_job", "--deepspeed_config", "ds_configs/omoe_zero0.json",
                          "--ep-size", "1", "--steps", "6", "--out", str(out)],
                         cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 1 and [r["optimizer"] for r in report["runs"]] == ["adamw", "omoe"]
