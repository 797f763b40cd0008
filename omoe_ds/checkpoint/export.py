"""Export a DeepSpeed MoE checkpoint as one consolidated model, and load it back on any EP size.

    python -m omoe_ds.export --ckpt runs/x/checkpoints --out exported/x [--tag TAG] [--config DIR] [--overwrite]

The export reads only the checkpoint's model files, with plain `torch.load` (no engine, no process group):
`mp_rank_00_model_states.pt` (every non-expert tensor, gates included) and one
`layer_{L}_expert_{g}_mp_rank_00_model_states.pt` per MoE layer L and global expert g. It writes a
transformers-style `save_pretrained` directory at the EP=1 layout (expert g of a layer is local expert g):
`model.safetensors` (or shards with an index), `config.json` whose `omoe_moe` is the conversion config with
`ep_size` 1 and whose `omoe_export` records the MoE layout and the source checkpoint, and the tokenizer
files from the checkpoint's `hf_model/`. The directory appears complete or not at all (written to a temporary
sibling, then renamed).

`load_exported(dir, ep_size=N)` rebuilds the converted model from that directory, each EP rank reading only
its own experts (global id = ep_rank · E_local + local id); it runs in a single process without DeepSpeed's
engine, or goes to `omoe_ds.initialize` (with `bind_groups=False`) for further training.

A checkpoint of a transformers fused-expert MoE model (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3 …: a config
without omoe_moe whose model has experts that omoe_ds.experts.hf_fused recognises) holds every expert in
`mp_rank_00_model_states.pt` (`gate_up_proj [E, 2ff, d]`, `down_proj [E, d, ff]`, replicated, EP = 1). Its
export is the model's own `save_pretrained` directory (transformers writes the experts in the model's original
checkpoint layout, and `from_pretrained` fuses them back, bit for bit), with `omoe_export.layout` "hf-fused";
plain `transformers.AutoModelForCausalLM.from_pretrained(out)` loads it, and so does `load_exported(out)`, at
ep_size 1 only. Trained through DeepSpeed AutoEP, its experts are in DeepSpeed's per-expert files (ZeRO 0-2) or, under
ZeRO-3, only in the fp32 partitions of the optimizer files, which zero3.py gathers. A Mixtral upcycled in some layers
only (omoe_upcycle.layers) is exported as the Qwen2-MoE model that computes the same function, its dense layers as
`mlp_only_layers` (finetune/upcycle.py: qwen2_moe_config).

A checkpoint that does not fit its config (expert count, architecture, missing or unreadable files) is
refused with a `CheckpointError` naming the file and the mismatch; export never writes into the checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..core.config import OMoEConfigError
from ..experts.hf_fused import is_fused_experts
from ..finetune.convert import SUPPORTED_MODEL_TYPES, MoEConversionConfig, bind_expert_groups, convert_to_moe
from ..finetune.upcycle import is_shared_expert_key, partially_upcycled, qwen2_moe_config
from .layout import (COMPLETE_MARKER, COMPLETE_MARKERS, EXPERT_INFIX, HF_DIR, META_FILE, NON_EXPERT_FILE,
                     ZERO3_FILE_RE, CheckpointError, expert_file, read_torch_file, zero3_file)
from .zero3 import AUTOEP_WEIGHTS, read_zero3, zero3_ranks

EXPORT_FORMAT_VERSION = 1
_EXPERT_FILE_RE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
CONFIG_FILE = "config.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Task heads by the names omoe_ds.train uses, plus the bare encoder and the causal LM (transformers' MoE models).
HEADS = {"base": "AutoModel", "sequence_classification": "AutoModelForSequenceClassification",
         "regression": "AutoModelForSequenceClassification",
         "token_classification": "AutoModelForTokenClassification",
         "question_answering": "AutoModelForQuestionAnswering", "causal_lm": "AutoModelForCausalLM"}
ENCODER_HEADS = ("base", "sequence_classification", "token_classification", "question_answering")
FUSED_HEADS = ("causal_lm", *ENCODER_HEADS)  # the heads a config without architectures is tried with
EP1, HF_FUSED = "ep1", "hf-fused"  # omoe_export.layout: a converted encoder's DeepSpeed experts, transformers' own
FUSED_MODELS = "transformers' fused-expert MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 …)"


# --------------------------------------------------------------------------------------------------
# Finding the tag


def resolve_tag_dir(ckpt: str, tag: Optional[str] = None) -> Tuple[str, str]:
    """(tag directory, tag) for a DeepSpeed save_dir or a tag directory.

    A save_dir gives `tag` when named, else the tag in `latest`; tags that carry the `omoe_complete`
    marker are preferred (the newest, when `latest` names one without it). A tag without the marker but with
    DeepSpeed's model files is accepted with a warning (a plain DeepSpeed checkpoint, or an interrupted save)."""
    ckpt = os.path.abspath(ckpt)
    if not os.path.isdir(ckpt):
        raise CheckpointError(f"--ckpt {ckpt}: no such directory; give a DeepSpeed save_dir (holding `latest` and "
                              "tag directories) or one tag directory")
    if tag is not None:
        tag_dir = os.path.join(ckpt, str(tag))
        if not os.path.isdir(tag_dir):
            raise CheckpointError(f"--tag {tag}: {tag_dir} does not exist; tags in {ckpt}: "
                                  f"{_tags(ckpt) or 'none'}")
        _warn_if_incomplete(tag_dir)
        return tag_dir, str(tag)
    if _has_deepspeed_files(ckpt):
        _warn_if_incomplete(ckpt)
        return ckpt, os.path.basename(ckpt)
    tags = _tags(ckpt)
    complete = [t for t in tags if _marker_path(os.path.join(ckpt, t))]
    latest_file = os.path.join(ckpt, "latest")
    latest = None
    if os.path.isfile(latest_file):
        with open(latest_file) as f:
            latest = f.read().strip()
    if latest is not None and latest not in tags:
        if not tags:
            raise CheckpointError(f"{latest_file} names tag {latest!r}, but {os.path.join(ckpt, latest)} holds no "
                                  f"{NON_EXPERT_FILE} and {ckpt} has no other tag directory")
        warnings.warn(f"{latest_file} names tag {latest!r}, whose directory holds no {NON_EXPERT_FILE}; "
                      "choosing among the other tags", stacklevel=2)
        latest = None
    if complete:
        if latest in complete:
            chosen = latest
        else:
            chosen = _newest(ckpt, complete)
            if latest is not None:
                warnings.warn(f"{latest_file} names tag {latest!r}, which has no {COMPLETE_MARKER} marker (an "
                              f"interrupted save?); exporting the newest complete tag {chosen!r} instead", stacklevel=2)
        return os.path.join(ckpt, chosen), chosen
    if not tags:
        raise CheckpointError(f"{ckpt} holds no checkpoint: neither `latest` nor a tag directory with "
                              f"{NON_EXPERT_FILE}; give --ckpt a DeepSpeed save_dir or a tag directory")
    chosen = latest if latest is not None else _newest(ckpt, tags)
    _warn_if_incomplete(os.path.join(ckpt, chosen))
    return os.path.join(ckpt, chosen), chosen


def _has_deepspeed_files(directory: str) -> bool:
    return any(name == NON_EXPERT_FILE or _EXPERT_FILE_RE.match(name) or ZERO3_FILE_RE.match(name)
               for name in os.listdir(directory))


def _tags(save_dir: str) -> List[str]:
    return sorted(name for name in os.listdir(save_dir)
                  if os.path.isdir(os.path.join(save_dir, name)) and _has_deepspeed_files(os.path.join(save_dir, name)))


def _marker_path(tag_dir: str) -> Optional[str]:
    for name in COMPLETE_MARKERS:
        if os.path.isfile(os.path.join(tag_dir, name)):
            return os.path.join(tag_dir, name)
    return None


def _read_marker(tag_dir: str) -> dict:
    """The completion marker's JSON ({} when absent, empty or not JSON)."""
    path = _marker_path(tag_dir)
    try:
        with open(path) as f:
            marker = json.load(f)
        return marker if isinstance(marker, dict) else {}
    except (TypeError, OSError, ValueError):
        return {}


def _newest(save_dir: str, tags: List[str]) -> str:
    """By the marker's global_steps where recorded, then by when the tag was written."""
    def written(tag):
        tag_dir = os.path.join(save_dir, tag)
        steps = _read_marker(tag_dir).get("global_steps")
        path = _marker_path(tag_dir) or os.path.join(tag_dir, NON_EXPERT_FILE)
        mtime = os.path.getmtime(path) if os.path.exists(path) else os.path.getmtime(tag_dir)
        return (steps if isinstance(steps, int) else -1, mtime, tag)
    return max(tags, key=written)


def _check_marker_sizes(tag_dir: str, names: List[str]) -> None:
    """Files the export reads must still have the sizes the completion marker recorded at save time."""
    listed = _read_marker(tag_dir).get("files")
    if not isinstance(listed, dict):
        return
    for name in names:
        path = os.path.join(tag_dir, name)
        if name in listed and os.path.isfile(path) and os.path.getsize(path) != listed[name]:
            raise CheckpointError(f"{path} has {os.path.getsize(path)} bytes but {_marker_path(tag_dir)} records "
                                  f"{listed[name]}: the file was changed or truncated after the save (corrupt); "
                                  "export another tag with --tag")


def _warn_if_incomplete(tag_dir: str) -> None:
    if not _marker_path(tag_dir):
        warnings.warn(f"{tag_dir} has no {COMPLETE_MARKER} marker (a plain DeepSpeed checkpoint, or a save that "
                      "did not finish); exporting it as found, every file checked", stacklevel=3)


# --------------------------------------------------------------------------------------------------
# Reading the checkpoint


def _read_config(config_dir: str, tag_dir: Optional[str], explicit: bool):
    """(config, its path, layout): EP1 for an encoder converted by omoe_ds.finetune.convert (omoe_moe), HF_FUSED
    for a transformers model whose experts are fused parameters."""
    from transformers import AutoConfig
    path = os.path.join(config_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        if explicit:
            raise CheckpointError(f"--config {config_dir}: {path} does not exist; name the directory holding the "
                                  "model's config.json (a converted model's, with omoe_moe, or that of one of "
                                  f"{FUSED_MODELS})")
        raise CheckpointError(f"{path} is missing: the checkpoint {tag_dir} carries no model config (a plain "
                              f"DeepSpeed checkpoint){_saved_model(tag_dir)}; pass --config DIR (config_dir=) naming "
                              "the directory of the trained model's config.json (the converted model's, or the "
                              "transformers MoE model's), e.g. model.config.save_pretrained(DIR) of the trained model")
    try:
        with open(path) as f:
            raw = json.load(f)
        config = AutoConfig.from_pretrained(config_dir)
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be read as a transformers config ({type(exc).__name__}: {exc})") from exc
    model_type = raw.get("model_type")
    if model_type in SUPPORTED_MODEL_TYPES:
        if not isinstance(raw.get("omoe_moe"), dict):
            raise CheckpointError(f"{path} has no omoe_moe section, so it does not record the MoE layout (expert "
                                  "count, converted layers); use the config of the converted model "
                                  "(convert_to_moe records omoe_moe), passed with --config")
        return config, path, EP1
    if "omoe_moe" not in raw and any(is_fused_experts(m) for m in _meta_model(_candidate_classes(
            config, path, heads=FUSED_HEADS)[:1], config, path).modules()):
        return config, path, HF_FUSED
    raise CheckpointError(f"{path}: model_type={model_type!r} is not an omoe-ds MoE model; supported are the "
                          f"encoders {SUPPORTED_MODEL_TYPES} converted by omoe_ds.finetune.convert (a config with "
                          f"omoe_moe) and {FUSED_MODELS}")


def _saved_model(tag_dir: Optional[str]) -> str:
    """What the checkpoint's omoe_meta.pt says was trained, as a clause for an error message ('' if unknown)."""
    try:
        meta = torch.load(os.path.join(tag_dir, META_FILE), map_location="cpu", weights_only=True)
        fused = any(layer.get("layout") == HF_FUSED for layer in meta["layers"])
        return (f"; its {META_FILE} records a {meta['model_class']} (model_type {meta['model_type']})"
                + (" with transformers' fused experts" if fused else ""))
    except Exception:
        return ""


def _meta_model(classes: List[type], config, path: str) -> nn.Module:
    """The first of `classes` built from config on the meta device (an empty module if none)."""
    if not classes:
        return nn.Module()
    try:
        with torch.device("meta"):
            return classes[0](config)
    except Exception as exc:
        raise CheckpointError(f"{path}: {classes[0].__name__} cannot be built from it ({type(exc).__name__}: "
                              f"{exc})") from exc


def _conversion_config(omoe_moe: dict, path: str, **override) -> MoEConversionConfig:
    fields = {f.name for f in dataclasses.fields(MoEConversionConfig)}
    unknown = sorted(set(omoe_moe) - fields)
    if unknown:
        raise CheckpointError(f"{path}: omoe_moe has keys {unknown} that this omoe-ds does not know "
                              f"(known: {sorted(fields)}); it was written by another version")
    try:
        return MoEConversionConfig(**{**omoe_moe, **override})
    except (OMoEConfigError, TypeError) as exc:
        raise CheckpointError(f"{path}: omoe_moe {omoe_moe} is not a valid MoE layout: {exc}") from exc


def _model_class(name: str, config, path: str):
    import transformers
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CheckpointError(f"{path}: architectures names {name!r}, which is not a transformers model class")
    model_type = getattr(cls, "config_class", None) and cls.config_class.model_type
    if model_type and model_type != config.model_type:
        raise CheckpointError(f"{path}: architectures names {name} (a {model_type} model) but model_type is "
                              f"{config.model_type!r}; the config is inconsistent")
    return cls


def _head_class(head, config, path: str):
    """The concrete transformers class a head name (train.py's), a class name or a class stands for."""
    import transformers
    if isinstance(head, type):
        return head
    if head in HEADS:
        auto = getattr(transformers, HEADS[head])
        try:
            return auto._model_mapping[type(config)]
        except KeyError as exc:
            raise CheckpointError(f"{path}: model_type {config.model_type!r} has no {head} head in transformers") from exc
    if isinstance(head, str):
        return _model_class(head, config, path)
    raise CheckpointError(f"head={head!r}: give None (the exported architecture), one of {sorted(HEADS)}, or a "
                          "transformers model class (name)")


def _skeleton(cls, config, conversion: MoEConversionConfig) -> nn.Module:
    """The converted model on the meta device: its state-dict keys, shapes and MoE layers, no memory."""
    with torch.device("meta"):
        model = cls(config)
        convert_to_moe(model, dataclasses.replace(conversion, ep_size=1))
    return model


def _moe_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """MoE modules in named_modules() order: DeepSpeed's moe_layer_id enumerates them the same way."""
    from deepspeed.moe.layer import MoE
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def _candidate_classes(config, path: str, heads_only: bool = False, heads=ENCODER_HEADS) -> List[type]:
    architectures = getattr(config, "architectures", None) or []
    if architectures and not heads_only:
        return [_model_class(architectures[0], config, path)]
    found = []
    for head in heads:
        try:
            cls = _head_class(head, config, path)
        except CheckpointError:
            continue
        if cls not in found:
            found.append(cls)
    return found


@dataclasses.dataclass
class ConsolidatedCheckpoint:
    """Every tensor of a checkpoint in the EP=1 layout, with what it was read from."""
    state_dict: Dict[str, torch.Tensor]
    config: object                 # transformers PretrainedConfig (the checkpoint's, omoe_moe as trained)
    config_path: str
    conversion: Optional[MoEConversionConfig]  # None for HF_FUSED
    architecture: str
    tag_dir: str
    tag: str
    model_states: dict             # the non-expert file's metadata (global_steps, ds_version, …), no tensors
    moe_layers: List[dict]         # per MoE layer: id, module name, expert count (ep1: encoder layer; hf-fused: params)
    layout: str = EP1
    skeleton: Optional[nn.Module] = None  # HF_FUSED: the model on the meta device, state_dict's keys and shapes


def read_checkpoint(ckpt: str, tag: Optional[str] = None, config_dir: Optional[str] = None) -> ConsolidatedCheckpoint:
    """Read a DeepSpeed MoE checkpoint (save_dir or tag dir) into one EP=1 state dict, checking it against
    its config (hf_model/ in the tag, or config_dir). Reads only; raises CheckpointError on any mismatch."""
    tag_dir, tag = resolve_tag_dir(ckpt, tag)
    zero3 = bool(zero3_ranks(tag_dir)) and not os.path.exists(os.path.join(tag_dir, NON_EXPERT_FILE))
    _check_marker_sizes(tag_dir, [NON_EXPERT_FILE, os.path.join(HF_DIR, CONFIG_FILE)]
                        + sorted(n for n in os.listdir(tag_dir) if _EXPERT_FILE_RE.match(n) or ZERO3_FILE_RE.match(n)))
    explicit = config_dir is not None
    config, config_path, layout = _read_config(config_dir if explicit else os.path.join(tag_dir, HF_DIR), tag_dir,
                                               explicit)
    if layout == HF_FUSED:
        return _read_fused(tag_dir, tag, config, config_path, zero3)
    if zero3:  # DeepSpeed refuses native MoE under ZeRO-3, so no omoe-ds job wrote this
        raise CheckpointError(f"{os.path.join(tag_dir, zero3_file(0, 'model'))}: a ZeRO-3 checkpoint, but {config_path} "
                              "describes an encoder converted to DeepSpeed native MoE, which DeepSpeed does not run "
                              "under ZeRO-3; pass the config of the model this checkpoint was trained with (--config)")
    conversion = _conversion_config(config.omoe_moe, config_path)
    M = conversion.num_experts

    states_path, states, module_state = _model_states(tag_dir, "every non-expert tensor and the gates")
    recorded = states.get("num_experts")
    if isinstance(recorded, list) and any(n != M for n in recorded):
        raise CheckpointError(f"expert count mismatch: {states_path} records num_experts={recorded} per MoE layer, but "
                              f"{config_path} says omoe_moe.num_experts={M}; use the config the checkpoint was trained "
                              "with (--config)")

    # The architecture: the one the config names, or (no architectures) the head whose keys the checkpoint holds.
    # A checkpoint's own hf_model/ without omoe_job was written before the job recorded its head: it may carry
    # the pretrained config's architectures unchanged (MiniLM's BertModel under a trained classifier), so
    # there the other heads are tried too. An explicit --config is taken at its word.
    candidates = _candidate_classes(config, config_path)
    named = candidates[0] if getattr(config, "architectures", None) else None
    if named is not None and not explicit and not isinstance(getattr(config, "omoe_job", None), dict):
        candidates += [c for c in _candidate_classes(config, config_path, heads_only=True) if c not in candidates]
    expert_files = _expert_files(tag_dir)
    chosen, model = _fitting_class(candidates, module_state, lambda cls: _skeleton(cls, config, conversion),
                                   lambda key: EXPERT_INFIX not in key)
    if chosen is None and named is not None:  # keep the named class: _check_keys below says what does not fit
        chosen, model = named, _skeleton(named, config, conversion)
    if model is not None:
        expected = model.state_dict()
        non_expert = {k for k in expected if EXPERT_INFIX not in k}
    if chosen is None:
        raise CheckpointError(f"{states_path} matches none of the {config.model_type} heads "
                              f"{[c.__name__ for c in candidates]} built from {config_path} (which names no "
                              "architectures); set architectures in that config.json")
    if chosen is not named and named is not None:
        warnings.warn(f"{config_path} names architectures [{named.__name__!r}], whose tensors {states_path} does not "
                      f"hold; they are those of {chosen.__name__}, the head trained (a checkpoint of an older omoe-ds "
                      f"job kept the pretrained config's architectures): exporting it as {chosen.__name__}",
                      stacklevel=2)
    arch = chosen.__name__
    where = f"{arch} (model_type {config.model_type}, omoe_moe layers {list(conversion.layers or [])}) from {config_path}"
    moe = _moe_modules(model)
    if isinstance(recorded, list) and len(recorded) != len(moe):
        raise CheckpointError(f"architecture mismatch: {states_path} records {len(recorded)} MoE layers, but {where} has "
                              f"{len(moe)}; use the config the checkpoint was trained with (--config)")
    layer_ids = sorted(expert_files)
    if layer_ids and layer_ids[-1] >= len(moe):
        extra = layer_ids[-1]
        first = os.path.join(tag_dir, expert_files[extra][min(expert_files[extra])])
        raise CheckpointError(f"architecture mismatch: {first} "
                              f"is for MoE layer {extra}, but {where} has {len(moe)} MoE layers (ids 0..{len(moe) - 1})")
    _check_keys(states_path, set(module_state), non_expert, where)
    state = dict(module_state)
    layers = []
    for L, (name, module) in enumerate(moe):
        files = expert_files.get(L, {})
        found = sorted(files)
        if found and found == list(range(len(found))) and len(found) != M:
            first_extra = f" ({os.path.join(tag_dir, files[M])} is one too many)" if len(found) > M else ""
            raise CheckpointError(f"expert count mismatch: MoE layer {L} ({name}) has {len(found)} expert files "
                                  f"(layer_{L}_expert_0 … layer_{L}_expert_{len(found) - 1}) in {tag_dir}{first_extra}, "
                                  f"but {config_path} says omoe_moe.num_experts={M}")
        too_high = [g for g in found if g >= M]
        if too_high:
            raise CheckpointError(f"expert count mismatch: {os.path.join(tag_dir, files[too_high[0]])} holds expert "
                                  f"{too_high[0]}, but {config_path} says omoe_moe.num_experts={M} (ids 0..{M - 1})")
        missing = [g for g in range(M) if g not in files]
        if missing:
            path = os.path.join(tag_dir, expert_file(L, missing[0]))
            raise CheckpointError(f"{path} is missing: MoE layer {L} ({name}) needs one file per expert 0..{M - 1}, and "
                                  f"{len(missing)} of them ({', '.join(map(str, missing))}) are absent; the checkpoint "
                                  "is incomplete (an interrupted save?) — export another tag with --tag")
        for g in range(M):
            path = os.path.join(tag_dir, files[g])
            tensors = read_torch_file(path, f"the tensors of MoE layer {L} ({name}) expert {g}")
            prefix = f"{name}{EXPERT_INFIX}{g}."
            expected_keys = {k for k in expected if k.startswith(prefix)}
            if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
                raise CheckpointError(f"{path} is not a DeepSpeed expert file (a dict of tensors)")
            _check_keys(path, set(tensors), expected_keys, f"{where}, MoE layer {L} expert {g}")
            state.update(tensors)
        layers.append({"moe_layer_id": L, "module": name, "num_experts": M,
                       "encoder_layer": (list(conversion.layers)[L] if conversion.layers is not None else L),
                       "expert_key_prefix": f"{name}{EXPERT_INFIX}{{global_id}}."})
    for key, tensor in state.items():
        shape = tuple(expected[key].shape)
        if tuple(tensor.shape) != shape:
            path = states_path if key in module_state else _file_of(key, tag_dir, moe, expert_files)
            if key.endswith("deepspeed_moe.gate.wg.weight"):
                raise CheckpointError(f"expert count mismatch: {path}: the gate {key} routes to {tensor.shape[0]} "
                                      "experts "
                                      f"(shape {tuple(tensor.shape)}), but {config_path} says "
                                      f"omoe_moe.num_experts={M} (shape {shape})")
            raise CheckpointError(f"architecture mismatch: {path}: {key} has shape {tuple(tensor.shape)}, but {where} "
                                  f"expects {shape}; the checkpoint was trained with another config "
                                  "(hidden size, labels, vocabulary?)")
    meta = _states_meta(states)
    meta["num_experts"] = recorded
    return ConsolidatedCheckpoint(state, config, config_path, conversion, arch, tag_dir, tag, meta, layers)


def _model_states(tag_dir: str, holding: str):
    """(path, DeepSpeed's model-states dict, its 'module' state dict) of a tag, checked to be tensors."""
    states_path = os.path.join(tag_dir, NON_EXPERT_FILE)
    states = read_torch_file(states_path, f"DeepSpeed's model-states file ({holding})")
    if not isinstance(states, dict) or not isinstance(states.get("module"), dict):
        raise CheckpointError(f"{states_path} is not a DeepSpeed model-states file: it holds no 'module' state dict")
    module_state = states["module"]
    bad = [k for k, v in module_state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{states_path}: 'module' entry {bad[0]!r} is not a tensor")
    return states_path, states, module_state


def _states_meta(states: dict) -> dict:
    return {k: v for k, v in states.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _fitting_class(candidates: List[type], module_state: dict, build, held):
    """(class, skeleton) of the first candidate whose state-dict keys for which held(key) are exactly the keys of
    module_state; (None, None) when none fits."""
    for cls in candidates:
        model = build(cls)
        if set(module_state) == {k for k in model.state_dict() if held(k)}:
            return cls, model
    return None, None


EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _read_fused(tag_dir: str, tag: str, config, config_path: str, zero3: bool) -> ConsolidatedCheckpoint:
    """A checkpoint of a transformers fused-expert MoE model, under the model's own state-dict keys: every tensor in
    DeepSpeed's model-states file (experts included, or, trained through AutoEP, the experts in DeepSpeed's per-expert
    files), or under ZeRO-3 gathered from the fp32 partitions (zero3.py). A Mixtral upcycled in some layers only
    is exported as the Qwen2-MoE model computing the same function (upcycle.qwen2_moe_config)."""
    trained_as = None
    if partially_upcycled(config):
        trained_as = (getattr(config, "architectures", None) or [None])[0]
        try:
            config = qwen2_moe_config(config)
        except OMoEConfigError as exc:
            raise CheckpointError(f"{config_path}: {exc}") from exc
    expert_files = _expert_files(tag_dir)
    if zero3:
        states_path = os.path.join(tag_dir, zero3_file(0, "model"))
        states, module_state, expert_layers = read_zero3(tag_dir)
        autoep = {name[:-len(".experts.w1")]: {w: module_state.pop(name[:-2] + w) for w in AUTOEP_WEIGHTS}
                  for name in expert_layers if name.endswith(".experts.w1")}
    else:
        states_path, states, module_state = _model_states(tag_dir, "every tensor, the fused experts included")
        autoep = _autoep_expert_files(tag_dir, expert_files, config_path) if expert_files else {}
    candidates = _candidate_classes(config, config_path, heads=FUSED_HEADS)
    chosen, model = _fitting_class(candidates, module_state, lambda cls: _meta_model([cls], config, config_path),
                                   lambda key: True)
    if chosen is None:  # the named (or most likely) class: _check_keys below says what does not fit
        chosen, model = candidates[0], _meta_model(candidates[:1], config, config_path)
    experts = [(name, m) for name, m in model.named_modules() if is_fused_experts(m)]
    where = f"{chosen.__name__} (model_type {config.model_type}, {len(experts)} fused-expert layers) from {config_path}"
    expected = model.state_dict()
    if autoep:
        module_state = _fused_from_autoep(module_state, autoep, states_path, where)
    if trained_as is not None:  # the Qwen2-MoE shared experts, which add exactly 0
        module_state.update({k: torch.zeros(t.shape, dtype=t.dtype) for k, t in expected.items()
                             if is_shared_expert_key(k) and k not in module_state})
    _check_keys(states_path, set(module_state), set(expected), where)
    expert_keys = [f"{name}.{p}" for name, _ in experts for p in ("gate_up_proj", "down_proj")]
    for key in expert_keys + [k for k in module_state if k not in set(expert_keys)]:
        have, want = tuple(module_state[key].shape), tuple(expected[key].shape)
        if have == want:
            continue
        if key in expert_keys and have[1:] == want[1:]:
            fields = ", ".join(f"{f}={want[0]}" for f in EXPERT_COUNT_FIELDS if getattr(config, f, None) == want[0])
            raise CheckpointError(f"expert count mismatch: {states_path}: {key} holds {have[0]} experts (shape "
                                  f"{have}), but {config_path} gives {want[0]} ({fields or 'its expert count'}, "
                                  f"shape {want}); use the config the checkpoint was trained with (--config)")
        raise CheckpointError(f"architecture mismatch: {states_path}: {key} has shape {have}, but {where} expects "
                              f"{want}; the checkpoint was trained with another config (hidden size, vocabulary, "
                              "layers?), pass that one with --config")
    layers = [{"moe_layer_id": L, "module": name, "num_experts": m.gate_up_proj.shape[0],
               "fused_parameters": [f"{name}.gate_up_proj", f"{name}.down_proj"]} for L, (name, m) in enumerate(experts)]
    meta = {**_states_meta(states), "zero3": zero3, "trained_as": trained_as}
    return ConsolidatedCheckpoint(dict(module_state), config, config_path, None, chosen.__name__, tag_dir, tag,
                                  meta, layers, HF_FUSED, model)


_AUTOEP_KEY_RE = re.compile(r"^(.*)\.experts\.(w1|w2|w3)\.(\d+)$")


def _autoep_expert_files(tag_dir: str, expert_files, config_path: str) -> Dict[str, Dict[str, torch.Tensor]]:
    """{block: {w1, w2, w3: [E, …]}} from the per-expert files AutoEP writes under ZeRO 0-2 (keys
    `<block>.experts.w1.<global id>`)."""
    experts: Dict[str, Dict[str, Dict[int, torch.Tensor]]] = {}
    for L in sorted(expert_files):
        for e, name in sorted(expert_files[L].items()):
            path = os.path.join(tag_dir, name)
            for key, tensor in read_torch_file(path, "one expert's weights").items():
                m = _AUTOEP_KEY_RE.match(key)
                if m is None:
                    raise CheckpointError(f"architecture mismatch: {path} is a DeepSpeed MoE expert file holding "
                                          f"{key!r}, but {config_path} describes a model that keeps its experts as "
                                          f"fused parameters in {NON_EXPERT_FILE}; pass the converted model's config "
                                          "(with omoe_moe) with --config")
                experts.setdefault(m.group(1), {}).setdefault(m.group(2), {})[int(m.group(3))] = tensor
    return {block: {w: torch.stack([by_id[e] for e in sorted(by_id)]) for w, by_id in weights.items()}
            for block, weights in experts.items()}


def _fused_from_autoep(module_state: dict, autoep: Dict[str, Dict[str, torch.Tensor]], states_path: str,
                       where: str) -> dict:
    """AutoEP keeps each expert's w1 (gate), w3 (up) [ff, d] and w2 (down) [d, ff] and the router as
    `<block>.router.gate.weight` (aliased as `<block>.gate.gate.weight`): put them back in the transformers block's
    own keys, gate_up_proj = [w1; w3] per expert."""
    state = {k: v for k, v in module_state.items() if not k.endswith((".router.gate.weight", ".gate.gate.weight"))}
    for block, weights in autoep.items():
        router = f"{block}.router.gate.weight"
        if router not in module_state or set(weights) != set(AUTOEP_WEIGHTS):
            raise CheckpointError(f"architecture mismatch: {states_path} holds AutoEP experts of {block} with "
                                  f"{sorted(weights)} and {'a' if router in module_state else 'no'} {router}; {where} "
                                  f"needs w1, w2, w3 and the router")
        state[f"{block}.experts.gate_up_proj"] = torch.cat([weights["w1"], weights["w3"]], dim=1)
        state[f"{block}.experts.down_proj"] = weights["w2"]
        state[f"{block}.gate.weight"] = module_state[router]
    return state


def _expert_files(tag_dir: str) -> Dict[int, Dict[int, str]]:
    files: Dict[int, Dict[int, str]] = {}
    for name in sorted(os.listdir(tag_dir)):
        m = _EXPERT_FILE_RE.match(name)
        if not m:
            continue
        if int(m.group(3)) != 0:
            raise CheckpointError(f"{os.path.join(tag_dir, name)}: a tensor-parallel (mp_rank {m.group(3)}) expert "
                                  "file; omoe-ds models are not tensor-parallel and export reads mp_rank 00 only")
        files.setdefault(int(m.group(1)), {})[int(m.group(2))] = name
    return files


def _file_of(key: str, tag_dir: str, moe, expert_files) -> str:
    for L, (name, _) in enumerate(moe):
        m = re.match(re.escape(f"{name}{EXPERT_INFIX}") + r"(\d+)\.", key)
        if m:
            return os.path.join(tag_dir, expert_files[L][int(m.group(1))])
    return tag_dir


def _count(n: int, noun: str) -> str:
    return f"{n} {noun} is" if n == 1 else f"{n} {noun}s are"


def _check_keys(path: str, have: set, want: set, where: str) -> None:
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{_count(len(missing), 'expected tensor')} absent (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{_count(len(unexpected), 'tensor')} not in the model (e.g. {unexpected[:3]})")
        raise CheckpointError(f"architecture mismatch: {path} does not fit {where}: {'; '.join(parts)}; the checkpoint "
                              "was saved from another model or head — pass the config it was trained with (--config)")


# --------------------------------------------------------------------------------------------------
# Writing the export


def export_checkpoint(ckpt: str, out: str, tag: Optional[str] = None, config_dir: Optional[str] = None,
                      overwrite: bool = False) -> str:
    """Write the checkpoint (save_dir or tag dir) as one consolidated EP=1 save_pretrained directory `out`.
    Returns the absolute path of `out`. Reads the checkpoint only; `out` appears complete or not at all."""
    out = os.path.abspath(out)
    _check_out(out, os.path.abspath(ckpt), overwrite)
    source = read_checkpoint(ckpt, tag, config_dir)
    _check_out(out, source.tag_dir, overwrite)

    config = source.config
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in source.state_dict.values() if t.is_floating_point()})
    config.architectures = [source.architecture]
    fused = source.layout == HF_FUSED
    if not fused:
        config.omoe_moe = {**dataclasses.asdict(dataclasses.replace(source.conversion, ep_size=1)),
                           "layers": list(source.conversion.layers) if source.conversion.layers is not None else None}
    config.omoe_export = {
        "format_version": EXPORT_FORMAT_VERSION,
        # ep1: expert g of a MoE layer is stored as local expert g; hf-fused: the model's own save_pretrained
        "layout": source.layout,
        "moe_layers": source.moe_layers,
        "num_moe_layers": len(source.moe_layers),
        "num_experts_per_layer": [layer["num_experts"] for layer in source.moe_layers],
        "top_k": getattr(config, "num_experts_per_tok", None) if fused else source.conversion.k,
        "source_checkpoint": source.tag_dir,
        "source_tag": source.tag,
        "source_ep_size": 1 if fused else source.conversion.ep_size,
        "global_steps": source.model_states.get("global_steps"),
        "global_samples": source.model_states.get("global_samples"),
        "deepspeed_version": source.model_states.get("ds_version"),
        "complete_marker": _marker_path(source.tag_dir) is not None,
        "source_zero_stage3": bool(source.model_states.get("zero3")),
        # a partially upcycled Mixtral is exported as Qwen2-MoE (the same function): the class it trained as
        "trained_architecture": source.model_states.get("trained_as") or source.architecture,
        "dtypes": dtypes,
    }
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the export is an ordinary directory
        if fused:
            _save_fused(source, tmp)
        else:
            _write_tensors(_independent(source.state_dict), tmp)
            config.save_pretrained(tmp)
        for hf_dir in (os.path.dirname(source.config_path), os.path.join(source.tag_dir, HF_DIR)):
            names = sorted(n for n in os.listdir(hf_dir) if _is_tokenizer_file(hf_dir, n)) if os.path.isdir(hf_dir) else []
            for name in names:  # the tokenizer beside the config used, else the checkpoint's own
                shutil.copy2(os.path.join(hf_dir, name), os.path.join(tmp, name))
            if names:
                break
        for name in os.listdir(tmp):  # safetensors writes its files 0600; the export is an ordinary directory
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        _fsync_tree(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_out(out: str, source: str, overwrite: bool) -> None:
    for a, b in ((os.path.realpath(out), os.path.realpath(source)), (os.path.realpath(source), os.path.realpath(out))):
        if a == b or a.startswith(b.rstrip(os.sep) + os.sep):
            raise CheckpointError(f"--out {out} overlaps the checkpoint {source}; write the export elsewhere "
                                  "(export never writes into a checkpoint)")
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise CheckpointError(f"--out {out} is a file, not a directory; choose another --out")
        held = sorted(os.listdir(out))
        if held and not overwrite:
            raise CheckpointError(f"--out {out} is not empty (it holds {held[:5]}{' …' if len(held) > 5 else ''}); "
                                  "pass --overwrite (overwrite=True) to replace it, or choose another --out")


def _independent(state: Dict[str, torch.Tensor], keep_aliases: bool = False) -> Dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage or are views of a larger buffer: copy those.
    keep_aliases: names of one and the same whole tensor (tied weights) keep sharing it."""
    seen, out = {}, {}
    for key, t in state.items():
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        whole = t.is_contiguous() and t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()
        if whole and ptr in seen and keep_aliases and seen[ptr].shape == t.shape and seen[ptr].dtype == t.dtype:
            out[key] = seen[ptr]
            continue
        out[key] = t if whole and ptr not in seen else t.detach().clone(memory_format=torch.contiguous_format)
        seen.setdefault(ptr, out[key])
    return out


def _save_fused(source: ConsolidatedCheckpoint, directory: str) -> None:
    """The model's own save_pretrained (config.json, generation_config.json, safetensors): transformers writes the
    experts in the model's original checkpoint layout (Mixtral's experts.{i}.w1/w2/w3 …) and from_pretrained
    fuses them back. The checkpoint's tensors become the meta skeleton's, without a copy; tied weights stay one
    tensor (save_pretrained keeps one name), every other view of a shared buffer is copied out."""
    model = source.skeleton
    model.load_state_dict(_independent(source.state_dict, keep_aliases=True), strict=True, assign=True)
    model.save_pretrained(directory, max_shard_size="5GB")


def _write_tensors(state: Dict[str, torch.Tensor], directory: str) -> None:
    from huggingface_hub import save_torch_state_dict
    save_torch_state_dict(state, directory, metadata={"format": "pt"}, max_shard_size="5GB")


def _is_tokenizer_file(directory: str, name: str) -> bool:
    path = os.path.join(directory, name)
    return (os.path.isfile(path) and name != CONFIG_FILE and name not in _WEIGHT_INDEXES
            and not name.endswith(_WEIGHT_SUFFIXES) and not name.startswith("."))


def _fsync_tree(directory: str) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def _replace_dir(tmp: str, out: str) -> None:
    """tmp becomes out; an older out (empty, or replaced under --overwrite) goes only after tmp is complete."""
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
        os.rmdir(old)
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Loading an export


def _export_weights(path: str) -> Dict[str, str]:
    """{tensor name: safetensors file} of an export directory."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise CheckpointError(f"{single} is missing: {path} is not an omoe-ds export (no model.safetensors or "
                              "model.safetensors.index.json); write one with python -m omoe_ds.export")
    from safetensors import safe_open
    try:
        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    except Exception as exc:
        raise CheckpointError(f"{single} cannot be read ({type(exc).__name__}: {exc}); the export is corrupt") from exc


def load_exported(path: str, ep_size: int = 1, head=None, bind_groups: bool = True) -> nn.Module:
    """The converted MoE model of an export directory, with its weights, at expert-parallel size `ep_size`.

    head: None (the exported architecture), a train.py head name ("sequence_classification", …, or "base"),
    or a transformers class (name); a head other than the exported one is refused.
    ep_size N > 1 needs an initialised process group whose size N divides (the deepspeed launcher); each EP
    rank reads only its experts, global id = ep_rank · (num_experts / N) + local id.
    bind_groups=True binds the MoE layers to their expert-parallel group (creating a one-process gloo group
    when none exists): the model runs forward as it is, for inference. Pass bind_groups=False for a model
    going to omoe_ds.initialize / deepspeed.initialize, which binds the groups itself.
    An export of a transformers fused-expert model (omoe_export.layout "hf-fused") is loaded by the model's own
    from_pretrained; its experts are replicated on every rank, so ep_size must be 1 and there are no groups to bind.
    Returns the model in eval mode (call .train() to train it)."""
    path = os.path.abspath(path)
    if not is_export(path):
        raise CheckpointError(f"{os.path.join(path, CONFIG_FILE)} is missing or has no omoe_export section: {path} is "
                              "not an omoe-ds export; write one with python -m omoe_ds.export --ckpt CKPT --out DIR")
    config, config_path, layout = _read_config(path, None, explicit=True)
    export_meta = config.omoe_export
    if export_meta.get("format_version") != EXPORT_FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: export format_version={export_meta.get('format_version')!r}, this "
                              f"omoe-ds reads version {EXPORT_FORMAT_VERSION}")
    if export_meta.get("layout", EP1) != layout:
        raise CheckpointError(f"{config_path}: omoe_export.layout is {export_meta.get('layout')!r}, but the config "
                              f"describes a {layout!r} model; the export's config.json was edited or mixed up")
    if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1:
        raise CheckpointError(f"ep_size={ep_size!r}: use an integer >= 1")
    if layout == HF_FUSED:
        return _load_fused(path, config, config_path, ep_size, head)
    conversion = _conversion_config(config.omoe_moe, config_path)
    if conversion.num_experts % ep_size:
        raise CheckpointError(f"ep_size={ep_size} does not divide the {conversion.num_experts} experts per layer of "
                              f"{config_path}; choose an expert-parallel size that divides {conversion.num_experts}")
    cls = _exported_class(config, config_path, head)

    ep_rank = 0
    from ..core import collectives, environment
    if ep_size > 1 or bind_groups:
        environment.init_distributed()
        world = collectives.world_size()
        if world % ep_size:
            raise CheckpointError(f"ep_size={ep_size} does not divide the world size {world}; launch a multiple of "
                                  f"{ep_size} ranks (deepspeed --num_gpus {ep_size} …) or load with ep_size=1")
        if ep_size > 1:
            from deepspeed.utils import groups
            if f"ep_size_{ep_size}" not in groups._get_expert_parallel_group_dict():
                groups._create_expert_and_data_parallel(ep_size)  # what the MoE layers (or the engine) would make
            ep_rank = collectives.ep_rank(ep_size)

    model = cls(config)
    convert_to_moe(model, dataclasses.replace(conversion, ep_size=ep_size))
    weights = _export_weights(path)
    wanted_keys = model.state_dict().keys()
    num_local = conversion.num_experts // ep_size
    moe = _moe_modules(model)
    if len(moe) != export_meta.get("num_moe_layers", len(moe)):
        raise CheckpointError(f"architecture mismatch: {config_path} records {export_meta.get('num_moe_layers')} MoE "
                              f"layers, the model built from it has {len(moe)}")
    local_to_global = []  # (prefix of local expert l, prefix of its global id) per MoE layer and local expert
    for name, module in moe:
        for l in range(num_local):
            local_to_global.append((f"{name}{EXPERT_INFIX}{l}.", f"{name}{EXPERT_INFIX}{ep_rank * num_local + l}."))
    source = {}
    for key in wanted_keys:
        stored = key
        for local_prefix, global_prefix in local_to_global:
            if key.startswith(local_prefix):
                stored = global_prefix + key[len(local_prefix):]
                break
        if stored not in weights:
            raise CheckpointError(f"architecture mismatch: {path} lacks tensor {stored!r}, which {cls.__name__} with "
                                  f"omoe_moe {config.omoe_moe} (ep_size {ep_size}, EP rank {ep_rank}) needs; the "
                                  "export is incomplete or was written for another model")
        source[key] = stored
    expert_ids = {int(m.group(1)) for k in weights for m in [re.search(re.escape(EXPERT_INFIX) + r"(\d+)\.", k)] if m}
    if expert_ids and max(expert_ids) >= conversion.num_experts:
        raise CheckpointError(f"expert count mismatch: {path} holds expert {max(expert_ids)}, but {config_path} says "
                              f"omoe_moe.num_experts={conversion.num_experts}")
    used = set(source.values())
    stray = sorted(k for k in weights if EXPERT_INFIX not in k and k not in used)
    if stray:
        raise CheckpointError(f"architecture mismatch: {path} holds tensors {stray[:3]} that {cls.__name__} built "
                              f"from {config_path} does not have")

    from safetensors import safe_open
    state = {}
    by_file: Dict[str, List[str]] = {}
    for key, stored in source.items():
        by_file.setdefault(weights[stored], []).append(key)
    for file, keys in by_file.items():
        try:
            with safe_open(file, framework="pt") as f:
                for key in keys:
                    state[key] = f.get_tensor(source[key])  # only this rank's experts are read
        except Exception as exc:
            raise CheckpointError(f"{file} cannot be read ({type(exc).__name__}: {exc}); the export is corrupt") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"architecture mismatch: the tensors of {path} do not fit {cls.__name__} built from "
                              f"{config_path}: {exc}") from exc
    if bind_groups:
        bind_expert_groups(model)
    return model.eval()


def _exported_class(config, config_path: str, head) -> type:
    """The class an export's config names; a head other than it is refused."""
    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        raise CheckpointError(f"{config_path} names no architectures; the export is incomplete")
    cls = _model_class(architectures[0], config, config_path)
    if head is not None:
        wanted = _head_class(head, config, config_path)
        if wanted is not cls:
            raise CheckpointError(f"architecture mismatch: {config_path} holds a {cls.__name__} (model_type "
                                  f"{config.model_type}), but head={head!r} asks for {wanted.__name__}; load it with "
                                  f"head=None (or {cls.__name__})")
    return cls


def _load_fused(path: str, config, config_path: str, ep_size: int, head) -> nn.Module:
    if ep_size != 1:
        raise CheckpointError(f"ep_size={ep_size}: {path} holds transformers' fused experts, which omoe-ds keeps "
                              "replicated on every rank (EP = 1; DeepSpeed reduces their gradients like a dense "
                              "parameter's), so they cannot be split by expert; load it with ep_size=1 on any number "
                              "of ranks")
    cls = _exported_class(config, config_path, head)
    _export_weights(path)  # present and readable
    try:
        model, info = cls.from_pretrained(path, dtype="auto", output_loading_info=True)
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be loaded as a {cls.__name__} ({type(exc).__name__}: {exc}); the "
                              "export is corrupt or incomplete") from exc
    problems = [f"{what.replace('_', ' ')} {sorted(map(str, keys))[:3]}" for what, keys in info.items() if keys]
    if problems:
        raise CheckpointError(f"architecture mismatch: the tensors of {path} do not fit {cls.__name__} built from "
                              f"{config_path}: {'; '.join(problems)}; the export is incomplete or was written for "
                              "another model")
    experts = [m for m in model.modules() if is_fused_experts(m)]
    recorded = config.omoe_export.get("num_experts_per_layer")
    if recorded is not None and [m.gate_up_proj.shape[0] for m in experts] != recorded:
        raise CheckpointError(f"expert count mismatch: {config_path} records experts per layer {recorded}, the model "
                              f"built from it has {[m.gate_up_proj.shape[0] for m in experts]}")
    return model.eval()


def is_converted_export(path: str) -> bool:
    """Whether `path` is an export of an encoder converted to DeepSpeed native MoE (omoe_moe in its config), which
    load_exported rebuilds; an export of a transformers MoE model (Mixtral, Qwen2-MoE …) loads by from_pretrained."""
    try:
        with open(os.path.join(path, CONFIG_FILE)) as f:
            config = json.load(f)
        return isinstance(config.get("omoe_export"), dict) and isinstance(config.get("omoe_moe"), dict)
    except (OSError, ValueError):
        return False


def is_export(path: str) -> bool:
    """Whether `path` is a directory written by export_checkpoint (a config.json with omoe_export)."""
    try:
        with open(os.path.join(path, CONFIG_FILE)) as f:
            return isinstance(json.load(f).get("omoe_export"), dict)
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m omoe_ds.export",
                                description="Export a DeepSpeed MoE checkpoint as one consolidated EP=1 model "
                                            "directory (safetensors + config.json with the MoE layout + tokenizer).")
    p.add_argument("--ckpt", required=True, help="DeepSpeed save_dir (its `latest` / newest complete tag) or a tag dir")
    p.add_argument("--out", required=True, help="export directory to create (refused if non-empty without --overwrite)")
    p.add_argument("--tag", help="tag to export from a save_dir (default: latest complete)")
    p.add_argument("--config", help="dir of the converted model's config.json, when the checkpoint has no hf_model/")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)
        try:
            out = export_checkpoint(args.ckpt, args.out, tag=args.tag, config_dir=args.config, overwrite=args.overwrite)
        except CheckpointError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    with open(os.path.join(out, CONFIG_FILE)) as f:
        config = json.load(f)
    meta = config["omoe_export"]
    experts = "/".join(str(n) for n in sorted(set(meta["num_experts_per_layer"])))
    print(f"exported {meta['source_checkpoint']} (step {meta['global_steps']}) to {out}: {config['architectures'][0]}, "
          f"{meta['num_moe_layers']} MoE layers x {experts} experts, top-{meta['top_k']}"
          + (" (transformers' fused experts)" if meta.get("layout") == HF_FUSED else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
