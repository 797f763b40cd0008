"""The `"omoe"` section of a DeepSpeed JSON, validated once into a dataclass.

DeepSpeed passes unknown top-level sections through, so OMoE's settings live beside ZeRO's in the
same file. This module is the one place that reads them.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from .projection_side import SIDES
from .projector_state import STORAGES


class OMoEConfigError(ValueError):
    """A bad OMoE setting, model or launch combination, raised before any compute starts."""


@dataclass(frozen=True)
class OMoEConfig:
    enabled: bool = True
    skip_step: int = 5          # s: step i is an O step when i % s == 0 and i > 0
    alpha0: float = 1.0         # α0 of α_i = α0·λ^(i/n)
    lam: float = 1.0            # λ ∈ (0, 1]; 1 keeps α constant
    total_steps: Optional[int] = None  # n; taken from the scheduler's total_num_steps when absent
    loo_divisor: str = "M-1"    # "M" reproduces the 1/M printed in eq. 12
    projector_storage: str = "auto"  # "factored" (P = I − UUᵀ), "hybrid", "dense", or the smallest per layer and stream
    projection_side: str = "auto"    # "gradient" ([G_W | g_b]·P̄), "token" (δᵀ(X̃·P̄)), or the cheaper per stream and O step

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise OMoEConfigError(f"omoe.enabled must be true or false, got {self.enabled!r}")
        if isinstance(self.skip_step, bool) or not isinstance(self.skip_step, int) or self.skip_step < 2:
            raise OMoEConfigError(f"omoe.skip_step={self.skip_step!r} is invalid: it must be an integer >= 2 "
                                  "(an O step every s steps needs at least one R step to record inputs; the paper uses 5)")
        if not _is_number(self.alpha0) or not self.alpha0 > 0:
            raise OMoEConfigError(f"omoe.alpha0={self.alpha0!r} is invalid: it must be a number > 0 "
                                  "(it regularises the RLS projector; OWM uses values around 1.0)")
        if not _is_number(self.lam) or not 0 < self.lam <= 1:
            raise OMoEConfigError(f"omoe.lam={self.lam!r} is invalid: it must lie in (0, 1] "
                                  "(α decays as α0·λ^(i/n); use 1 for a constant α)")
        if self.total_steps is not None and (isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int)
                                             or self.total_steps < 1):
            raise OMoEConfigError(f"omoe.total_steps={self.total_steps!r} is invalid: it must be a positive integer")
        if self.loo_divisor not in ("M-1", "M"):
            raise OMoEConfigError(f"omoe.loo_divisor={self.loo_divisor!r} is invalid: use \"M-1\" (leave-one-out "
                                  "average, default) or \"M\" (the 1/M printed in the paper's eq. 12)")

        if self.projector_storage not in STORAGES:
            raise OMoEConfigError(f"omoe.projector_storage={self.projector_storage!r} is invalid: use \"auto\" (the form "
                                  "holding the fewest bytes: factored, then hybrid, then dense), \"factored\", "
                                  "\"hybrid\" (dense S, local factors) or \"dense\"")
        if self.projection_side not in SIDES:
            raise OMoEConfigError(f"omoe.projection_side={self.projection_side!r} is invalid: use \"auto\" (the cheaper "
                                  "side per layer, stream and O step), \"gradient\" ([G_W | g_b]·P̄ after autograd) or "
                                  "\"token\" (δᵀ(X̃·P̄) in place of autograd's weight-gradient product)")

    def is_o_step(self, step: int) -> bool:
        return self.enabled and step > 0 and step % self.skip_step == 0

    @classmethod
    def from_ds_config(cls, ds_config: dict) -> "OMoEConfig":
        section = ds_config.get("omoe", {})
        if not isinstance(section, dict):
            raise OMoEConfigError(f"the \"omoe\" section must be a JSON object, got {type(section).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise OMoEConfigError(f"unknown key(s) {unknown} in the \"omoe\" section; valid keys are {sorted(known)}")
        config = cls(**section)
        if config.enabled and config.lam < 1 and config.total_steps is None:
            total = _scheduler_total_steps(ds_config)
            if total is None:
                raise OMoEConfigError(f"omoe.lam={config.lam} < 1 decays α over n steps, but n is unknown: set "
                                      "omoe.total_steps, or a scheduler with params.total_num_steps, or lam=1")
            config = dataclasses.replace(config, total_steps=total)
        return config


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scheduler_total_steps(ds_config: dict) -> Optional[int]:
    total = ds_config.get("scheduler", {}).get("params", {}).get("total_num_steps")
    return int(total) if isinstance(total, (int, float)) and total > 0 else None


def resolve_ds_config(args=None, config=None, config_params=None) -> dict:
    """The DeepSpeed config as a dict, from wherever deepspeed.initialize would take it."""
    if config is None:
        config = config_params
    args_config = getattr(args, "deepspeed_config", None) if args is not None else None
    if args_config is not None and config is not None:
        raise OMoEConfigError("two DeepSpeed configs were given (args.deepspeed_config and config=); pass one")
    config = config if config is not None else args_config
    if config is None:
        raise OMoEConfigError("no DeepSpeed config: pass config=<path or dict> or --deepspeed_config <path>")
    if isinstance(config, dict):
        return copy.deepcopy(config)
    if isinstance(config, (str, os.PathLike)):
        if not os.path.isfile(config):
            raise OMoEConfigError(f"DeepSpeed config file {os.fspath(config)!r} does not exist")
        with open(config) as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as e:
                raise OMoEConfigError(f"DeepSpeed config {os.fspath(config)!r} is not valid JSON: {e}") from e
    raise OMoEConfigError(f"DeepSpeed config must be a path or a dict, got {type(config).__name__}")


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
