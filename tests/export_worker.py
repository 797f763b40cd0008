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
decoder_zero3: a tiny random llama upcycled to Mixtral in layers 0 and 2 of 4 (top-2 of 4 experts) trains 3 steps
(an O step at 2) through DeepSpeed AutoEP at EP = 2 under ZeRO-3 and saves to OUT/z3_ckpt (tag "step3"); rank 0
writes the engine's parameters, gathered (deepspeed.zero.GatheredParameters, experts all-gathered over the EP group),
and its logits on Z3_EVAL to OUT/z3_engine.pt and exports the checkpoint to OUT/z3_export (Qwen2-MoE); then both
ranks load that export with from_pretrained and train it 3 more steps through AutoEP at ZeRO-3 (qwen3_moe preset),
an O step included (OUT/z3_further.json).
all: train, export, load, job and decoder_zero3 in one launch (what tests/test_export.py runs).
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


Z3_TAG, Z3_LAYERS, Z3_VOCAB = "step3", (0, 2), 64


def z3_batch(seed: int, rows: int = 8):
    """Seeded token ids with padding on the right of some rows (the pad id is 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, Z3_VOCAB, (rows, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1::3, 7:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


Z3_EVAL = 100  # the seed of the eval batch


def z3_engine(model, steps: int):
    """model through AutoEP (EP = world) under ZeRO-3 with OMoE (an O step every 2nd step), trained `steps` steps."""
    world, rank = dist.get_world_size(), dist.get_rank()
    config = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8 // world, "steps_per_print": 10 ** 9,
              "zero_optimization": {"stage": 3},
              "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True, "weight_decay": 0.0}},
              "expert_parallel": {"enabled": True, "autoep_size": world, "use_grouped_mm": False},
              "omoe": {"skip_step": 2, "alpha0": 0.1}}
    engine, *_ = omoe_ds.initialize(model=model, config=config)
    for step in range(steps):
        batch = {k: v[rank * 8 // world:(rank + 1) * 8 // world] for k, v in z3_batch(step).items()}
        engine.backward(engine(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss)
        engine.step()
    return engine


def gathered_parameters(engine) -> dict:
    """Every parameter whole: ZeRO-3 partitions gathered, each AutoEP expert tensor all-gathered over the EP group
    into [num_experts, …] (EP rank r holds experts r·E_local …)."""
    import deepspeed
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    for name in [n for n in params if ".experts.w" in n]:
        parts = [torch.empty_like(params[name]) for _ in range(dist.get_world_size())]
        torch.distributed.all_gather(parts, params[name].contiguous())
        params[name] = torch.cat(parts)
    return params


def decoder_zero3(args):
    import json
    import transformers
    from omoe_ds.checkpoint.export import export_checkpoint
    from omoe_ds.finetune.upcycle import UpcycleConfig, upcycle_to_mixtral
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=Z3_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                      tie_word_embeddings=True)
    model = upcycle_to_mixtral(transformers.LlamaForCausalLM(config),
                               UpcycleConfig(num_experts=4, top_k=2, layers=Z3_LAYERS))
    engine = z3_engine(model, 3)
    save_dir = os.path.join(args.out, "z3_ckpt")
    omoe_ds.save_checkpoint(engine, save_dir, tag=Z3_TAG, model_config=engine.module.config)
    params = gathered_parameters(engine)
    engine.module.eval()
    with torch.no_grad():  # every rank runs the same batch: AutoEP's all-to-all needs each in every forward
        logits = engine.module(**z3_batch(Z3_EVAL)).logits.clone()
    if dist.get_rank() == 0:
        torch.save({"params": params, "logits": logits, "o_steps": engine.omoe.o_steps_done},
                   os.path.join(args.out, "z3_engine.pt"))
        export_checkpoint(save_dir, os.path.join(args.out, "z3_export"))
    dist.barrier()

    # Further training of the export: plain from_pretrained, then AutoEP's qwen3_moe preset (it covers Qwen2-MoE).
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(args.out, "z3_export"))
    engine = z3_engine(model.train(), 3)  # from_pretrained returns eval mode, where OMoE records nothing
    params = gathered_parameters(engine)
    if dist.get_rank() == 0:
        shared = {n: float(p.abs().max()) for n, p in params.items() if "shared_expert" in n}
        with open(os.path.join(args.out, "z3_further.json"), "w") as f:
            json.dump({"class": type(engine.module).__name__, "steps": engine.global_steps,
                       "o_steps": engine.omoe.o_steps_done, "omoe_layers": len(engine.omoe.layers),
                       "shared_expert_max_abs": shared}, f)
    dist.barrier()


def all_suites(args):
    train(args)
    export(args)
    load(args)
    if args.data:
        job(args)
    decoder_zero3(args)


SUITES = {"train": train, "export": export, "load": load, "job": job, "decoder_zero3": decoder_zero3, "all": all_suites}

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
