"""What OMoE checks of a DeepSpeed "expert_parallel" (AutoEP) section before the engine exists.

AutoEP replaces the model's MoE blocks inside deepspeed.initialize; these checks run its own detection
on the unmodified model first (no compute, no collective), so every setting OMoE cannot train with is
refused with one clear error before any work is done.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..core.config import OMoEConfigError
from .hf_fused import is_fused_experts


def autoep_section(ds_config: dict) -> Optional[dict]:
    """The "expert_parallel" section when it enables AutoEP, else None."""
    section = ds_config.get("expert_parallel") or {}
    return section if section.get("enabled") else None


def check_autoep(model, section: dict, ds_config: dict) -> List[int]:
    """Refuse what OMoE cannot run under AutoEP; returns the detected layers' expert counts."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.module_inject.auto_ep import AutoEP
    from deepspeed.module_inject.auto_ep_config import parse_autoep_config
    from deepspeed.module_inject.auto_ep_presets.registry import available_preset_names

    if section.get("comm_backend", "comm") == "deepep":
        raise OMoEConfigError("expert_parallel.comm_backend=\"deepep\": DeepEP dispatches inside its own kernels, where "
                              "OMoE cannot record the experts' inputs; set \"comm_backend\": \"comm\"")
    etp = section.get("expert_tensor_parallel_size", 1)
    autotp = (ds_config.get("tensor_parallel") or {}).get("autotp_size", 1)
    if etp != 1 or autotp not in (0, 1):
        raise OMoEConfigError(f"expert_parallel.expert_tensor_parallel_size={etp}, tensor_parallel.autotp_size={autotp}: "
                              "AutoEP would fold experts over tensor-parallel ranks, and OMoE projects whole expert "
                              "matrices; set both to 1")
    if section.get("use_grouped_mm", True) and not section.get("disable_triton_grouped_mm", False) and \
            get_accelerator().prefer_triton_grouped_mm():
        raise OMoEConfigError("expert_parallel.use_grouped_mm=true selects the Triton grouped GEMM on this device, which "
                              "computes h where OMoE cannot read it; set \"disable_triton_grouped_mm\": true "
                              "(torch._grouped_mm) or \"use_grouped_mm\": false")
    if section.get("use_grouped_mm", True) and not hasattr(torch, "_grouped_mm"):
        raise OMoEConfigError("expert_parallel.use_grouped_mm=true needs torch._grouped_mm, which this torch lacks; "
                              "set \"use_grouped_mm\": false")
    presets = list(available_preset_names())
    preset = section.get("preset_model")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if preset is not None and preset not in presets:
        raise OMoEConfigError(f"expert_parallel.preset_model={preset!r} is not an AutoEP preset; use one of {presets}")
    config = parse_autoep_config(section)
    try:
        specs = AutoEP(model, config).ep_parser()
    except ValueError as e:
        specs, why = [], str(e)
    else:
        why = "no layer matched"
    if not specs:
        raise OMoEConfigError(f"AutoEP finds no MoE layer in {type(model).__name__} (model_type {model_type!r}, "
                              f"preset_model {preset!r}): {why}. AutoEP drives these families: {presets}; set "
                              "expert_parallel.preset_model to the model's family, or disable expert_parallel")
    size = int(section.get("autoep_size", 1))
    for spec in specs:
        if size < 1 or spec.num_experts % size:
            divisors = [k for k in range(1, spec.num_experts + 1) if spec.num_experts % k == 0]
            raise OMoEConfigError(f"expert_parallel.autoep_size={size} does not divide the {spec.num_experts} experts of "
                                  f"{spec.moe_module_name}; use one of {divisors}")
    return [spec.num_experts for spec in specs]


def check_client_optimizer(optimizer: torch.optim.Optimizer, model, autoep_size: int) -> None:
    """A torch optimizer instance under AutoEP: DeepSpeed re-points it at the replacement expert parameters
    inside the groups their sources were in, so those groups must already be DeepSpeed MoE groups."""
    sources = {id(p) for m in model.modules() if is_fused_experts(m) for p in (m.gate_up_proj, m.down_proj)}
    expected = f"ep_size_{autoep_size}"
    for i, group in enumerate(optimizer.param_groups):
        held = [id(p) in sources for p in group["params"]]
        if any(held) and not (all(held) and group.get("moe") and group.get("name") == expected):
            raise OMoEConfigError(
                f"optimizer parameter group {i} holds MoE expert weights that AutoEP replaces, but is not a MoE group of "
                f"their own ({{\"moe\": True, \"name\": \"{expected}\"}} holding only them): DeepSpeed would put the "
                "replacements in a group it cannot partition. Take the optimizer from the DeepSpeed config "
                "(\"optimizer\": {\"type\": \"AdamW\", ...}) or pass a callable (params -> optimizer)")
