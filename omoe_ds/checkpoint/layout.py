"""What a checkpoint is on disk: every file and parameter name, the completion marker, the saved window
format, and how a tag directory is found. state.py (save/load), reshard.py and export.py take them from here.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from typing import Dict, List, Optional

import torch

from ..core import collectives
from ..core.config import OMoEConfigError
from ..experts import ExpertLayer

FORMAT_VERSION = 1
COMPLETE_MARKER = "omoe_complete.json"
META_FILE = "omoe_meta.pt"
HF_DIR = "hf_model"
EXPERT_INFIX = ".deepspeed_moe.experts.deepspeed_experts."
NON_EXPERT_FILE = "mp_rank_00_model_states.pt"
DENSE_FILE = "universal_dense.pt"  # a resharded checkpoint's non-expert parameters (reshard.py)
COMMON_FILE = "universal_common.pt"  # its lr scheduler, step counters, client state, optimizer groups
COMPLETE_MARKERS = (COMPLETE_MARKER, "omoe_complete")  # export also accepts the bare name
# DeepSpeed's ZeRO-3 files, one pair per data-parallel rank: (rank, tensor-parallel rank, "model" | "optim")
ZERO3_FILE_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt$")


class CheckpointError(OMoEConfigError):
    """A checkpoint that does not fit the job, or is incomplete; raised before anything is loaded."""


WINDOW_LAYOUT = "per_global_expert"  # core.windows' layout; older files list their local experts' global_ids


def window_partials(saved: dict, num_experts: int, where: str):
    """(sums [Σx [M, d], Σh [M, d_ff]], counts [2, M]) of one saved window, in core.windows' layout.

    A window saved before the layout change (keys global_ids/sums/counts: the receiving rank's sums of its
    local experts) is placed into its experts' rows, x and h alike: the O step's world all-reduce gives the
    same totals, up to the fp64 rounding of the summation order."""
    if saved.get("layout") == WINDOW_LAYOUT:
        sums, counts = saved["sums"], saved["counts"]
    elif "global_ids" in saved:
        old_sums, old_counts = saved["sums"], saved["counts"]
        sums = [s.new_zeros(num_experts, s.shape[1]) for s in old_sums]
        counts = old_counts.new_zeros(2, num_experts)
        for i, g in enumerate(saved["global_ids"]):
            for w in range(2):
                sums[w][g] = old_sums[w][i]
                counts[w][g] = old_counts[i]
    else:
        raise CheckpointError(f"{where}: a window in an unknown layout {saved.get('layout')!r} (keys {sorted(saved)}); "
                              "it was written by a newer omoe_ds: load it with that version")
    if counts.shape != (2, num_experts) or any(s.shape[0] != num_experts for s in sums):
        raise CheckpointError(f"{where}: window counts of shape {tuple(counts.shape)} do not fit {num_experts} experts; "
                              "load the checkpoint into a model with the same --experts")
    return sums, counts


def projector_file(layer: int, global_expert: int) -> str:
    return f"omoe_proj_layer{layer}_e{global_expert}.pt"


def rank_file(rank: int) -> str:
    return f"omoe_rank{rank}.pt"


def universal_expert_file(layer: int, global_expert: int) -> str:
    """An expert's consolidated parameters and optimizer state in a resharded checkpoint."""
    return f"universal_layer{layer}_e{global_expert}.pt"


def zero3_file(rank: int, kind: str) -> str:
    """DeepSpeed's ZeRO-3 model-states ("model") or optimizer-states ("optim") file of a data-parallel rank."""
    return f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt"


def expert_file(layer: int, global_expert: int) -> str:
    """DeepSpeed's per-expert weight file (engine._get_expert_ckpt_name, model-parallel rank 0)."""
    return f"layer_{layer}_expert_{global_expert}_mp_rank_00_model_states.pt"


# ---- names that do not depend on the expert-parallel size -----------------------------------------
def global_parameter_names(model: torch.nn.Module, layers: List[ExpertLayer]) -> Dict[int, str]:
    """{id(param): name}, experts named by global id as in DeepSpeed's expert files."""
    names = {}
    for name, p in model.named_parameters():
        names[id(p)] = name
    for layer in layers:
        first = collectives.ep_rank(layer.ep_size) * layer.num_local_experts
        prefix = f"{layer.name}{EXPERT_INFIX}"
        for name, p in layer.module.named_parameters(prefix=layer.name):
            if name.startswith(prefix):
                local, rest = name[len(prefix):].split(".", 1)
                names[id(p)] = f"{prefix}{first + int(local)}.{rest}"
    return names


def expert_name_parts(name: str):
    """(module prefix, global expert id, rest) of an expert parameter name, else None."""
    m = re.match(rf"(.*){re.escape(EXPERT_INFIX)}(\d+)\.(.*)", name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


# ---- discovery ----------------------------------------------------------------------------------
def read_marker(tag_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(tag_dir, COMPLETE_MARKER)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def complete_tags(save_dir: str) -> List[str]:
    """Complete tags in save_dir, oldest first (by global step)."""
    if not os.path.isdir(save_dir):
        return []
    found = []
    for tag in os.listdir(save_dir):
        if not os.path.isdir(os.path.join(save_dir, tag)):
            continue
        marker = read_marker(os.path.join(save_dir, tag))
        if marker is not None:
            found.append((marker.get("global_steps", -1), tag))
    return [tag for _, tag in sorted(found)]


def latest_complete_tag(save_dir: str) -> Optional[str]:
    tags = complete_tags(save_dir)
    return tags[-1] if tags else None


def resolve_tag_dir(path: str, tag: Optional[str] = None) -> str:
    """A tag directory from a save dir (its latest complete tag) or a tag dir itself."""
    if tag is not None:
        tag_dir = os.path.join(path, tag)
    elif os.path.exists(os.path.join(path, COMPLETE_MARKER)) or os.path.exists(os.path.join(path, NON_EXPERT_FILE)):
        tag_dir = path
    else:
        latest = latest_complete_tag(path)
        if latest is None:
            present = sorted(os.listdir(path)) if os.path.isdir(path) else None
            raise CheckpointError(
                f"{path}: no complete checkpoint (no tag directory holds {COMPLETE_MARKER}); "
                + ("the directory does not exist" if present is None else f"it holds {present[:10]}")
                + ". Pass a save dir written by omoe_ds.save_checkpoint, or a tag dir")
        tag_dir = os.path.join(path, latest)
    if not os.path.isdir(tag_dir):
        raise CheckpointError(f"{tag_dir}: no such checkpoint directory")
    return tag_dir


def read_torch_file(path: str, what: str, mmap: bool = False):
    """torch.load on the CPU, weights_only unless the file needs more (DeepSpeed's states files can hold its
    config objects); a missing or unreadable file is a CheckpointError naming it. mmap: leave the tensors on disk
    until read (ZeRO optimizer files also hold the moments, which export never reads)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: expected {what}; the checkpoint is incomplete (an interrupted "
                              "save, or files removed), export another tag with --tag")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as exc:
            if "weights only" not in str(exc).lower() and "weights_only" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)  # a local file the user chose
    except Exception as exc:  # truncated zip, bad magic number, EOF …
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {first_line}): expected {what}; "
                              "the file is truncated or corrupt, export another tag with --tag") from exc


def write_json_atomic(path: str, payload) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
