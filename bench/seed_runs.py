"""What the seed-study benches share: one omoe_ds.train launch per (configuration, seed), reused when its
results.json exists, and mean ± std over seeds."""
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_run(out: str, job_flags: list, master_port: int, num_ranks: int = 2) -> dict:
    """results.json of `deepspeed --module omoe_ds.train JOB_FLAGS --output-dir OUT` on num_ranks CPU ranks."""
    results = os.path.join(out, "results.json")
    if not os.path.exists(results):
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(num_ranks),
               "--master_port", str(master_port), "--module", "omoe_ds.train", *job_flags, "--output-dir", out,
               "--overwrite"]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        env.setdefault("DS_ACCELERATOR", "cpu")
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(results) as f:
        return json.load(f)


def mean_std(values) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}
