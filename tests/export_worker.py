"""Ranks for tests/test_export.py, run through the deepspeed CLI:

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --master_port 29650 tests/export_worker.py --suite train \
        --model TINY_BERT_DIR --out OUT

train: a tiny BERT converted to 4 experts at EP=2 trains a few steps under ZeRO-2 with OMoE (the experts move
apart), saves a DeepSpeed checkpoint to OUT/ckpt (tag "step4") with hf_model/ beside it, and rank 0 writes the
engine's eval outputs (logits, last hidden state) on EVAL_TEXTS
to OUT/engine_logits.pt.
export: rank 0 exports OUT/ckpt to OUT/export with omoe_ds.export.export_checkpoint.
load: both ranks load OUT/export at EP=2 with omoe_ds.export.load_exported (no engine) and rank 0 writes the
outputs to OUT/ep2_logits.pt; each rank also writes its local experts by global id; then the export is loaded
again unbound and trained one step through omoe_ds.initialize.
job: the real default model (--model minilm-l6, whose config.json names BertModel) through omoe_ds.train on
DATA (csv): 3 steps with an O step, checkpoint at the end; the engine's last eval outputs (test split) and their
inputs go to OUT/job_engine_outputs.pt; rank 0 exports with the CLI's main to OUT/job_export; then
omoe_ds.train runs again with --model OUT/job_export at EP=1 (OUT/job_again).
all: train, export, load and job in one launch (what tests/test_export.py runs).
"""
import argparse
import contextlib
import io
import os

import deepspeed.comm as dist
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import omoe_ds
from omoe_ds.core import collectives, environment
from omoe_ds.finetune.convert import MoEConversionConfig, convert_to_moe

EVAL_TEXTS = ["the goal of the match", "rain and sun today", "the bank gave a loan", "cash", "a team of clouds",
              "sun rain goal bank loan match team cloud cash today"]
TRAIN_TEXTS = [f"the {w} today {i}" for i in range(16) for w in ("goal", "rain", "bank", "team")]
STEPS = 4
TAG = "step4"


def ds_config():
    world = dist.get_world_size()
    return {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8 // world, "steps_per_print": 10 ** 9,
            "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": 2},
            "omoe": {"skip_step": 2}}


def encode(tokenizer, texts):
    return dict(tokenizer(texts, padding="max_length", truncation=True, max_length=12, return_tensors="pt"))


@torch.no_grad()
def eval_outputs(model, tokenizer):
    """Logits and the last hidden state on EVAL_TEXTS, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    out = model(**encode(tokenizer, EVAL_TEXTS), output_hidden_states=True)
    model.train(was_training)
    return {"logits": out.logits.float().clone(), "hidden": out.hidden_states[-1].float().clone()}


def train_steps(engine, tokenizer, steps):
    rank, world = dist.get_rank(), dist.get_world_size()
    micro = 8 // world
    for step in range(steps):
        rows = TRAIN_TEXTS[step * 8 + rank * micro: step * 8 + (rank + 1) * micro]
        batch = encode(tokenizer, rows)
        labels = torch.tensor([(step * 8 + rank * micro + i) % 3 for i in range(len(rows))])
        loss = engine(**batch, labels=labels).loss
        engine.backward(loss)
        engine.step()


def train(args):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model)
    convert_to_moe(model, MoEConversionConfig(num_experts=4, ep_size=args.ep_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    engine, *_ = omoe_ds.initialize(model=model, optimizer=optimizer, config=ds_config())
    train_steps(engine, tokenizer, STEPS)
    save_dir = os.path.join(args.out, "ckpt")
    engine.save_checkpoint(save_dir, tag=TAG)
    if dist.get_rank() == 0:
        hf_dir = os.path.join(save_dir, TAG, "hf_model")
        engine.module.config.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
    logits = eval_outputs(engine.module, tokenizer)
    if dist.get_rank() == 0:
        torch.save(logits, os.path.join(args.out, "engine_logits.pt"))
    dist.barrier()


def export(args):
    """Rank 0 exports OUT/ckpt to OUT/export (a library call: no engine or process group needed)."""
    from omoe_ds.checkpoint.export import export_checkpoint
    if dist.get_rank() == 0:
        export_checkpoint(os.path.join(args.out, "ckpt"), os.path.join(args.out, "export"))
    dist.barrier()


def load(args):
    from omoe_ds.checkpoint.export import load_exported
    from omoe_ds.experts import expert_parameters_by_global_id, find_expert_layers
    export = os.path.join(args.out, "export")
    tokenizer = AutoTokenizer.from_pretrained(export)
    model = load_exported(export, ep_size=args.ep_size)
    logits = eval_outputs(model, tokenizer)
    if dist.get_rank() == 0:
        torch.save(logits, os.path.join(args.out, f"ep{args.ep_size}_logits.pt"))
    experts = {k: p.detach().clone() for k, p in expert_parameters_by_global_id(find_expert_layers(model)).items()}
    torch.save(experts, os.path.join(args.out, f"ep{args.ep_size}_experts.rank{dist.get_rank()}.pt"))

    # Further training: an unbound load handed to omoe_ds.initialize, which binds the expert groups itself.
    model = load_exported(export, ep_size=args.ep_size, bind_groups=False)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    engine, *_ = omoe_ds.initialize(model=model, optimizer=optimizer, config=ds_config())
    train_steps(engine, tokenizer, 1)
    if dist.get_rank() == 0:
        with open(os.path.join(args.out, "further_training.ok"), "w") as f:
            f.write(str(engine.global_steps))
    dist.barrier()


JOB_STEPS = 3  # O step at 2 (--skip-step 2); the checkpoint at step 3 is the final state the evals see


def job_flags(args, out, model, ep_size):
    return ["--model", model, "--task", "csv", "--data-dir", args.data, "--text-cols", "text", "--label-col", "label",
            "--experts", "4", "--ep-size", str(ep_size), "--max-length", "16", "--eval-batch-size", "8",
            "--optimizer", "omoe", "--skip-step", "2", "--lr", "1e-3", "--output-dir", out,
            "--deepspeed_config", args.ds_config]


def job(args):
    from omoe_ds.checkpoint.export import main as export_cli
    from omoe_ds.finetune import train as train_job
    from omoe_ds.finetune.features import model_input_columns
    captured = {}
    predict = train_job.predict

    def capturing(engine, split, batch_size):  # the job's own engine outputs; the last call is the test split
        outputs = predict(engine, split, batch_size)
        captured.update(step=engine.global_steps, logits=torch.from_numpy(outputs["logits"]),
                        inputs=split.with_format("torch", columns=model_input_columns(split))[:])
        return outputs

    train_job.predict = capturing
    try:
        train_job.main([*job_flags(args, os.path.join(args.out, "job"), "minilm-l6", 2),
                        "--max-steps", str(JOB_STEPS), "--save-every", str(JOB_STEPS)])
    finally:
        train_job.predict = predict
    status = os.path.join(args.out, "job_export.status")
    if dist.get_rank() == 0:
        torch.save(captured, os.path.join(args.out, "job_engine_outputs.pt"))
        err = io.StringIO()  # the test shows the CLI's message; the tiny-model tests of this launch go on
        with contextlib.redirect_stderr(err):
            code = export_cli(["--ckpt", os.path.join(args.out, "job", "checkpoints"),
                               "--out", os.path.join(args.out, "job_export")])
        with open(status, "w") as f:
            f.write(f"exit {code}\n{err.getvalue()}")
    dist.barrier()
    with open(status) as f:
        if not f.read().startswith("exit 0\n"):
            return
    train_job.main([*job_flags(args, os.path.join(args.out, "job_again"), os.path.join(args.out, "job_export"), 1),
                    "--max-steps", "3", "--save-every", "3"])


def all_suites(args):
    train(args)
    export(args)
    load(args)
    if args.data:
        job(args)


SUITES = {"train": train, "export": export, "load": load, "job": job, "all": all_suites}

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--suite", choices=sorted(SUITES), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model")
    parser.add_argument("--ep-size", type=int, default=2)
    parser.add_argument("--data", help="csv data dir (text, label) for the job suite")
    parser.add_argument("--ds-config", help="DeepSpeed JSON for the job suite")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    environment.init_distributed()
    SUITES[args.suite](args)
    collectives.shutdown()
