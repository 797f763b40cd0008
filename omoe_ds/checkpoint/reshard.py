"""Move a checkpoint to another expert-parallel size and world size, optimizer state included.

    python -m omoe_ds.reshard --src runs/x/checkpoints --dst runs/x_ep1 --ep-size 1 --world-size 1

then `omoe_ds.load_checkpoint(engine, "runs/x_ep1")` (or `omoe_ds.train --resume` with the
directory as `--output-dir/checkpoints`) on a job launched with that many ranks and --ep-size.

DeepSpeed 0.19.8 loads an EP=2 checkpoint at EP=1 for weights but not for optimizer state, and its
universal-checkpoint converter does not know MoE expert groups; so this tool reads DeepSpeed's own
files and writes one consolidated, topology-free copy:
- every parameter in fp32 under its global name (experts by global id), with every optimizer
  state tensor (Adam's moments, RMSprop's square average, …) and the step, reassembled from the
  ZeRO-1/2 partitions through the `param_slice_mappings` DeepSpeed stores in them, or from the
  per-EP-rank optimizer files without ZeRO;
- the lr scheduler, step counters and client state;
- every optimizer group's own settings (lr, weight_decay, betas, …) with its parameters' global names;
  each target group takes the settings of the source group that held its parameters;
- OMoE's projectors (keyed by global id already) and S, and the open windows: the source ranks'
  partial sums (per global expert) are added and given to target rank 0, the other ranks get zeros
  (the O step's world all-reduce adds every rank's partial sums anyway).
`load_checkpoint` sees `universal` in its meta and writes each parameter's slice into whatever
partitioning the target engine has (`load_universal`). Per-rank RNG states are taken from the
source rank of the same index, or rank 0's when the target has more ranks.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections import defaultdict
from typing import Dict

import torch

from ..core import collectives
from ..experts import find_expert_layers
from .layout import (COMMON_FILE, COMPLETE_MARKER, DENSE_FILE, EXPERT_INFIX, HF_DIR, META_FILE, NON_EXPERT_FILE,
                     WINDOW_LAYOUT, CheckpointError, expert_file, expert_name_parts, global_parameter_names,
                     projector_file, rank_file, read_marker, resolve_tag_dir, universal_expert_file, window_partials,
                     write_json_atomic)


def _load(path: str):
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is missing from the checkpoint")
    return torch.load(path, map_location="cpu", weights_only=False)


def _layer_of(meta: dict) -> Dict[str, int]:
    return {layer["name"]: L for L, layer in enumerate(meta["layers"])}


def _to_global(name: str, rank: int, meta: dict, layer_of: Dict[str, int]) -> str:
    parts = expert_name_parts(name)
    if parts is None:
        return name
    prefix, local, rest = parts
    layer = meta["layers"][layer_of[prefix]]
    ep = layer["ep_size"]
    global_id = (rank % ep) * (layer["num_experts"] // ep) + local  # EP groups are contiguous ranks
    return f"{prefix}{EXPERT_INFIX}{global_id}.{rest}"


def consolidate(tag_dir: str) -> dict:
    """{global name: {"param": fp32 tensor, "state": {key: tensor or scalar}}}, plus group settings."""
    meta = _load(os.path.join(tag_dir, META_FILE))
    world = meta["world_size"]
    layer_of = _layer_of(meta)
    model_states = _load(os.path.join(tag_dir, NON_EXPERT_FILE))
    shapes = {name: tuple(t.shape) for name, t in model_states["module"].items()}
    weights = {name: t.float() for name, t in model_states["module"].items()}
    for L, layer in enumerate(meta["layers"]):
        for g in range(layer["num_experts"] if _expert_parallel(layer) else 0):
            for name, t in _load(os.path.join(tag_dir, expert_file(L, g))).items():
                shapes[name], weights[name] = tuple(t.shape), t.float()
    params = {name: {"param": weights[name], "state": {}} for name in weights}
    groups = []  # per source optimizer group: its settings and its parameters' global names (all ranks)
    stage = meta["zero_stage"]
    if stage in (1, 2):
        pieces = defaultdict(lambda: defaultdict(list))  # name → key → [(rank, fragment)]
        scalars = defaultdict(dict)
        for rank in range(world):
            path = os.path.join(tag_dir, f"{'bf16_' if _is_bf16(tag_dir) else ''}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
            sd = _load(path)["optimizer_state_dict"]
            if not isinstance(sd["base_optimizer_state"], dict):
                raise CheckpointError(f"{path}: elastic ZeRO checkpoints are not supported; save with "
                                      "zero_optimization.elastic_checkpoint false")
            base = sd["base_optimizer_state"]
            rank_names = _load(os.path.join(tag_dir, rank_file(rank)))["optimizer_param_names"]
            if len(rank_names) != len(base["param_groups"]):
                raise CheckpointError(f"{os.path.join(tag_dir, rank_file(rank))} names {len(rank_names)} optimizer "
                                      f"groups, {path} holds {len(base['param_groups'])}: the files are from "
                                      "different saves")
            for i, mapping in enumerate(sd["param_slice_mappings"]):
                fp32 = sd["single_partition_of_fp32_groups"][i]
                state = base["state"].get(i, {})
                _add_group(groups, i, base["param_groups"][i], rank_names[i])
                for name, address in mapping.items():
                    global_name = _to_global(name, rank, meta, layer_of)
                    piece = pieces[global_name]
                    piece["param"].append((rank, fp32.narrow(0, address.start, address.numel)))
                    for key, value in state.items():
                        if torch.is_tensor(value) and value.dim() == 1 and value.numel() >= address.start + address.numel \
                                and value.numel() > 1:
                            piece[key].append((rank, value.narrow(0, address.start, address.numel)))
                        else:
                            scalars[global_name][key] = value
        for name, by_key in pieces.items():
            for key, frags in by_key.items():
                full = torch.cat([t for _, t in sorted(frags, key=lambda x: x[0])]).reshape(shapes[name]).clone()
                if key == "param":
                    params[name]["param"] = full
                else:
                    params[name]["state"][key] = full
            params[name]["state"].update(scalars[name])
    elif stage == 0:
        # DeepSpeed writes expp_rank_* optimizer files only for models with its native MoE layers; without
        # them (fused experts only) the optimizer state sits in the model-states file.
        native = [layer["ep_size"] for layer in meta["layers"] if _expert_parallel(layer)]
        for ep_rank in range(max(native) if native else 1):
            path = os.path.join(tag_dir, f"expp_rank_{ep_rank}_mp_rank_00_optim_states.pt" if native else NON_EXPERT_FILE)
            optimizer = _load(path)["optimizer"]
            names = _load(os.path.join(tag_dir, rank_file(ep_rank)))["optimizer_param_names"]
            if not isinstance(optimizer, dict) or "state" not in optimizer:
                raise CheckpointError(f"{path}: resharding supports fp32 torch optimizers without ZeRO, and ZeRO "
                                      "stages 1 and 2 (fp32 or bf16); this optimizer state has another format")
            for g, group in enumerate(optimizer["param_groups"]):
                _add_group(groups, g, group, names[g])
                for idx, name in zip(group["params"], names[g]):
                    state = optimizer["state"].get(idx, {})
                    params[name]["state"] = {k: (v.clone() if torch.is_tensor(v) and v.dim() else v)
                                             for k, v in state.items()}
    else:
        raise CheckpointError(f"{tag_dir}: ZeRO stage {stage} checkpoints cannot be resharded")
    common = {"lr_scheduler": model_states.get("lr_scheduler"), "global_steps": model_states["global_steps"],
              "global_samples": model_states["global_samples"], "skipped_steps": model_states.get("skipped_steps", 0),
              "client_state": {k: v for k, v in model_states.items() if k not in _DEEPSPEED_KEYS},
              "optimizer_groups": groups}
    return {"meta": meta, "params": params, "common": common}


def _add_group(groups: list, i: int, group: dict, names) -> None:
    """Source optimizer group i: its own settings (lr, weight_decay, betas, …), and its parameters' names
    joined over the ranks (an expert group holds other experts on each EP rank)."""
    groups.extend(None for _ in range(i + 1 - len(groups)))
    if groups[i] is None:
        groups[i] = {"settings": {k: v for k, v in group.items() if k != "params"}, "params": []}
    known = set(groups[i]["params"])
    groups[i]["params"].extend(n for n in names if n not in known)


_DEEPSPEED_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                   "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
                   "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
                   "ds_version", "tp_world_size", "pp_world_size", "ep_world_size", "checkpoint_parallel_metadata"}


def _is_bf16(tag_dir: str) -> bool:
    return any(name.startswith("bf16_zero_pp_rank_") for name in os.listdir(tag_dir))


def _expert_parallel(layer_meta: dict) -> bool:
    """A layer whose experts DeepSpeed shards and saves per expert (its native MoE; metas before the
    layout key held only those); replicated fused experts are dense parameters to DeepSpeed."""
    return layer_meta.get("layout", "deepspeed-ffn").startswith("deepspeed")


def check_target(meta: dict, ep_size: int, world_size: int, where: str) -> None:
    if world_size < 1 or ep_size < 1:
        raise CheckpointError(f"--world-size={world_size} and --ep-size={ep_size} must be >= 1")
    if world_size % ep_size:
        raise CheckpointError(f"--ep-size={ep_size} does not divide --world-size={world_size}; pick an EP size that "
                              "divides the number of ranks")
    for L, layer in enumerate(meta["layers"]):
        if layer.get("layout") == "autoep-swiglu":
            raise CheckpointError(f"{where}: MoE layer {L} ({layer['name']}) is a DeepSpeed AutoEP layer; resharding "
                                  "AutoEP checkpoints is not supported yet: resume on the world size and autoep_size "
                                  "it was saved with")
        if _expert_parallel(layer) and layer["num_experts"] % ep_size:
            raise CheckpointError(f"{where}: MoE layer {L} has {layer['num_experts']} experts, which --ep-size="
                                  f"{ep_size} does not divide; pick a divisor of {layer['num_experts']}")


def reshard(src: str, dst: str, ep_size: int, world_size: int, tag=None) -> str:
    """Write the consolidated copy of src's checkpoint for `world_size` ranks at `ep_size` into dst/<tag>."""
    tag_dir = resolve_tag_dir(src, tag)
    if read_marker(tag_dir) is None:
        raise CheckpointError(f"{tag_dir} is incomplete (no {COMPLETE_MARKER}); reshard a complete checkpoint")
    meta = _load(os.path.join(tag_dir, META_FILE))
    check_target(meta, ep_size, world_size, os.path.join(tag_dir, META_FILE))
    if os.path.exists(dst) and os.listdir(dst):
        raise CheckpointError(f"--dst {dst} is not empty; choose a new directory (nothing was written)")
    data = consolidate(tag_dir)
    name = os.path.basename(tag_dir.rstrip("/"))
    tmp = os.path.join(os.path.dirname(os.path.abspath(dst)), f".{os.path.basename(dst)}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    out = os.path.join(tmp, name)
    os.makedirs(out)

    dense = {n: v for n, v in data["params"].items() if expert_name_parts(n) is None}
    torch.save(dense, os.path.join(out, DENSE_FILE))
    layer_of = _layer_of(meta)
    by_expert = defaultdict(dict)
    for n, v in data["params"].items():
        parts = expert_name_parts(n)
        if parts is not None:
            by_expert[(layer_of[parts[0]], parts[1])][n] = v
    for (L, g), entries in by_expert.items():
        torch.save(entries, os.path.join(out, universal_expert_file(L, g)))
    torch.save(data["common"], os.path.join(out, COMMON_FILE))

    source_ranks = [_load(os.path.join(tag_dir, rank_file(r))) for r in range(meta["world_size"])]
    new_meta = {**meta, "universal": True, "world_size": world_size, "source_world_size": meta["world_size"],
                "layers": [{**layer, "ep_size": ep_size if _expert_parallel(layer) else 1} for layer in meta["layers"]]}
    torch.save(new_meta, os.path.join(out, META_FILE))
    for r in range(world_size):
        state = {"format": source_ranks[0]["format"], "rank": r, "world_size": world_size,
                 "rng": source_ranks[r if r < len(source_ranks) else 0]["rng"]}
        if meta["omoe"] is not None:
            state["windows"] = [_target_window(source_ranks, L, layer, new_meta["layers"][L]["ep_size"], r)
                                for L, layer in enumerate(meta["layers"])]
        torch.save(state, os.path.join(out, rank_file(r)))
    if meta["omoe"] is not None:
        for L, layer in enumerate(meta["layers"]):
            for g in range(layer["num_experts"]):
                shutil.copy2(os.path.join(tag_dir, projector_file(L, g)), os.path.join(out, projector_file(L, g)))
    if os.path.isdir(os.path.join(tag_dir, HF_DIR)):
        shutil.copytree(os.path.join(tag_dir, HF_DIR), os.path.join(out, HF_DIR))
    files = {os.path.relpath(os.path.join(root, f), out): os.path.getsize(os.path.join(root, f))
             for root, _, fs in os.walk(out) for f in fs}
    write_json_atomic(os.path.join(out, COMPLETE_MARKER),
                      {"format": new_meta["format"], "tag": name, "global_steps": meta["global_steps"],
                       "world_size": world_size, "files": files, "resharded_from": os.path.abspath(tag_dir)})
    if os.path.exists(dst):
        os.rmdir(dst)
    os.replace(tmp, dst)
    return os.path.join(dst, name)


def _target_window(source_ranks, L: int, layer: dict, ep_size: int, rank: int) -> dict:
    """Target rank `rank`'s window of layer L: the sum of every source rank's partial sums on rank 0,
    zeros elsewhere; any split is exact, since the O step sums the ranks' partials over the world."""
    partials = [window_partials(source["windows"][L], layer["num_experts"], f"{rank_file(r)}, window of MoE layer {L}")
                for r, source in enumerate(source_ranks)]
    sums = [torch.zeros_like(s) for s in partials[0][0]]
    counts = torch.zeros_like(partials[0][1])
    if rank == 0:
        for source_sums, source_counts in partials:
            for w in range(2):
                sums[w] += source_sums[w]
            counts += source_counts
    return {"layout": WINDOW_LAYOUT, "sums": sums, "counts": counts}


# ---- the load side ------------------------------------------------------------------------------
@torch.no_grad()
def load_universal(engine, tag_dir: str, meta: dict, load_optimizer_states: bool = True,
                   load_lr_scheduler_states: bool = True) -> dict:
    """Write every parameter's slice of a consolidated checkpoint into the engine's own partitioning."""
    layers = engine.omoe.layers if engine.omoe is not None else find_expert_layers(engine.module)
    names = global_parameter_names(engine.module, layers)
    entries = dict(_load(os.path.join(tag_dir, DENSE_FILE)))
    wanted = set()
    for L, layer in enumerate(layers):
        for l in range(layer.num_local_experts if layer.deepspeed_expert_files else 0):
            wanted.add((L, collectives.ep_rank(layer.ep_size) * layer.num_local_experts + l))
    for L, g in sorted(wanted):
        entries.update(_load(os.path.join(tag_dir, universal_expert_file(L, g))))
    common = _load(os.path.join(tag_dir, COMMON_FILE))
    settings = _target_group_settings(engine, names, common, tag_dir) if load_optimizer_states else None
    by_param = {}
    for p in engine.module.parameters():
        name = names[id(p)]
        if name not in entries:
            raise CheckpointError(f"{tag_dir}: no entry for parameter {name}")
        p.data.copy_(entries[name]["param"].to(p.dtype))
        by_param[p] = entries[name]
    if load_optimizer_states:
        _load_optimizer(engine, by_param, settings)
    if load_lr_scheduler_states and engine.lr_scheduler is not None and common["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(common["lr_scheduler"])
    engine.global_steps = common["global_steps"]
    engine.global_samples = common["global_samples"]
    engine.skipped_steps = common["skipped_steps"]
    return common["client_state"]


def _target_group_settings(engine, names: dict, common: dict, tag_dir: str) -> list:
    """Settings for each group of the engine's torch optimizer: those of the source group that held its
    parameters (matched by global name). Computed before anything is loaded, so a misfit changes nothing."""
    opt = engine.optimizer
    if hasattr(opt, "bit16_groups"):
        groups, model_groups = opt.optimizer.param_groups, opt.bit16_groups
    elif isinstance(opt, torch.optim.Optimizer):
        groups, model_groups = opt.param_groups, [g["params"] for g in opt.param_groups]
    else:
        return []  # _load_optimizer names the unsupported optimizer
    if "optimizer_groups" not in common:  # resharded before per-group settings were kept: one moe, one dense
        old = common.get("group_settings", {})
        return [old.get("moe" if g.get("moe") else "dense", {}) for g in groups]
    source = common["optimizer_groups"]
    owner = {n: i for i, g in enumerate(source) if g is not None for n in g["params"]}
    out = []
    for t, params in enumerate(model_groups):
        found = {}
        for p in params:
            name = names[id(p)]
            if name not in owner:
                raise CheckpointError(f"{os.path.join(tag_dir, COMMON_FILE)}: parameter {name} of this job's optimizer "
                                      f"group {t} is in no optimizer group of the checkpoint; build the optimizer over "
                                      "the same parameters as the saved run")
            found.setdefault(owner[name], name)
        settings = [source[i]["settings"] for i in found]
        if any(not _same_settings(settings[0], other) for other in settings[1:]):
            (a, na), (b, nb) = list(found.items())[:2]
            raise CheckpointError(f"{os.path.join(tag_dir, COMMON_FILE)}: this job's optimizer group {t} holds {na} and "
                                  f"{nb}, which the checkpoint keeps in groups {a} and {b} with different settings; "
                                  "build the optimizer with the saved run's parameter groups")
        out.append(settings[0] if settings else {})
    return out


def _same_settings(a: dict, b: dict) -> bool:
    keys = (set(a) | set(b)) - {"name", "moe", "params"}
    try:
        return all(bool(a.get(k) == b.get(k)) for k in keys)
    except (RuntimeError, TypeError):  # tensor-valued settings of another shape
        return False


def _load_optimizer(engine, by_param: dict, group_settings: list) -> None:
    opt = engine.optimizer
    if hasattr(opt, "bit16_groups"):  # ZeRO 1/2
        base = opt.optimizer
        for i, group in enumerate(opt.bit16_groups):
            flat = opt.single_partition_of_fp32_groups[i]
            state = base.state[flat]
            for lp in group:
                entry = by_param[lp]
                mapping = getattr(lp, "_hp_mapping", None)
                for key, value in entry["state"].items():
                    if torch.is_tensor(value) and value.dim() > 0:
                        if key not in state:
                            state[key] = torch.zeros_like(flat)
                    else:
                        state[key] = value.clone() if torch.is_tensor(value) else value
                if mapping is None:
                    continue
                lp_at, hp_at = mapping.lp_fragment_address, mapping.hp_fragment_address
                mapping.hp_fragment.copy_(entry["param"].flatten().narrow(0, lp_at.start, lp_at.numel))
                for key, value in entry["state"].items():
                    if torch.is_tensor(value) and value.dim() > 0:
                        state[key].narrow(0, hp_at.start, hp_at.numel).copy_(
                            value.flatten().narrow(0, lp_at.start, lp_at.numel))
        groups = base.param_groups
    elif isinstance(opt, torch.optim.Optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state[p] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in by_param[p]["state"].items()}
        groups = opt.param_groups
    else:
        raise CheckpointError(f"loading a resharded checkpoint into a {type(opt).__name__} is not supported; use "
                              "ZeRO stage 1/2 or an fp32 torch optimizer without ZeRO")
    for group, settings in zip(groups, group_settings):  # each group its own saved lr, weight_decay, betas, …
        for key, value in settings.items():
            if key in group and key not in ("name", "moe", "params"):
                group[key] = value


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="a save dir (its latest complete tag) or a tag dir")
    p.add_argument("--dst", required=True, help="a new directory")
    p.add_argument("--ep-size", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    try:
        out = reshard(args.src, args.dst, args.ep_size, args.world_size, args.tag)
    except CheckpointError as e:
        sys.exit(f"omoe_ds.reshard: {e}")
    print(f"[omoe_ds.reshard] {out}: for {args.world_size} ranks at ep_size {args.ep_size}")


if __name__ == "__main__":
    main()
