"""A ZeRO-3 checkpoint's parameters, gathered from their partitions into whole fp32 tensors (read only).

Under ZeRO-3 DeepSpeed saves no weights in the model-states files: every parameter lives only as fp32 partitions
in the `zero_pp_rank_{r}_mp_rank_00_optim_states.pt` files, one flat tensor per optimizer sub-group. Dense
parameters are partitioned over the world; AutoEP's expert parameters (`<block>.experts.w1/w2/w3`, this EP rank's
experts) over their expert-data-parallel group, and each EP rank holds other experts.

DeepSpeed's `zero_to_fp32` refuses exactly these checkpoints (it assumes one partitioning over the world), and its
`ds_to_universal`, which does handle them, needs Adam's moments and writes every state of every parameter to disk.
So this reads the fp32 partitions the way `ds_to_universal` extracts them: per sub-group, the partition count and
rank DeepSpeed records (`ds_zero_partition_groups`), each parameter taking ceil(numel / count) elements of the flat
tensor; then DeepSpeed's own AutoEP affine map places each EP rank's experts into the [num_experts, …] tensor.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Tuple

import torch

from .layout import ZERO3_FILE_RE, CheckpointError, read_torch_file, zero3_file

AUTOEP_WEIGHTS = ("w1", "w2", "w3")


def zero3_ranks(tag_dir: str, kind: str = "model") -> List[int]:
    """The data-parallel ranks whose ZeRO-3 `kind` ("model" or "optim") states files a tag holds ([] for another
    checkpoint)."""
    ranks = []
    for name in os.listdir(tag_dir):
        m = ZERO3_FILE_RE.match(name)
        if m and m.group(3) == kind:
            if int(m.group(2)) != 0:
                raise CheckpointError(f"{os.path.join(tag_dir, name)}: a tensor-parallel (mp_rank {m.group(2)}) ZeRO-3 "
                                      "file; omoe-ds models are not tensor-parallel and export reads mp_rank 00 only")
            ranks.append(int(m.group(1)))
    return sorted(ranks)


def read_zero3(tag_dir: str) -> Tuple[dict, Dict[str, torch.Tensor], Dict[str, dict]]:
    """(rank 0's model-states dict, {name: whole fp32 tensor}, {expert parameter name: its AutoEP layer record}).

    Names are the module's parameter names (tied ones included, as DeepSpeed's shared_params records them) plus
    its buffers; an AutoEP expert parameter is whole: [num_experts, …], expert g at index g."""
    from deepspeed.checkpoint.constants import (AUTOEP_LAYERS_KEY, BUFFER_NAMES, FP32_FLAT_GROUPS,
                                                FROZEN_PARAM_SHAPES, OPTIMIZER_STATE_DICT, PARAM_SHAPES)
    from deepspeed.utils.zero_to_fp32 import zero3_partitioned_param_info
    found = {kind: zero3_ranks(tag_dir, kind) for kind in ("model", "optim")}
    first_path = os.path.join(tag_dir, zero3_file(0, "model"))
    first = read_torch_file(first_path, "DeepSpeed's ZeRO-3 model-states file of rank 0")
    if not isinstance(first, dict) or PARAM_SHAPES not in first:
        raise CheckpointError(f"{first_path} is not a ZeRO-3 model-states file: it holds no {PARAM_SHAPES}")
    if first.get(FROZEN_PARAM_SHAPES):
        raise CheckpointError(f"{first_path}: frozen parameters {sorted(first[FROZEN_PARAM_SHAPES])[:3]} are kept in "
                              "per-rank fragments that export does not gather yet; export a model trained with every "
                              "parameter trainable, or train with ZeRO 0-2")
    ranks = list(range(first.get("dp_world_size") or max(found["model"] + found["optim"]) + 1))
    for kind, have in found.items():  # one model-states and one optimizer-states file per data-parallel rank
        missing = [r for r in ranks if r not in have]
        if missing:
            raise CheckpointError(f"{os.path.join(tag_dir, zero3_file(missing[0], kind))} is missing: a ZeRO-3 "
                                  f"checkpoint of {len(ranks)} ranks has one per rank; the checkpoint is incomplete "
                                  "(an interrupted save, or files removed), export another tag with --tag")
    model_states = {r: first if r == 0 else read_torch_file(os.path.join(tag_dir, zero3_file(r, "model")),
                                                            "a ZeRO-3 model-states file") for r in ranks}

    pieces: Dict[Tuple[str, int], Dict[int, torch.Tensor]] = {}  # (name, EP rank or -1) -> {partition rank: piece}
    layouts: Dict[Tuple[str, int], Tuple[tuple, int, str]] = {}  # -> (shape, partition count, a file holding it)
    experts: Dict[str, dict] = {}
    for r in ranks:
        optim_path = os.path.join(tag_dir, zero3_file(r, "optim"))
        optim = read_torch_file(optim_path, "a ZeRO-3 optimizer-states file (the fp32 partitions)", mmap=True)
        try:
            flat = optim[OPTIMIZER_STATE_DICT][FP32_FLAT_GROUPS]
            groups = optim[OPTIMIZER_STATE_DICT].get("ds_zero_partition_groups") or []
        except (TypeError, KeyError) as exc:
            raise CheckpointError(f"{optim_path} is not a ZeRO-3 optimizer-states file (no {exc})") from exc
        autoep = {f"{layer['expert_key_prefix']}.{w}": layer
                  for layer in model_states[r].get(AUTOEP_LAYERS_KEY) or [] for w in AUTOEP_WEIGHTS}
        experts.update(autoep)
        for i, shapes in enumerate(model_states[r][PARAM_SHAPES]):
            count = groups[i]["partition_count"] if i < len(groups) else len(ranks)
            partition = groups[i]["partition_rank"] if i < len(groups) else r
            offset = 0
            for name, shape in shapes.items():
                numel = math.prod(shape)
                size, _ = zero3_partitioned_param_info(numel, count)
                held = max(0, min(size, numel - partition * size))  # the last partitions hold padding or nothing
                key = (name, autoep[name]["ep_rank"] if name in autoep else -1)
                pieces.setdefault(key, {})[partition] = flat[i].narrow(0, offset, held).clone()
                layouts[key] = (tuple(shape), count, optim_path)
                offset += size

    params: Dict[str, torch.Tensor] = {}
    expert_shards: Dict[str, Dict[int, torch.Tensor]] = {}
    for key, parts in pieces.items():
        (name, ep_rank), (shape, count, path) = key, layouts[key]
        if sorted(parts) != list(range(count)):
            absent = sorted(set(range(count)) - set(parts))
            raise CheckpointError(f"{path}: {name} is partitioned over {count} ranks, and partitions {absent} are in "
                                  "no optimizer-states file of the tag; the checkpoint is incomplete")
        whole = torch.cat([parts[p] for p in range(count)]).view(shape)
        if ep_rank < 0:
            params[name] = whole
        else:
            expert_shards.setdefault(name, {})[ep_rank] = whole
    from deepspeed.checkpoint.autoep_affine import autoep_metadata_to_affine_map
    for name, shards in expert_shards.items():
        layer = experts[name]
        logical = (layer["num_experts"], *next(iter(shards.values())).shape[1:])
        try:  # the placement DeepSpeed recorded: which EP rank holds which global experts
            params[name] = autoep_metadata_to_affine_map(layer, logical, param_name=name).rebuild(shards)
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{first_path}: the experts {name} of EP ranks {sorted(shards)} do not make the "
                                  f"{layer['num_experts']} experts its AutoEP record places ({exc}); the checkpoint is "
                                  "incomplete") from exc
    for alias, source in (first.get("shared_params") or {}).items():  # tied weights: one partitioned tensor
        params[alias] = params[source]
    module = first.get("module") or {}
    for name in first.get(BUFFER_NAMES) or []:
        params[name] = module[name]
    return first, params, {name: experts[name] for name in expert_shards}
