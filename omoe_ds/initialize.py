"""`omoe_ds.initialize`: deepspeed.initialize plus OMoE, with every check done before the engine exists."""
from __future__ import annotations

import copy

import deepspeed
import torch
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

from .core import collectives, environment
from .core.config import OMoEConfig, OMoEConfigError, resolve_ds_config, zero_stage
from .core.phase import OMoE
from .experts import check_ep_sizes, find_expert_layers
from .experts.autoep_checks import autoep_section, check_autoep, check_client_optimizer


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None, lr_scheduler=None,
               mpu=None, dist_init_required=None, collate_fn=None, config=None, config_params=None, **kwargs):
    """Same arguments and 4-tuple as `deepspeed.initialize`; the engine's backward()/step() then run
    OMoE as configured by the config's "omoe" section. The OMoE state is `engine.omoe` (None when
    the section says "enabled": false, which gives the plain base-optimizer run on the same engine).
    """
    if model is None:
        raise OMoEConfigError("omoe_ds.initialize needs model=")
    ds_config = resolve_ds_config(args, config, config_params)
    omoe_config = OMoEConfig.from_ds_config(ds_config)
    stage = zero_stage(ds_config)
    autoep = autoep_section(ds_config)
    if autoep is not None:
        check_autoep(model, autoep, ds_config)
        layers = []  # AutoEP replaces the MoE blocks inside deepspeed.initialize: found on engine.module after it
    else:
        layers = find_expert_layers(model)
        if omoe_config.enabled and not layers:
            raise OMoEConfigError(f"{type(model).__name__} has no MoE layer OMoE knows (deepspeed.moe.layer.MoE, or "
                                  "transformers' fused experts as in Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, alone "
                                  "or through DeepSpeed AutoEP); add MoE layers or set \"omoe\": {\"enabled\": false}")
    if stage >= 3:
        _refuse_zero3_layouts(layers, omoe_config.enabled)
    if omoe_config.enabled:
        _refuse_unchecked_layouts(model, layers, ds_config, mpu, optimizer, stage)
    if autoep is not None and isinstance(optimizer, torch.optim.Optimizer):
        check_client_optimizer(optimizer, model, int(autoep.get("autoep_size", 1)))
    environment.init_distributed(dist_init_required)
    check_ep_sizes(layers, collectives.world_size())

    # Experts DeepSpeed does not know as MoE (fused ones) still need groups of their own for the O step.
    own_groups = {id(p) for layer in layers if not layer.deepspeed_expert_files for p in layer.expert_parameters()}
    if model_parameters is None and autoep is None:  # under AutoEP DeepSpeed takes them after the replacement
        model_parameters = [p for p in model.parameters() if p.requires_grad]
    if own_groups:
        model_parameters = _expert_groups(model_parameters, own_groups)
    if isinstance(optimizer, torch.optim.Optimizer):
        _split_moe_param_groups_(optimizer, own_groups)
    elif callable(optimizer):
        make_optimizer = optimizer

        def optimizer(params):
            built = make_optimizer(_expert_groups(_moe_param_groups(params), own_groups))
            if omoe_config.enabled:
                _refuse_adagrad_under_zero(built, stage)
            return built

    if args is not None and getattr(args, "deepspeed_config", None) is not None:
        args = copy.copy(args)  # the config travels as a dict so it is read once
        args.deepspeed_config = None
    engine, engine_optimizer, loader, scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters, training_data=training_data,
        lr_scheduler=lr_scheduler, mpu=mpu, dist_init_required=dist_init_required, collate_fn=collate_fn,
        config=ds_config, **kwargs)
    if autoep is not None and omoe_config.enabled:
        layers = find_expert_layers(engine.module)
        if not layers:
            raise OMoEConfigError("DeepSpeed AutoEP replaced no MoE block of the model, so OMoE has no expert layer; "
                                  "check expert_parallel.preset_model")
        check_ep_sizes(layers, collectives.world_size())
        _refuse_recomputed_layers(engine.module, layers)  # after the replacement, before any forward
    engine.omoe = OMoE(engine, layers, omoe_config) if omoe_config.enabled else None
    return engine, engine_optimizer, loader, scheduler


def _refuse_unchecked_layouts(model, layers, ds_config: dict, mpu, optimizer, stage: int) -> None:
    """What OMoE assumes and would otherwise get wrong silently."""
    if ds_config.get("use_data_before_expert_parallelism"):
        raise OMoEConfigError("use_data_before_expert_parallelism=true lays expert-parallel groups over strided ranks; "
                              "OMoE maps rank r of an EP group to experts r·E_local… over contiguous ranks: remove the key "
                              "(or set it to false)")
    if mpu is not None:
        raise OMoEConfigError(f"mpu={type(mpu).__name__}: OMoE does not support tensor/model parallelism (an expert "
                              "sharded by a tensor-parallel group would project a slice of its gradient with a projector "
                              "over the whole input); run without mpu")
    _refuse_recomputed_layers(model, layers)
    if isinstance(optimizer, torch.optim.Optimizer):
        _refuse_adagrad_under_zero(optimizer, stage)
    elif stage in (1, 2) and str(ds_config.get("optimizer", {}).get("type", "")).lower() == "adagrad":
        raise OMoEConfigError(_ADAGRAD_UNDER_ZERO.format(stage=stage, what="the config optimizer \"Adagrad\""))


def _refuse_recomputed_layers(model, layers) -> None:
    moe_modules = {id(layer.module) for layer in layers}
    checkpointing = [name for name, m in model.named_modules() if getattr(m, "gradient_checkpointing", False) is True
                     and any(id(sub) in moe_modules for sub in m.modules())]
    if checkpointing:
        raise OMoEConfigError(f"gradient checkpointing is on ({checkpointing[0] or type(model).__name__}): it recomputes "
                              "the MoE layers in backward, which would record their inputs twice and run the O-step "
                              "hooks on the recomputed graph; call model.gradient_checkpointing_disable()")


def _refuse_zero3_layouts(layers, omoe_enabled: bool) -> None:
    """ZeRO-3: DeepSpeed refuses its native MoE layer; OMoE's replicated fused-expert adapter reads its
    parameters outside the forward, where ZeRO-3 leaves placeholders. AutoEP layers and models without
    MoE layers are fine."""
    for layer in layers:
        if layer.deepspeed_expert_files:
            raise OMoEConfigError(f"zero_optimization.stage=3 with DeepSpeed's native MoE layer ({layer.name}): DeepSpeed "
                                  "does not support native MoE under ZeRO-3. Use a Hugging Face MoE model through AutoEP "
                                  "(\"expert_parallel\": {\"enabled\": true, \"autoep_size\": N, \"preset_model\": ...}), "
                                  "or ZeRO stage 0, 1 or 2 (ds_configs/omoe_zero2.json)")
        if omoe_enabled:
            raise OMoEConfigError(f"zero_optimization.stage=3 with transformers' fused experts ({layer.name}) replicated: "
                                  "OMoE runs them under ZeRO-3 through DeepSpeed AutoEP; add \"expert_parallel\": "
                                  "{\"enabled\": true, \"autoep_size\": N} (N = 1 keeps them replicated), or use ZeRO "
                                  "stage 0, 1 or 2")


_ADAGRAD_UNDER_ZERO = ("zero_optimization.stage={stage} with {what}: DeepSpeed 0.19.8 rebuilds torch Adagrad over "
                       "one parameter group under ZeRO-1/2 (stage_1_and_2.py), which loses the expert groups and fails "
                       "at the first step; use stage 0 (ds_configs/omoe_zero0.json) or another base optimizer")


def _refuse_adagrad_under_zero(optimizer, stage: int) -> None:
    if stage in (1, 2) and isinstance(optimizer, torch.optim.Adagrad):
        raise OMoEConfigError(_ADAGRAD_UNDER_ZERO.format(stage=stage, what="torch.optim.Adagrad"))


def _moe_param_groups(params):
    params = list(params)
    if params and isinstance(params[0], dict):
        groups = [{"name": f"group{i}", **g} for i, g in enumerate(params)]
    else:
        groups = [{"name": "dense-params", "params": params}]
    if any(g.get("moe") for g in groups):
        return groups
    return [g for g in split_params_into_different_moe_groups_for_optimizer(groups) if g["params"]]


def _expert_groups(params, expert_ids: set) -> list:
    """The groups with every group that mixes `expert_ids` and other parameters split in two (same options)."""
    params = list(params)
    if not expert_ids:
        return params
    groups = params if params and isinstance(params[0], dict) else [{"name": "dense-params", "params": params}]
    out = []
    for group in groups:
        members = list(group["params"])
        experts = [p for p in members if id(p) in expert_ids]
        dense = [p for p in members if id(p) not in expert_ids]
        if experts and dense:
            out += [{**group, "params": dense},
                    {**group, "name": f"{group.get('name', 'group')}-omoe-experts", "params": experts}]
        else:
            out.append(group)
    return out


def _split_moe_param_groups_(optimizer: torch.optim.Optimizer, own_groups: set) -> None:
    """ZeRO and the O-step dense freeze need expert params in groups of their own (DeepSpeed's `moe`
    groups for its native experts); a client optimizer built from model.parameters() mixes them.
    Torch keys optimizer state by parameter, not by group, so regrouping keeps any state it already
    has (Adagrad makes some at init)."""
    native = any(is_moe_param(p) for g in optimizer.param_groups for p in g["params"]) and \
        not any(g.get("moe") for g in optimizer.param_groups)
    fused = any(id(p) in own_groups for g in optimizer.param_groups for p in g["params"])
    if not (native or fused):
        return
    groups = _moe_param_groups(optimizer.param_groups) if native else list(optimizer.param_groups)
    groups = _expert_groups(groups, own_groups)
    optimizer.param_groups.clear()
    for group in groups:
        optimizer.add_param_group(group)
