"""Fine-tune a pretrained Hugging Face encoder as a Mixture-of-Experts model, with OMoE or a plain base
optimizer, through the deepspeed launcher. On this CPU machine (DS_ACCELERATOR=cpu, gloo):

    deepspeed --num_gpus 2 --master_port 29640 --module omoe_ds.train --model minilm-l6 --task trec \
        --experts 4 --ep-size 2 --optimizer omoe --deepspeed_config ds_configs/finetune_zero2.json \
        --epochs 3 --output-dir runs/trec_omoe

Every FFN becomes M experts copied from the pretrained FFN (paper A §IV). With --adapter the model stays
dense instead: "full" trains every parameter, "lora" / "moe-lora" / "omoe-lora" (paper B, omoe_ds.lora)
train adapters, routers and head only, with AdamW by default, also under ZeRO-3:

    deepspeed --num_gpus 2 --master_port 29641 --module omoe_ds.train --model minilm-l6 --task trec \
        --adapter omoe-lora --lr 2e-4 --deepspeed_config ds_configs/finetune_zero3.json --output-dir runs/trec_olora

Writes to --output-dir: metrics.jsonl (one line per eval), results.json (dev/test metrics, time, config,
expert or LoRA-expert diversity), adapter/ (with a LoRA --adapter: the adapter alone, loadable with
omoe_ds.lora.load_adapter), and DeepSpeed monitor output (TensorBoard and CSV).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import random
import resource
import statistics
import sys
import time

import deepspeed
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ..checkpoint.export import EXPERT_COUNT_FIELDS, is_converted_export, is_export, load_exported
from ..checkpoint.layout import META_FILE, latest_complete_tag, resolve_tag_dir
from ..checkpoint.state import check_omoe_config, fault_point, load_checkpoint, prune_checkpoints, save_checkpoint
from ..core import collectives, environment
from ..core.config import OMoEConfig, OMoEConfigError, resolve_ds_config
from ..initialize import initialize
from ..experts import find_expert_layers
from ..studies.diversity import (ExpertLoadCounter, LayerInputSample, diversity_events, expert_diversity,
                                 mean_param_variance, param_variance_by_layer)
from .convert import MoEConversionConfig, convert_to_moe, moe_aux_loss
from .features import IGNORE_INDEX, encode_task, evaluate_predictions, model_input_columns
from .models import MODEL_ALIASES, load_model_config
from .tasks import HEADS, load_task
from .upcycle import UPCYCLABLE_MODEL_TYPES, UpcycleConfig, check_upcyclable, upcycle_to_mixtral
from ..lora import ADAPTER_KINDS, ROUTINGS, LoRAMixtureConfig, inject, lora_diversity, save_adapter

BASE_OPTIMIZERS = {
    "adamw": lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
    "rmsprop": lambda params, lr, wd: torch.optim.RMSprop(params, lr=lr, weight_decay=wd),
    "adagrad": lambda params, lr, wd: torch.optim.Adagrad(params, lr=lr, weight_decay=wd),
    "sgd": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd),
}
RUN_FILES = ("results.json", "metrics.jsonl")
AUTOEP = "autoep"
EXPERT_PARALLEL = (AUTOEP,)
ADAPTER_DIR = "adapter"
FULL = "full"  # --adapter full: the dense model, every parameter trained (the baseline of paper B's study)
JOB_ADAPTERS = (FULL, *ADAPTER_KINDS)
DEFAULT_EXPERTS, DEFAULT_OPTIMIZER, DEFAULT_ADAPTER_OPTIMIZER = 4, "omoe", "adamw"
LORA_FLAGS = {"lora_r": "r", "lora_alpha": "alpha", "lora_experts": "num_experts", "lora_dropout": "dropout",
              "lora_routing": "routing", "lora_top_k": "top_k", "lora_normalize": "normalize", "lora_targets": "targets"}
LORA_DIVERSITY_BATCHES = 4  # dev batches the LoRA-expert similarity is measured on, at every eval
HEAD_CLASSES = {"sequence_classification": "AutoModelForSequenceClassification",
                "regression": "AutoModelForSequenceClassification",
                "token_classification": "AutoModelForTokenClassification",
                "question_answering": "AutoModelForQuestionAnswering",
                "causal_lm": "AutoModelForCausalLM"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm-l6",
                   help=f"alias ({', '.join(MODEL_ALIASES)}), hub id (bert-base-uncased) or local dir")
    p.add_argument("--task", default="trec")
    p.add_argument("--data-dir", default=None, help="local data: a saved datasets dir or a dir/file of csv/tsv/json/parquet")
    p.add_argument("--text-cols", default=None,
                   help="comma-separated text columns of a local-file task (csv/json/parquet/generic): one or two "
                        "texts; the words column (lists of strings) for token classification; question,context for QA")
    p.add_argument("--label-col", default=None,
                   help="label column of a local-file task: class names/ids or floats, per-word tag lists, or "
                        "SQuAD-style answers")
    p.add_argument("--head", default=None, choices=HEADS,
                   help="the head of a local-file task; default: inferred from the train columns")
    p.add_argument("--label-names", default=None,
                   help="comma-separated class / tag names in id order, for integer labels or tags of local files")
    p.add_argument("--experts", type=int, default=None, help=f"experts per MoE layer (default {DEFAULT_EXPERTS})")
    p.add_argument("--ep-size", type=int, default=1)
    p.add_argument("--expert-parallel", default=None, choices=EXPERT_PARALLEL,
                   help="decoders: shard the (upcycled) Mixtral experts with DeepSpeed AutoEP over --ep-size ranks, "
                        "also under ZeRO-3; default: transformers' fused experts, whole on every rank (EP=1)")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--moe-layers", type=layer_list, default=None, help="comma-separated encoder/decoder layer indices; default all")
    p.add_argument("--capacity-factor", type=float, default=1.0)
    p.add_argument("--drop-tokens", action="store_true", help="drop tokens over capacity (default: never drop)")
    p.add_argument("--optimizer", default=None, choices=["omoe", *BASE_OPTIMIZERS],
                   help=f"default {DEFAULT_OPTIMIZER}; {DEFAULT_ADAPTER_OPTIMIZER} with --adapter")
    p.add_argument("--base-optimizer", default="adamw", choices=sorted(BASE_OPTIMIZERS),
                   help="the optimizer OMoE wraps when --optimizer omoe")
    p.add_argument("--skip-step", type=int, default=None, help="override omoe.skip_step")
    p.add_argument("--alpha0", type=float, default=None)
    p.add_argument("--lam", type=float, default=None)
    p.add_argument("--adapter", default=None, choices=JOB_ADAPTERS,
                   help="keep the model dense: full fine-tuning, or LoRA adapters (paper B); default: MoE conversion")
    defaults = LoRAMixtureConfig()
    p.add_argument("--lora-r", type=int, default=None, help=f"LoRA rank of each expert (default {defaults.r})")
    p.add_argument("--lora-alpha", type=float, default=None, help=f"LoRA α; scale α/r (default {defaults.alpha:g})")
    p.add_argument("--lora-experts", type=int, default=None,
                   help=f"LoRA experts per adapted module, moe-lora/omoe-lora (default {defaults.num_experts})")
    p.add_argument("--lora-dropout", type=float, default=None, help=f"default {defaults.dropout}")
    p.add_argument("--lora-targets", default=None,
                   help="comma-separated module names or regexes, like PEFT's target_modules (default: attention "
                        "and FFN linears of the encoder or decoder)")
    p.add_argument("--lora-routing", default=None, choices=ROUTINGS, help=f"default {defaults.routing}")
    p.add_argument("--lora-top-k", type=int, default=None, help=f"experts kept per token with --lora-routing topk "
                                                                f"(default {defaults.top_k})")
    p.add_argument("--lora-normalize", action="store_true", default=None,
                   help="omoe-lora: unit-norm orthogonalised outputs (the Stiefel form; off by default)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--aux-loss-coef", type=float, default=0.0, help="weight of the gates' load-balancing loss")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps; overrides --epochs")
    p.add_argument("--eval-every", type=int, default=0, help="optimizer steps between dev evals; 0 = each epoch end")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output-dir", default="runs/default")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --output-dir")
    p.add_argument("--save-every", type=int, default=0,
                   help="optimizer steps between checkpoints in --output-dir/checkpoints (and one at the end); 0 = none")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="newest complete checkpoints kept; 0 keeps all")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint in --output-dir/checkpoints, same batches")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    p = deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    if args.deepspeed_config is None:
        args.deepspeed_config = "ds_configs/finetune_zero2.json"
    return args


def check_adapter_args(args) -> None:
    """--adapter keeps the model dense: paper A's conversion and O steps are not combined with it. Fills the
    defaults of --experts and --optimizer for either path."""
    lora_given = [f"--{k.replace('_', '-')}" for k in LORA_FLAGS if getattr(args, k) is not None]
    args.experts_given = args.experts is not None
    if args.adapter is None:
        if lora_given:
            raise OMoEConfigError(f"{lora_given[0]} sets a LoRA adapter: add --adapter lora|moe-lora|omoe-lora")
        args.experts = DEFAULT_EXPERTS if args.experts is None else args.experts
        args.optimizer = args.optimizer or DEFAULT_OPTIMIZER
        return
    mixed = [flag for flag, given in (("--experts", args.experts is not None), ("--optimizer omoe", args.optimizer == "omoe"),
                                      ("--moe-layers", args.moe_layers is not None), ("--ep-size", args.ep_size != 1),
                                      ("--top-k", args.top_k != 1),
                                      ("--expert-parallel", args.expert_parallel is not None)) if given]
    if mixed:
        raise OMoEConfigError(f"--adapter {args.adapter} with {mixed[0]}: the adapter paths keep the model dense, and "
                              "paper A's MoE conversion and O steps are not combined with them; drop "
                              f"{mixed[0]}, or drop --adapter to fine-tune an MoE model")
    if args.adapter == FULL and lora_given:
        raise OMoEConfigError(f"{lora_given[0]} with --adapter full: full fine-tuning has no LoRA adapter; use "
                              "--adapter lora|moe-lora|omoe-lora")
    args.optimizer = args.optimizer or DEFAULT_ADAPTER_OPTIMIZER
    if args.adapter != FULL:
        lora_config(args)  # its own checks (r > 0, N >= 2 for a mixture, top-k <= N, ...) before anything loads


def lora_config(args) -> LoRAMixtureConfig:
    given = {field: getattr(args, flag) for flag, field in LORA_FLAGS.items() if getattr(args, flag) is not None}
    if "targets" in given:
        given["targets"] = tuple(t.strip() for t in given["targets"].split(",") if t.strip())
    return LoRAMixtureConfig(kind=args.adapter, **given)


def check_args(args) -> None:
    """Cheap checks first, so a bad flag costs nothing and writes nothing."""
    check_adapter_args(args)
    if args.adapter is None:
        if args.experts < 2:
            raise OMoEConfigError(f"--experts={args.experts}: MoE fine-tuning needs at least 2 experts per layer")
        if args.ep_size < 1 or args.experts % args.ep_size:
            raise OMoEConfigError(f"--ep-size={args.ep_size} does not divide --experts={args.experts}; "
                                  "pick an expert-parallel size that divides the expert count")
    for name in ("epochs", "lr", "max_length", "eval_batch_size"):
        if getattr(args, name) <= 0:
            raise OMoEConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} must be > 0")
    if args.max_steps is not None and args.max_steps < 1:
        raise OMoEConfigError(f"--max-steps={args.max_steps} must be >= 1")
    for name in ("save_every", "keep_checkpoints"):
        if getattr(args, name) < 0:
            raise OMoEConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 0")
    if args.resume:
        if args.overwrite:
            raise OMoEConfigError("--resume continues the run in --output-dir and --overwrite replaces it; pass one")
        if os.path.exists(os.path.join(args.output_dir, "results.json")):
            raise OMoEConfigError(f"--resume: the run in {args.output_dir} already finished (results.json); "
                                  "nothing to resume")
        if latest_complete_tag(checkpoint_dir(args)) is None:
            raise OMoEConfigError(f"--resume: no complete checkpoint in {checkpoint_dir(args)}; start the run "
                                  "without --resume (and with --save-every N to write checkpoints)")
        return
    earlier = [f for f in RUN_FILES if os.path.exists(os.path.join(args.output_dir, f))]
    for folder in run_folders(args):
        if os.path.isdir(folder) and os.listdir(folder):
            earlier.append(os.path.basename(folder) + "/")
    if earlier and not args.overwrite:
        raise OMoEConfigError(f"--output-dir {args.output_dir} already holds a run ({', '.join(earlier)}); "
                              "choose another directory or pass --overwrite to replace it")


def moe_expert_count(config):
    """The experts per MoE layer of a Hugging Face MoE decoder checkpoint (Mixtral, Qwen-MoE, OLMoE, DeepSeek),
    trained as it is; None for a dense model."""
    return next((getattr(config, k) for k in EXPERT_COUNT_FIELDS if getattr(config, k, None)), None)


def is_moe_decoder(config) -> bool:
    return moe_expert_count(config) is not None


def layer_list(text: str) -> str:
    """--moe-layers as given ("0,5,10"), checked to be comma-separated integers when parsed."""
    try:
        [int(i) for i in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer indices, e.g. 0,5,10") from None
    return text


def moe_layer_indices(args):
    return tuple(int(i) for i in args.moe_layers.split(",")) if args.moe_layers else None


def upcycle_config(args) -> UpcycleConfig:
    return UpcycleConfig(num_experts=args.experts, top_k=args.top_k, layers=moe_layer_indices(args), seed=args.seed)


def check_model_args(args, spec, config) -> None:
    """What --model's own config decides, read before any weight loads: encoder or decoder, upcycled or MoE."""
    model_type = getattr(config, "model_type", None)
    decoder = model_type in UPCYCLABLE_MODEL_TYPES or is_moe_decoder(config)
    if spec.head == "causal_lm" and not (decoder or getattr(config, "is_decoder", False)):
        raise OMoEConfigError(f"task {spec.name!r} is causal LM fine-tuning, and --model {args.model} ({model_type}) is "
                              "not a decoder; use a decoder such as --model smollm2-135m")
    if args.adapter is not None:
        return
    if args.expert_parallel == AUTOEP and not decoder:
        raise OMoEConfigError(f"--expert-parallel autoep with --model {args.model} ({model_type}): AutoEP shards the "
                              "experts of decoder MoE models (Mixtral, Qwen-MoE, DeepSeek, or a llama upcycled to "
                              "Mixtral); an encoder becomes DeepSpeed native MoE, sharded by --ep-size alone: drop "
                              "--expert-parallel")
    if decoder and args.ep_size > 1 and args.expert_parallel != AUTOEP:
        raise OMoEConfigError(f"--ep-size={args.ep_size} with the decoder {args.model} ({model_type}): its experts are "
                              "transformers' fused experts, whole on every rank; add --expert-parallel autoep to shard "
                              "them over --ep-size ranks")
    if model_type in UPCYCLABLE_MODEL_TYPES:
        check_upcyclable(config, upcycle_config(args))
    elif is_moe_decoder(config):  # trained as it is: its expert count and MoE layers are the checkpoint's
        count = moe_expert_count(config)
        if (getattr(args, "experts_given", False) and args.experts != count) or args.moe_layers:
            raise OMoEConfigError(f"--model {args.model} is a {model_type} MoE checkpoint with {count} experts per "
                                  "MoE layer, trained as it is: drop --experts and --moe-layers (they upcycle dense "
                                  "decoders)")


def check_resume_config(args, ds_config: dict) -> None:
    """--resume with another "omoe" section is refused before anything is built or written."""
    meta_path = os.path.join(resolve_tag_dir(checkpoint_dir(args)), META_FILE)
    saved = torch.load(meta_path, weights_only=False).get("omoe")
    here = OMoEConfig.from_ds_config(ds_config)
    if saved is not None and here.enabled:
        check_omoe_config(meta_path, saved["config"], dataclasses.asdict(here))


def checkpoint_dir(args) -> str:
    return os.path.join(args.output_dir, "checkpoints")


def run_folders(args) -> tuple:
    """The folders a run writes in --output-dir besides RUN_FILES: checkpoints and the saved adapter."""
    return checkpoint_dir(args), os.path.join(args.output_dir, ADAPTER_DIR)


def complete_ds_config(config: dict, args, steps_total: int) -> dict:
    """The run's DeepSpeed config: OMoE on or off per --optimizer, "auto" scheduler values, monitor paths."""
    config.pop("optimizer", None)  # the job builds the base optimizer from --optimizer/--base-optimizer
    section = config.get("expert_parallel")
    if args.expert_parallel == AUTOEP:
        section = config.setdefault("expert_parallel", {})
        section.setdefault("enabled", True)
        section.setdefault("autoep_size", args.ep_size)
        if not section["enabled"] or section["autoep_size"] != args.ep_size:
            raise OMoEConfigError(f"--expert-parallel autoep --ep-size {args.ep_size}, but the DeepSpeed config's "
                                  f"expert_parallel section says {section}: drop its enabled/autoep_size keys (the job "
                                  "sets them) or make them agree")
    elif section and section.get("enabled", False):
        raise OMoEConfigError("the DeepSpeed config enables expert_parallel (AutoEP); pass --expert-parallel autoep "
                              "--ep-size N to the job, which sets the section's size")
    omoe = config.setdefault("omoe", {})
    omoe["enabled"] = args.optimizer == "omoe"
    for key, value in (("skip_step", args.skip_step), ("alpha0", args.alpha0), ("lam", args.lam)):
        if value is not None:
            omoe[key] = value
    omoe.setdefault("total_steps", steps_total)
    params = config.get("scheduler", {}).get("params", {})
    for key, value in (("total_num_steps", steps_total), ("warmup_num_steps", max(1, int(0.06 * steps_total))),
                       ("warmup_max_lr", args.lr)):
        if params.get(key) == "auto":
            params[key] = value
    if "tensorboard" not in config:
        config["tensorboard"] = {"enabled": True, "output_path": os.path.join(args.output_dir, "monitor"), "job_name": "tb"}
    if "csv_monitor" not in config:
        config["csv_monitor"] = {"enabled": True, "output_path": os.path.join(args.output_dir, "monitor"), "job_name": "csv"}
    return config


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_model(spec, model_path: str, args):
    if is_converted_export(model_path):  # an omoe_ds.export of a converted encoder: its MoE layout is fixed
        moe = json.load(open(os.path.join(model_path, "config.json")))["omoe_moe"]
        if args.experts != moe["num_experts"] or args.top_k != moe["k"]:
            raise OMoEConfigError(f"--model {model_path} is an exported MoE model with {moe['num_experts']} experts, "
                                  f"top-{moe['k']}; pass --experts {moe['num_experts']} --top-k {moe['k']}")
        model = load_exported(model_path, ep_size=args.ep_size, head=spec.head, bind_groups=False)
        if getattr(model.config, "num_labels", spec.num_labels) != spec.num_labels and spec.head != "question_answering":
            raise OMoEConfigError(f"--model {model_path} has {model.config.num_labels} labels, task {spec.name} "
                                  f"{spec.num_labels}")
        return record_trained_head(model, spec)
    model = load_pretrained(spec, model_path)
    if model.config.model_type in UPCYCLABLE_MODEL_TYPES:  # a dense decoder: Mixtral with copied experts
        return record_trained_head(upcycle_to_mixtral(model, upcycle_config(args)), spec)
    if is_moe_decoder(model.config):
        return record_trained_head(model, spec)
    conversion = MoEConversionConfig(num_experts=args.experts, k=args.top_k, ep_size=args.ep_size,
                                     layers=moe_layer_indices(args),
                                     capacity_factor=args.capacity_factor, eval_capacity_factor=args.capacity_factor,
                                     drop_tokens=args.drop_tokens)
    return record_trained_head(convert_to_moe(model, conversion), spec)


def load_adapted_model(spec, model_path: str, args):
    """The dense pretrained model with --adapter's LoRA adapters injected (none for "full"); (model, report)."""
    if is_export(model_path):
        raise OMoEConfigError(f"--model {model_path} is an exported MoE model; --adapter {args.adapter} trains a "
                              "dense pretrained model: pass the dense model, or drop --adapter")
    model = record_trained_head(load_pretrained(spec, model_path), spec)
    if args.adapter == FULL:
        return model, None
    return model, inject(model, lora_config(args))


def load_pretrained(spec, model_path: str):
    """The pretrained model with the task's head."""
    import transformers
    head_class = getattr(transformers, HEAD_CLASSES[spec.head])
    kwargs = {"num_labels": spec.num_labels}
    if spec.head == "regression":
        kwargs["problem_type"] = "regression"
    elif spec.label_names:
        kwargs["id2label"] = dict(enumerate(spec.label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(spec.label_names)}
    if spec.head == "question_answering":
        kwargs = {"num_labels": 2}  # start/end logits, whatever head the checkpoint was saved with
    if spec.head == "causal_lm":
        return head_class.from_pretrained(model_path)  # the pretrained LM head itself
    # A checkpoint fine-tuned with another label count keeps its encoder and gets a fresh head.
    return head_class.from_pretrained(model_path, ignore_mismatched_sizes=True, **kwargs)


def record_trained_head(model, spec):
    """The config saved with each checkpoint names the class and head this job trains, not the pretrained
    config's `architectures` (MiniLM's says BertModel): export and load_exported build the model from it."""
    model.config.architectures = [type(model).__name__]
    model.config.omoe_job = {"head": spec.head, "task": spec.name, "num_labels": spec.num_labels}
    return model


def shard_batches(encoded_split, batch_size: int):
    """(rows, batch) of this rank's strided shard. Every rank yields as many batches (MoE all-to-alls and ZeRO-3
    gathers need all ranks in every forward): a rank with nothing left gets row 0, and rows == []."""
    rank, world = collectives.rank(), collectives.world_size()
    shard = list(range(rank, len(encoded_split), world))
    for b in range(math.ceil(math.ceil(len(encoded_split) / world) / batch_size)):
        rows = shard[b * batch_size:(b + 1) * batch_size]
        yield rows, encoded_split.select(rows or [0])[:]


@torch.no_grad()
def predict(engine, encoded_split, batch_size: int) -> dict:
    """Each rank runs a strided shard (all ranks run the same number of batches: the MoE all-to-all
    needs every rank in every forward), then the outputs are gathered and put back in row order."""
    columns = model_input_columns(encoded_split)
    n = len(encoded_split)
    engine.eval()
    outputs, shard = {}, []
    for rows, batch in shard_batches(encoded_split, batch_size):
        shard += rows
        out = engine.module(**{c: batch[c] for c in columns})
        for key in ("logits", "start_logits", "end_logits"):
            if getattr(out, key, None) is not None:
                outputs.setdefault(key, []).append(getattr(out, key).float().cpu().numpy()[:len(rows)])
    engine.train()
    local = {k: np.concatenate(v) for k, v in outputs.items()}
    gathered = collectives.gather_objects((shard, local))
    ordered = {}
    for key in local:
        full = np.empty((n, *local[key].shape[1:]), dtype=np.float32)
        for rows, values in gathered:
            full[rows] = values[key]
        ordered[key] = full
    return ordered


@torch.no_grad()
def evaluate_lm(engine, encoded_split, batch_size: int) -> dict:
    """Perplexity over the target tokens: each rank sums the next-token NLL of a strided shard (every rank
    runs as many batches: MoE all-to-alls and ZeRO-3 gathers need all ranks), then the sums are all-reduced.
    The logits never leave a rank (a [rows, length, vocab] gather would not fit)."""
    columns = [c for c in model_input_columns(encoded_split) if c != "labels"]
    totals = torch.zeros(2, dtype=torch.float64)  # summed NLL, target tokens
    engine.eval()
    for rows, batch in shard_batches(encoded_split, batch_size):
        logits = engine.module(**{c: batch[c] for c in columns}).logits.float()
        targets = batch["labels"][:, 1:].to(logits.device)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                ignore_index=IGNORE_INDEX, reduction="sum")
        if rows:
            totals += torch.stack([nll.double().cpu(), (targets != IGNORE_INDEX).sum().double().cpu()])
    engine.train()
    collectives.sum_over_world_(totals)
    loss = float(totals[0] / totals[1])
    return {"perplexity": math.exp(loss), "loss": loss, "tokens": int(totals[1])}


def evaluate(engine, spec, raw, encoded, split: str, batch_size: int) -> dict:
    if spec.head == "causal_lm":
        return evaluate_lm(engine, encoded[split], batch_size)
    outputs = predict(engine, encoded[split], batch_size)
    return evaluate_predictions(spec, raw[split], encoded[split], outputs)


def lora_dev_sample(dev, batch_size: int) -> list:
    """The first dev batches, the same on every rank (ZeRO-3 forwards are collective): what the LoRA experts'
    similarity is measured on."""
    columns = [c for c in model_input_columns(dev) if c != "labels"]
    rows = min(len(dev), LORA_DIVERSITY_BATCHES * batch_size)
    return [dev.select(range(start, min(rows, start + batch_size))).with_format("torch", columns=columns)[:]
            for start in range(0, rows, batch_size)]


def lora_diversity_events(summary, samples: int) -> list:
    if not summary:
        return []
    events = [(f"LoRA/expert_cosine_{k}", summary["expert_cosine"][k], samples) for k in ("mean", "mean_abs")]
    events += [(f"LoRA/{k}", summary[k], samples) for k in ("gate_entropy", "load_entropy")]
    return [(tag, value, step) for tag, value, step in events if value is not None]


def adapter_outcome(engine, adapter, args, dev_sample, rank: int) -> dict:
    """results.json's adapter figures (trainable share, LoRA-expert diversity on dev) and, for a LoRA adapter,
    the adapter saved alone in --output-dir/adapter. Every rank calls: under ZeRO-3 both need all ranks."""
    if adapter is None:  # full fine-tuning: every parameter trains
        return {"trainable_parameters": sum(p.numel() for p in engine.module.parameters()), "trainable_share": 1.0}
    out = {"trainable_parameters": adapter.trainable_parameters, "trainable_share": adapter.trainable_share}
    if adapter.config.is_mixture:
        out["lora_diversity"] = lora_diversity(engine.module, dev_sample)
    from ..lora.inject import adapter_parameter_names
    named = dict(engine.module.named_parameters())
    # ZeRO-3 holds a shard of each: gather them on every rank (a no-op for stages 0-2), rank 0 writes.
    with deepspeed.zero.GatheredParameters([named[n] for n in adapter_parameter_names(engine.module, adapter)]):
        if rank == 0:
            save_adapter(engine.module, adapter, os.path.join(args.output_dir, ADAPTER_DIR))
    return out


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    spec, raw = load_task(args.task, args.data_dir, args.text_cols.split(",") if args.text_cols else None, args.label_col,
                          head=args.head, label_names=args.label_names.split(",") if args.label_names else None)
    model_path, model_config = load_model_config(args.model)
    seed_everything(args.seed)
    from transformers import AutoTokenizer
    check_model_args(args, spec, model_config)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:  # decoders: batches are padded, and the classification head finds the last token
        tokenizer.pad_token = tokenizer.eos_token
    encoded = encode_task(spec, raw, tokenizer, args.max_length)
    # converter and adapter errors come before any distributed setup
    model, adapter = (load_model(spec, model_path, args), None) if args.adapter is None else \
        load_adapted_model(spec, model_path, args)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    environment.init_distributed()
    rank, world = collectives.rank(), collectives.world_size()
    if adapter is not None and rank == 0:
        print(f"[omoe_ds.train] {adapter.summary()}", flush=True)
    base = args.base_optimizer if args.optimizer == "omoe" else args.optimizer

    ds_config = resolve_ds_config(config=args.deepspeed_config)
    micro = int(ds_config.get("train_micro_batch_size_per_gpu", 16))
    gas = int(ds_config.get("gradient_accumulation_steps", 1))
    train_set = encoded["train"]
    if len(train_set) < micro * world:  # the drop_last loader would yield no batch and the step loop never end
        raise OMoEConfigError(f"the train split has {len(train_set)} rows (after tokenisation), fewer than one batch "
                              f"of train_micro_batch_size_per_gpu={micro} on each of {world} rank(s): add train "
                              "data, or lower the micro batch in --deepspeed_config")
    steps_per_epoch = max(1, len(train_set) // (micro * world * gas))
    steps_total = args.max_steps or max(1, int(args.epochs * steps_per_epoch))
    complete_ds_config(ds_config, args, steps_total)
    if args.resume:
        check_resume_config(args, ds_config)  # before the engine exists: initialize already writes the monitor

    os.makedirs(args.output_dir, exist_ok=True)
    if rank == 0 and not args.resume:
        for name in RUN_FILES:  # only reached with --overwrite when an earlier run is there
            if os.path.exists(os.path.join(args.output_dir, name)):
                os.remove(os.path.join(args.output_dir, name))
        import shutil
        for folder in run_folders(args):
            if os.path.isdir(folder):
                shutil.rmtree(folder)
    trained = model.parameters() if adapter is None else [p for p in model.parameters() if p.requires_grad]
    if args.expert_parallel == AUTOEP:  # a factory: AutoEP replaces the expert parameters inside initialize
        optimizer = lambda params: BASE_OPTIMIZERS[base](params, args.lr, args.weight_decay)  # noqa: E731
    else:
        optimizer = BASE_OPTIMIZERS[base](trained, args.lr, args.weight_decay)
    engine, _, _, _ = initialize(model=model, optimizer=optimizer, config=ds_config)

    columns = model_input_columns(train_set)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    # Its own generator: creating an iterator must not draw from the global RNG, or a resumed run's dropout differs.
    loader = DataLoader(train_set.with_format("torch", columns=columns), batch_size=micro, sampler=sampler,
                        drop_last=True, generator=torch.Generator().manual_seed(args.seed))
    layers = find_expert_layers(engine.module)
    dev_sample = lora_dev_sample(encoded["dev"], args.eval_batch_size) if adapter is not None else None
    load_counter = ExpertLoadCounter(layers, engine.module)
    input_sample = LayerInputSample(layers, engine.module)  # dev tokens each MoE layer saw: the input its experts are compared on
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    eval_every = args.eval_every or steps_per_epoch
    losses, epoch, skip, seconds_before = [], 0, 0, 0.0
    step_times, step_start = StepTimes(), None
    if args.resume:
        state = load_checkpoint(engine, checkpoint_dir(args))
        epoch, skip = state["data"]["epoch"], state["data"]["batches_done"]
        losses, seconds_before = state["losses"], state["train_seconds"]
        if rank == 0:
            with open(metrics_path, "a") as f:  # records after this step may repeat: readers take the last per step
                f.write(json.dumps({"step": engine.global_steps, "event": "resumed"}) + "\n")
    start = time.perf_counter()
    progress = tqdm(total=steps_total, initial=engine.global_steps, disable=rank != 0,
                    desc=f"{args.task} {args.optimizer}", dynamic_ncols=True)
    engine.train()  # from_pretrained returns the model in eval mode: no dropout, no OMoE input capture
    while engine.global_steps < steps_total:
        sampler.set_epoch(epoch)
        batches_done = skip
        for batch in itertools.islice(loader, skip, None):
            skip = 0
            batches_done += 1
            if len(losses) % gas == 0:  # the first micro-batch of an optimizer step
                step_start = time.perf_counter()
            fault_point("kill_in_step", engine.global_steps)
            out = engine(**batch)
            loss = out.loss + args.aux_loss_coef * moe_aux_loss(engine.module) if args.aux_loss_coef else out.loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().item())  # waits for the step's work: the step timing needs no extra sync
            step = engine.global_steps
            if len(losses) % gas == 0:
                # phase holds until the next forward: "O" for an O step (its projector update included)
                step_times.add(engine.omoe.phase if engine.omoe is not None else "R", time.perf_counter() - step_start)
                progress.update(1)
                progress.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
                if step % eval_every == 0 or step == steps_total:
                    input_sample.enabled = True
                    record = {"step": step, "epoch": epoch + 1, "train_loss": float(np.mean(losses[-eval_every * gas:])),
                              "elapsed_s": time.perf_counter() - start,
                              "dev": evaluate(engine, spec, raw, encoded, "dev", args.eval_batch_size)}
                    input_sample.enabled = False
                    if args.adapter is None:
                        record["diversity"] = expert_diversity(layers, inputs=input_sample.take())  # every rank
                    elif adapter is not None and adapter.config.is_mixture:
                        record["lora_diversity"] = lora_diversity(engine.module, dev_sample)["summary"]
                    if rank == 0:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(record) + "\n")
                    if engine.monitor.enabled and rank == 0:
                        engine.monitor.write_events([(f"Eval/dev/{k}", v, engine.global_samples)
                                                     for k, v in record["dev"].items()]
                                                    + (diversity_events(record["diversity"], engine.global_samples)
                                                       if "diversity" in record else [])
                                                    + lora_diversity_events(record.get("lora_diversity"),
                                                                            engine.global_samples))
                if args.save_every and (step % args.save_every == 0 or step == steps_total):
                    save_checkpoint(engine, checkpoint_dir(args), client_state={
                        "data": {"epoch": epoch, "batches_done": batches_done},
                        "losses": losses[-eval_every * gas:],
                        "train_seconds": seconds_before + time.perf_counter() - start},
                        model_config=engine.module.config, tokenizer=tokenizer)
                    prune_checkpoints(checkpoint_dir(args), args.keep_checkpoints)
            if step >= steps_total:
                break
        skip = 0
        epoch += 1
    progress.close()
    train_seconds = seconds_before + time.perf_counter() - start

    load_counter.enabled = input_sample.enabled = True
    final = {"dev": evaluate(engine, spec, raw, encoded, "dev", args.eval_batch_size)}
    load_counter.enabled = input_sample.enabled = False
    if args.adapter is None:
        final_diversity = expert_diversity(layers, inputs=input_sample.take())
        diversity = {"expert_param_variance": param_variance_by_layer(final_diversity),
                     "dev_expert_load": load_counter.read(), **final_diversity}
        adapter_results = {"mean_expert_param_variance": mean_param_variance(diversity["expert_param_variance"])}
    else:
        diversity = None
        adapter_results = adapter_outcome(engine, adapter, args, dev_sample, rank)
    if "test" in encoded:
        final["test"] = evaluate(engine, spec, raw, encoded, "test", args.eval_batch_size)
    memory = memory_per_rank(engine)
    if rank == 0:
        results = {"task": spec.name, "primary_metric": spec.primary_metric, "model": args.model,
                   "optimizer": args.optimizer, "base_optimizer": base, "adapter": args.adapter, "seed": args.seed,
                   "steps": engine.global_steps, "world_size": world, "train_seconds": train_seconds,
                   "o_steps": engine.omoe.o_steps_done if engine.omoe is not None else 0,
                   **step_times.summary(), **memory,
                   **final, "diversity": diversity, **adapter_results,
                   "config": {"args": {k: v for k, v in vars(args).items()}, "deepspeed": ds_config}}
        with open(os.path.join(args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        summary = {s: final[s].get(spec.primary_metric) for s in final}
        print(f"[omoe_ds.train] {args.task} {args.optimizer}: {spec.primary_metric} {summary}, "
              f"{train_seconds:.0f}s -> {args.output_dir}/results.json")


class StepTimes:
    """Wall seconds of each optimizer step by kind (R or O), measured from the first micro-batch's forward to
    the end of engine.step(); eval and checkpoint time fall outside. A resumed run times only its own steps."""

    def __init__(self):
        self.seconds = {"R": [], "O": []}

    def add(self, kind: str, seconds: float) -> None:
        self.seconds[kind].append(seconds)

    def summary(self) -> dict:
        r, o = (statistics.median(self.seconds[k]) if self.seconds[k] else None for k in ("R", "O"))
        return {"r_step_s": r, "o_step_s": o, "o_step_extra_s": o - r if r is not None and o is not None else None,
                "timed_r_steps": len(self.seconds["R"]), "timed_o_steps": len(self.seconds["O"]),
                "r_steps_total_s": sum(self.seconds["R"]), "o_steps_total_s": sum(self.seconds["O"])}


def memory_per_rank(engine) -> dict:
    """Peak RSS and projector bytes, each the max over ranks (every rank calls: it gathers). The RSS peak
    covers the process's whole life (model load and evals included); projector bytes are those held at the end."""
    from deepspeed.accelerator import get_accelerator
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    stores = engine.omoe.storage_report() if engine.omoe is not None else []
    accelerator = get_accelerator()
    device = accelerator.max_memory_allocated() if accelerator.device_name() != "cpu" else None
    ranks = collectives.gather_objects({"rss": rss, "projector": sum(s["bytes"] for s in stores),
                                        "projector_dense": sum(s["dense_bytes"] for s in stores), "device": device})
    peak_device = [r["device"] for r in ranks if r["device"] is not None]
    return {"peak_rss_bytes_per_rank": max(r["rss"] for r in ranks),
            "peak_rss_bytes_by_rank": [r["rss"] for r in ranks],
            "peak_device_bytes_per_rank": max(peak_device) if peak_device else None,
            "projector_bytes_per_rank": max(r["projector"] for r in ranks),
            "projector_dense_bytes_per_rank": max(r["projector_dense"] for r in ranks),
            "projector_forms": sorted({s["form"] for s in stores})}


def cli(argv=None):
    """The command: the job, then every rank leaves the process group together (collectives.shutdown).
    main() alone leaves the group up for callers that go on using it."""
    try:
        main(argv)
    except OMoEConfigError as error:  # a refused input: its message is the whole story, not a traceback per rank
        print(f"omoe_ds.train: error: {error}", file=sys.stderr)
        sys.exit(2)
    collectives.shutdown()


if __name__ == "__main__":
    cli()
