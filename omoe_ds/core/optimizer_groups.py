"""Which groups of the innermost torch optimizer hold experts, whatever DeepSpeed wraps it in.

An O step must leave every dense parameter and its optimizer state untouched (paper A §III: "In O
Step, only θ will be updated"). lr 0 is not enough (Adam still counts the step and folds the
gradient into its moments), so the O step hides the dense groups from the innermost optimizer's
step(). DeepSpeed's wrappers step that optimizer over their own flat fp32 copies, one group per
model-parameter group, so a group is classified from the model parameters behind it:

    wrapper                     model parameters of group i     innermost optimizer
    torch optimizer (ZeRO-0)    param_groups[i]["params"]       itself
    DeepSpeedZeroOptimizer      bit16_groups[i]                 .optimizer
    BF16_Optimizer              bf16_groups[i]                  .optimizer
    FP16_(Unfused)Optimizer     fp16_groups[i]                  .optimizer
    DeepSpeedZeroOptimizer_Stage3  fp16_groups[s], sub group s    .optimizer (see zero3_dense_tensors)

Which parameters are experts comes from the layer adapter (the caller's set), never from a
group's `moe` flag, so layouts that DeepSpeed does not know as MoE work the same way.
"""
from __future__ import annotations

from typing import List, Sequence, Set, Tuple

import torch

from .config import OMoEConfigError

_WRAPPER_GROUP_ATTRS = ("bit16_groups", "bf16_groups", "fp16_groups")


def is_zero3(engine_optimizer) -> bool:
    return hasattr(engine_optimizer, "sub_group_to_group_id") and hasattr(engine_optimizer, "fp32_partitioned_groups_flat")


def innermost_optimizer(engine_optimizer) -> Tuple[torch.optim.Optimizer, List[Sequence[torch.nn.Parameter]]]:
    """(the torch optimizer that updates the tensors, the model parameters behind each of its groups)."""
    if is_zero3(engine_optimizer):  # fp16_groups are sub groups there, not param groups: see zero3_dense_tensors
        return engine_optimizer.optimizer, list(engine_optimizer.fp16_groups)
    for attr in _WRAPPER_GROUP_ATTRS:
        groups = getattr(engine_optimizer, attr, None)
        if groups is not None and hasattr(engine_optimizer, "optimizer"):
            inner = engine_optimizer.optimizer
            if len(groups) != len(inner.param_groups):
                raise OMoEConfigError(f"{type(engine_optimizer).__name__} has {len(groups)} parameter groups but its "
                                      f"optimizer {type(inner).__name__} has {len(inner.param_groups)}; OMoE cannot "
                                      "tell the expert groups apart")
            return inner, list(groups)
    if isinstance(engine_optimizer, torch.optim.Optimizer):
        return engine_optimizer, [g["params"] for g in engine_optimizer.param_groups]
    raise OMoEConfigError(f"the engine's optimizer {type(engine_optimizer).__name__} is not a torch optimizer nor one "
                          "of DeepSpeed's ZeRO-1/2, BF16 or FP16 wrappers; OMoE cannot keep its dense groups out of "
                          "the O step")


def dense_group_tensors(optimizer: torch.optim.Optimizer, model_groups: List[Sequence[torch.nn.Parameter]],
                        expert_param_ids: Set[int], names: dict) -> Set[int]:
    """ids of the tensors the optimizer updates in groups of dense model parameters only.

    Keyed by tensor, not by group dict: load_state_dict replaces the group dicts but keeps the tensors.
    A group that mixes experts with dense parameters is refused: its flat ZeRO partition could not
    be stepped for one half only.
    """
    dense = set()
    for i, (group, params) in enumerate(zip(optimizer.param_groups, model_groups)):
        is_expert = [id(p) in expert_param_ids for p in params]
        if all(is_expert):
            continue
        if any(is_expert):
            _refuse_mixed(i, params, is_expert, names)
        dense.update(id(t) for t in group["params"])
    return dense


def _refuse_mixed(i: int, params, is_expert, names: dict) -> None:
    mixed = [names.get(id(p), "?") for p, e in zip(params, is_expert) if e][:2] + \
            [names.get(id(p), "?") for p, e in zip(params, is_expert) if not e][:2]
    raise OMoEConfigError(
        f"optimizer parameter group {i} mixes {sum(is_expert)} expert parameters with "
        f"{len(params) - sum(is_expert)} dense ones (e.g. {mixed}); an O step moves only the experts, so they "
        "need groups of their own: pass the optimizer as a callable (params -> optimizer), or build it from "
        "deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer")


def zero3_dense_tensors(engine_optimizer, expert_param_ids: Set[int], names: dict) -> Set[int]:
    """ZeRO-3 steps sub group s alone, its flat fp32 partition set as the only tensor of param group
    sub_group_to_group_id[s] for that step() (stage3._optimizer_step), so the dense tensors are the flat
    partitions of the sub groups of dense parameters; outside a step the groups hold no tensor at all."""
    dense = set()
    for s, params in enumerate(engine_optimizer.fp16_groups):
        is_expert = [id(p) in expert_param_ids for p in params]
        if any(is_expert) and not all(is_expert):
            _refuse_mixed(engine_optimizer.sub_group_to_group_id[s], params, is_expert, names)
        if params and not any(is_expert):
            dense.add(id(engine_optimizer.fp32_partitioned_groups_flat[s]))
    return dense


def without_groups(optimizer: torch.optim.Optimizer, hidden_tensors: Set[int]):
    """Context manager: the optimizer's step() sees none of the groups whose tensors are all hidden."""
    return _HiddenGroups(optimizer, hidden_tensors)


class _HiddenGroups:
    def __init__(self, optimizer, hidden_tensors):
        self.optimizer, self.hidden = optimizer, hidden_tensors

    def __enter__(self) -> bool:
        """True when some group is left to step."""
        self.saved = self.optimizer.param_groups
        kept = [g for g in self.saved if not (g["params"] and all(id(t) in self.hidden for t in g["params"]))]
        self.optimizer.param_groups = kept
        return bool(kept)

    def __exit__(self, *exc) -> None:
        self.optimizer.param_groups = self.saved
