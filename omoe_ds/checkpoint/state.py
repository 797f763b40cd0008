"""DeepSpeed checkpoints that carry OMoE's state, resume exactly, and survive a job killed mid-save.

    tag = omoe_ds.save_checkpoint(engine, "runs/x/checkpoints", client_state={"data": ...})
    client_state = omoe_ds.load_checkpoint(engine, "runs/x/checkpoints")  # latest *complete* tag

A tag directory holds DeepSpeed's own files (weights, per-expert files, optimizer state, lr
scheduler, step counters) and ours, in separate files so that DeepSpeed's checkpoint filters (it
drops non-expert state keys containing "expert") never see them:
- `omoe_meta.pt` (rank 0): topology, parameter shapes, OMoE config, counters and S per layer;
- `omoe_proj_layer{L}_e{g}.pt`: projectors of global expert g, written by its first EDP replica;
- `omoe_rank{r}.pt`: rank r's open-window partial sums/counts per global expert (Σx of the tokens it
  sent, Σh of its local experts' slots; the O step's world all-reduce adds them), its RNG states, and
  its optimizer groups' parameter names (for resharding);
- `hf_model/`: the Hugging Face config (with `omoe_moe`) and tokenizer, when given;
- `omoe_complete.json`: written last, atomically, by rank 0 after every rank's files are on
  disk, listing every file with its size. A tag without it (a job died during the save) is never
  taken as the latest, whatever DeepSpeed's own `latest` file says.
Checkpoints are taken at gradient-accumulation boundaries only: DeepSpeed does not save
half-accumulated gradients.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
from typing import Dict, List, Optional

import numpy as np
import torch

from ..core import collectives
from ..experts import STREAMS, ExpertLayer, find_expert_layers
from .layout import (COMPLETE_MARKER, FORMAT_VERSION, HF_DIR, META_FILE, WINDOW_LAYOUT, CheckpointError, complete_tags,
                     expert_file, global_parameter_names, latest_complete_tag, projector_file, rank_file, read_marker,
                     resolve_tag_dir, universal_expert_file, window_partials, write_json_atomic)
from .reshard import load_universal

FAULT_ENV = "OMOE_DS_FAULT"  # test hook: "kill_in_save:STEP:RANK" SIGKILLs that rank at that point


# ---- save ---------------------------------------------------------------------------------------
def save_checkpoint(engine, save_dir: str, tag: Optional[str] = None, client_state: Optional[dict] = None,
                    model_config=None, tokenizer=None) -> str:
    """engine.save_checkpoint plus OMoE's state, RNG states and a completion marker. Every rank calls
    it. Returns the tag directory."""
    gas = engine.gradient_accumulation_steps()
    if engine.micro_steps % gas:
        raise CheckpointError(
            f"save_checkpoint at micro step {engine.micro_steps} is inside a gradient-accumulation window "
            f"(gradient_accumulation_steps={gas}): DeepSpeed does not save half-accumulated gradients; "
            "save after engine.step() has completed an optimizer step")
    tag = str(tag if tag is not None else f"global_step{engine.global_steps}")
    tag_dir = os.path.join(save_dir, tag)
    rank = collectives.rank()
    layers = engine.omoe.layers if engine.omoe is not None else find_expert_layers(engine.module)
    if rank == 0:
        os.makedirs(tag_dir, exist_ok=True)
        if os.path.exists(os.path.join(tag_dir, COMPLETE_MARKER)):
            os.remove(os.path.join(tag_dir, COMPLETE_MARKER))  # rewriting a tag: incomplete until done
    collectives.barrier()

    names = global_parameter_names(engine.module, layers)
    rank_state = {"format": FORMAT_VERSION, "rank": rank, "world_size": collectives.world_size(),
                  "rng": _rng_state(),
                  "optimizer_param_names": [[names[id(p)] for p in g["params"]]
                                            for g in _torch_optimizer(engine).param_groups]}
    if engine.omoe is not None:
        omoe = engine.omoe
        rank_state["windows"] = [{"layout": WINDOW_LAYOUT, "sums": [s.clone() for s in window.sums],
                                  "counts": window.counts.clone()} for window in omoe.windows]
        for L, layer in enumerate(layers):
            if rank // layer.ep_size == 0:  # the first replica of these experts writes their projectors
                for l in range(layer.num_local_experts):
                    torch.save({STREAMS[st]: _projector_payload(store, l) for st, store in enumerate(omoe.projectors[L])},
                               os.path.join(tag_dir, projector_file(L, omoe.global_expert_id(L, l))))
    torch.save(rank_state, os.path.join(tag_dir, rank_file(rank)))
    if rank == 0:
        torch.save(_meta(engine, layers, names), os.path.join(tag_dir, META_FILE))
        if model_config is not None:
            if model_config is getattr(engine.module, "config", None) and hasattr(engine.module, "save_pretrained"):
                model_config.architectures = [type(engine.module).__name__]  # as save_pretrained records it
            model_config.save_pretrained(os.path.join(tag_dir, HF_DIR))
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(tag_dir, HF_DIR))

    engine.save_checkpoint(save_dir, tag, client_state=client_state or {})  # writes `latest` before its last barrier
    fault_point("kill_in_save", engine.global_steps)
    collectives.barrier()  # every rank is past its writes: only now is the tag complete
    if rank == 0:
        files = {}
        for root, _, filenames in os.walk(tag_dir):
            for name in filenames:
                path = os.path.join(root, name)
                files[os.path.relpath(path, tag_dir)] = os.path.getsize(path)
        write_json_atomic(os.path.join(tag_dir, COMPLETE_MARKER),
                          {"format": FORMAT_VERSION, "tag": tag, "global_steps": engine.global_steps,
                           "world_size": collectives.world_size(), "files": files})
    collectives.barrier()
    return tag_dir


def prune_checkpoints(save_dir: str, keep: int) -> None:
    """Rank 0, after a complete save: drop all but the newest `keep` complete tags (0 keeps all)."""
    if keep > 0 and collectives.rank() == 0:
        import shutil
        for tag in complete_tags(save_dir)[:-keep]:
            os.remove(os.path.join(save_dir, tag, COMPLETE_MARKER))  # first, so a half-deleted tag is never complete
            shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)



def _torch_optimizer(engine):
    """The torch optimizer whose param_groups hold the model's parameters (ZeRO keeps them in bit16 groups)."""
    opt = engine.optimizer
    for attr in ("bit16_groups", "bf16_groups"):  # ZeRO 1/2 and bf16: param_groups hold flat fp32 partitions
        if hasattr(opt, attr):
            return _GroupView([{"params": g} for g in getattr(opt, attr)])
    return opt


class _GroupView:
    def __init__(self, param_groups):
        self.param_groups = param_groups


# Checkpoints written before projectors were keyed by input stream named them by FFN matrix.
_LEGACY_PROJECTOR_KEYS = {"x": "w1", "h": "w2"}


def _projector_payload(store, local: int):
    """What an expert's projector file holds per stream: P (dense) or {"factors": U [n, t]} (factored, hybrid)."""
    if store.form == "dense":
        return store.P[local].clone()  # clone: a view would save the whole [E_local, n, n] stack
    factors = store.W[:, local] if store.form == "hybrid" else store.V[:, store.first_global + local]
    return {"factors": factors.clone()}


def _sum_payload(store):
    """What the meta holds per layer and stream: S (dense, hybrid) or every expert's factors {"factors": V [n, M, t]}."""
    return {"factors": store.V.clone()} if store.form == "factored" else store.S.clone()


def _stream_of(saved: dict, stream: str) -> torch.Tensor:
    return saved[stream] if stream in saved else saved[_LEGACY_PROJECTOR_KEYS[stream]]


def _matrix_shapes(layer) -> list:
    """[out, in] of each expert matrix in the layout's order (FFN: w1, w2, as checkpoints always recorded)."""
    return layer.matrix_shapes()


def _full_shape(p) -> list:
    return list(getattr(p, "ds_shape", p.shape))  # ZeRO-3 leaves p.shape empty outside the forward


def _meta(engine, layers: List[ExpertLayer], names: Dict[int, str]) -> dict:
    from deepspeed.moe.utils import is_moe_param
    omoe = engine.omoe
    hf_config = getattr(engine.module, "config", None)
    meta = {"format": FORMAT_VERSION, "world_size": collectives.world_size(), "global_steps": engine.global_steps,
            "zero_stage": engine.zero_optimization_stage(),
            "model_class": type(engine.module).__name__,
            "model_type": getattr(hf_config, "model_type", None),
            "dense_shapes": {names[id(p)]: _full_shape(p) for p in engine.module.parameters() if not is_moe_param(p)},
            "layers": [{"name": layer.name, "num_experts": layer.num_experts, "ep_size": layer.ep_size,
                        "layout": layer.layout, "shapes": _matrix_shapes(layer)}
                       for layer in layers],
            "omoe": None}
    if omoe is not None:
        meta["omoe"] = {"config": dataclasses.asdict(omoe.config), "o_steps_done": omoe.o_steps_done,
                        "prepared_step": omoe.prepared_step,
                        "deferred_o_step": getattr(omoe, "deferred_o_step", None),  # an O step fp16 overflow skipped
                        "S": [[_sum_payload(store) for store in per_layer] for per_layer in omoe.projectors]}
    return meta


def _rng_state() -> dict:
    from deepspeed.accelerator import get_accelerator
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if get_accelerator().device_name() != "cpu":
        state["accelerator"] = get_accelerator().get_rng_state()
    return state


def _restore_rng(state: dict) -> None:
    from deepspeed.accelerator import get_accelerator
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "accelerator" in state and get_accelerator().device_name() != "cpu":
        get_accelerator().set_rng_state(state["accelerator"])


def fault_point(name: str, step: int) -> None:
    """Crash tests only: SIGKILL this rank here when OMOE_DS_FAULT names this point, step and rank."""
    spec = os.environ.get(FAULT_ENV, "")
    if spec:
        fault, at_step, at_rank = spec.split(":")
        if fault == name and int(at_step) == step and int(at_rank) == collectives.rank():
            os.kill(os.getpid(), signal.SIGKILL)


# ---- load ---------------------------------------------------------------------------------------
def check_checkpoint(engine, tag_dir: str) -> dict:
    """Every mismatch between the checkpoint and this job, as one CheckpointError naming the file;
    nothing is read into the engine and nothing in tag_dir is changed. Returns the meta dict."""
    marker = read_marker(tag_dir)
    if marker is None:
        latest = latest_complete_tag(os.path.dirname(tag_dir.rstrip("/")))
        raise CheckpointError(
            f"{tag_dir} is incomplete: it has no {COMPLETE_MARKER}, so the job that wrote it died during the save"
            + (f"; the latest complete checkpoint is {latest}" if latest else "") + ". Load a complete tag")
    for name, size in marker["files"].items():
        path = os.path.join(tag_dir, name)
        if not os.path.exists(path):
            raise CheckpointError(f"{path} is missing from the checkpoint (listed in {COMPLETE_MARKER}); "
                                  "restore it or load another tag")
        if os.path.getsize(path) != size:
            raise CheckpointError(f"{path} has {os.path.getsize(path)} bytes but was written with {size}: "
                                  "it was changed or truncated after the save; load another tag")
    meta_path = os.path.join(tag_dir, META_FILE)
    if not os.path.exists(meta_path):
        raise CheckpointError(f"{meta_path} is missing: {tag_dir} was not written by omoe_ds.save_checkpoint")
    meta = torch.load(meta_path, weights_only=False)
    layers = engine.omoe.layers if engine.omoe is not None else find_expert_layers(engine.module)
    if meta["model_class"] != type(engine.module).__name__ or (
            meta["model_type"] != getattr(getattr(engine.module, "config", None), "model_type", None)):
        raise CheckpointError(f"{meta_path}: saved from a {meta['model_class']} (model_type {meta['model_type']}), "
                              f"but this job's model is a {type(engine.module).__name__}; load it into the same "
                              "architecture")
    if len(meta["layers"]) != len(layers):
        raise CheckpointError(f"{meta_path}: the checkpoint has {len(meta['layers'])} MoE layers, this model "
                              f"{len(layers)}; use the same --moe-layers")
    for L, (saved, layer) in enumerate(zip(meta["layers"], layers)):
        shapes = _matrix_shapes(layer)
        if saved["num_experts"] != layer.num_experts:
            raise CheckpointError(f"{meta_path}: MoE layer {L} ({layer.name}) has {saved['num_experts']} experts in "
                                  f"the checkpoint but {layer.num_experts} in this model; use --experts "
                                  f"{saved['num_experts']}")
        if saved["shapes"] != shapes:
            raise CheckpointError(f"{meta_path}: MoE layer {L} expert Linear shapes {saved['shapes']} in the "
                                  f"checkpoint, {shapes} in this model")
        for g in range(saved["num_experts"] if layer.deepspeed_expert_files else 0):
            path = os.path.join(tag_dir, universal_expert_file(L, g) if meta.get("universal") else expert_file(L, g))
            if not os.path.exists(path):
                raise CheckpointError(f"{path} is missing: MoE layer {L} needs one file per expert "
                                      f"(0…{saved['num_experts'] - 1})")
    names = global_parameter_names(engine.module, layers)
    from deepspeed.moe.utils import is_moe_param
    here = {names[id(p)]: _full_shape(p) for p in engine.module.parameters() if not is_moe_param(p)}
    if here != meta["dense_shapes"]:
        saved = meta["dense_shapes"]
        diff = ([f"missing here: {n}" for n in sorted(set(saved) - set(here))]
                + [f"not in the checkpoint: {n}" for n in sorted(set(here) - set(saved))]
                + [f"{n}: {saved[n]} saved, {here[n]} here" for n in sorted(set(here) & set(saved)) if here[n] != saved[n]])
        raise CheckpointError(f"{meta_path}: the checkpoint's dense parameters differ from this model's "
                              f"({'; '.join(diff[:4])}); load it into the same architecture")
    if engine.omoe is not None and meta["omoe"] is None:
        raise CheckpointError(f"{meta_path}: the checkpoint holds no OMoE state (it was saved with omoe disabled), "
                              "but this job has omoe enabled; set \"omoe\": {\"enabled\": false} to continue it as "
                              "saved")
    topology_saved = (meta["world_size"], [layer["ep_size"] for layer in meta["layers"]])
    topology_here = (collectives.world_size(), [layer.ep_size for layer in layers])
    if topology_saved != topology_here:
        raise CheckpointError(
            f"{tag_dir} was saved on {topology_saved[0]} ranks with ep_size {topology_saved[1]}, this job runs "
            f"{topology_here[0]} ranks with ep_size {topology_here[1]}; reshard it for this job: python -m omoe_ds.reshard "
            f"--src {tag_dir} --dst NEW_DIR --ep-size {topology_here[1][0] if topology_here[1] else 1} "
            f"--world-size {topology_here[0]}")
    if engine.omoe is not None:
        for L, layer in enumerate(layers):
            for g in range(layer.num_experts):
                path = os.path.join(tag_dir, projector_file(L, g))
                if not os.path.exists(path):
                    raise CheckpointError(f"{path} is missing: OMoE needs every expert's projectors")
        path = os.path.join(tag_dir, rank_file(collectives.rank()))
        if not os.path.exists(path):
            raise CheckpointError(f"{path} is missing: rank {collectives.rank()}'s OMoE window state")
        check_omoe_config(meta_path, meta["omoe"]["config"], dataclasses.asdict(engine.omoe.config))
    return meta


# The "omoe" keys that change the math of a run: a resumed run must keep them. Anything else (e.g. how the
# projectors are stored) is free to change, so this is an explicit list, not the whole section.
OMOE_MATH_KEYS = ("skip_step", "alpha0", "lam", "loo_divisor")
_OMOE_FLAGS = {"skip_step": "--skip-step", "alpha0": "--alpha0", "lam": "--lam"}


def check_omoe_config(where: str, saved: dict, here: dict) -> None:
    """Refuse a resume whose "omoe" section changes the math; total_steps (n of α_i = α0·λ^(i/n)) matters
    only where λ != 1. Keys an older checkpoint did not record are not compared."""
    keys = [k for k in OMOE_MATH_KEYS if k in saved]
    if "total_steps" in saved and saved.get("lam", 1.0) != 1:
        keys.append("total_steps")
    changed = [k for k in keys if saved[k] != here.get(k)]
    if not changed:
        return
    section = ", ".join(f"\"{k}\": {json.dumps(saved[k])}" for k in changed)
    flags = " ".join(f"{_OMOE_FLAGS[k]} {saved[k]}" for k in changed if k in _OMOE_FLAGS)
    if "total_steps" in changed:
        flags += (" " if flags else "") + f"--max-steps/--epochs giving {saved['total_steps']} steps"
    raise CheckpointError(
        f"{where}: the checkpoint was trained with another \"omoe\" section: "
        + "; ".join(f"{k} {saved[k]!r} saved, {here.get(k)!r} now" for k in changed)
        + ". Continuing would change the optimizer's math mid-run; resume with the saved values (\"omoe\": {"
        + section + "}" + (f"; omoe_ds.train: {flags}" if flags else "") + "), or start a new run")


def load_checkpoint(engine, load_dir: str, tag: Optional[str] = None, load_optimizer_states: bool = True,
                    load_lr_scheduler_states: bool = True) -> dict:
    """Load a checkpoint written by save_checkpoint (the latest complete tag when tag is None) into
    the engine, OMoE state and RNG included; returns the client_state. A resharded checkpoint
    (python -m omoe_ds.reshard) is loaded onto this job's topology."""
    tag_dir = resolve_tag_dir(load_dir, tag)
    meta = check_checkpoint(engine, tag_dir)
    if meta.get("universal"):
        client_state = load_universal(engine, tag_dir, meta, load_optimizer_states, load_lr_scheduler_states)
    else:
        save_dir, tag = os.path.split(tag_dir.rstrip("/"))
        path, client_state = engine.load_checkpoint(save_dir, tag, load_optimizer_states=load_optimizer_states,
                                                    load_lr_scheduler_states=load_lr_scheduler_states)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {tag_dir}")
    rank_state = torch.load(os.path.join(tag_dir, rank_file(collectives.rank())), weights_only=False)
    if engine.omoe is not None:
        _load_omoe_state(engine.omoe, tag_dir, meta, rank_state)
    _restore_rng(rank_state["rng"])
    return client_state or {}


@torch.no_grad()
def _load_omoe_state(omoe, tag_dir: str, meta: dict, rank_state: dict) -> None:
    saved = meta["omoe"]
    omoe.o_steps_done = saved["o_steps_done"]
    omoe.prepared_step = saved["prepared_step"]
    omoe.deferred_o_step = saved.get("deferred_o_step")  # absent in checkpoints written before it existed
    for L, layer in enumerate(omoe.layers):
        files = {}

        def expert_file_of(g):  # read once, only what this form needs
            if g not in files:
                files[g] = torch.load(os.path.join(tag_dir, projector_file(L, g)), weights_only=True)
            return files[g]

        for st, (stream, store) in enumerate(zip(STREAMS, omoe.projectors[L])):
            saved_sum = saved["S"][L][st]
            if isinstance(saved_sum, dict):  # factored: every expert's factors
                store.load_factored_(saved_sum["factors"])
                continue
            local = [_stream_of(expert_file_of(omoe.global_expert_id(L, l)), stream)
                     for l in range(layer.num_local_experts)]
            every = None
            if store.storage == "factored":
                every = [_stream_of(expert_file_of(g), stream) for g in range(layer.num_experts)]
            if isinstance(local[0], dict):  # hybrid: S, and each expert's own factors in its file
                store.load_hybrid_(torch.stack([f["factors"] for f in local], dim=1), saved_sum,
                                   torch.stack([f["factors"] for f in every], dim=1) if every else None)
            else:
                store.load_dense_(torch.stack(local), saved_sum, torch.stack(every) if every else None)
        where = f"{os.path.join(tag_dir, rank_file(collectives.rank()))}, window of MoE layer {L}"
        sums, counts = window_partials(rank_state["windows"][L], layer.num_experts, where)
        for w in range(2):
            omoe.windows[L].sums[w].copy_(sums[w])
        omoe.windows[L].counts.copy_(counts)
