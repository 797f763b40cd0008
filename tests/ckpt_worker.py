"""Checkpoint scenarios for tests/test_checkpoint.py, run through the deepspeed CLI:

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --master_port 29630 tests/ckpt_worker.py --suite save --out /tmp/c

`save` trains uninterrupted runs and runs stopped (saved) at step k; `resume` starts fresh engines
from those checkpoints and finishes them. Every run dumps, per rank, its parameters, projectors, S,
windows and full optimizer state, so the test compares them bit for bit.
"""
import argparse
import os

import deepspeed
import deepspeed.comm as dist
import torch

from dist_worker import GLOBAL_BATCH, X, Y, build, save
from omoe_ds.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from omoe_ds.small_job import micro_batches

STEPS = 13  # O steps at 5 and 10
CASES = {  # name: (ZeRO stage, gradient accumulation, stop step k)
    "before_o": (2, 1, 5),   # the next step is an O step: the window is full and not yet closed
    "after_o": (2, 1, 6),    # step 5 (an O step) has just run
    "zero0": (0, 1, 8),
    "gas2": (2, 2, 6),
}


def run_steps(engine, until: int) -> None:
    gas = engine.gradient_accumulation_steps()
    engine.train()
    while engine.global_steps < until:
        for xb, yb in micro_batches(X, Y, engine.global_steps, GLOBAL_BATCH, gas):
            engine.backward(engine(xb, yb))
            engine.step()


def dump(out, name, engine):
    omoe = engine.omoe
    windows = [[*w.sums, w.counts] for w in omoe.windows]
    save(out, name, engine, optimizer=engine.optimizer.state_dict(), windows=windows,
         counters=[engine.global_steps, omoe.o_steps_done, omoe.prepared_step])


def suite_save(out):
    for name, (stage, gas, k) in CASES.items():
        engine = build(ep_size=2, base="adamw", stage=stage, gas=gas)
        run_steps(engine, STEPS)
        dump(out, f"full_{name}", engine)
        engine = build(ep_size=2, base="adamw", stage=stage, gas=gas)
        run_steps(engine, k)
        save_checkpoint(engine, os.path.join(out, f"ckpt_{name}"))
    # inside an accumulation window: refused, nothing written
    engine = build(ep_size=2, base="adamw", stage=2, gas=2)
    xb, yb = next(micro_batches(X, Y, 0, GLOBAL_BATCH, 2))
    engine.backward(engine(xb, yb))
    engine.step()
    try:
        save_checkpoint(engine, os.path.join(out, "ckpt_mid_gas"))
        message = "no error"
    except CheckpointError as e:
        message = str(e)
    with open(os.path.join(out, f"mid_gas.rank{dist.get_rank()}.txt"), "w") as f:
        f.write(message)


def suite_resume(out):
    for name, (stage, gas, k) in CASES.items():
        engine = build(ep_size=2, base="adamw", stage=stage, gas=gas)
        load_checkpoint(engine, os.path.join(out, f"ckpt_{name}"))
        assert engine.global_steps == k, (name, engine.global_steps, k)
        run_steps(engine, STEPS)
        dump(out, f"resumed_{name}", engine)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--suite", choices=["save", "resume"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed()
    {"save": suite_save, "resume": suite_resume}[args.suite](args.out)
