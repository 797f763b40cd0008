"""Adapter for Hugging Face transformers' fused experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 …).

transformers 5 keeps a layer's experts in one module decorated by `use_experts_implementation`:
gate_up_proj [E, 2·ff, d] (gate rows first, then up) and down_proj [E, d, ff], called as
experts(hidden_states [T, d], top_k_index [T, k], top_k_weights [T, k]) and dispatched to the
implementation named by config._experts_implementation. Shared experts and their gates (Qwen2-MoE,
DeepSeek-V3) are ordinary MLPs outside this module, so they stay dense.

There is no expert parallelism here: every rank holds every expert (EP = 1) and DeepSpeed reduces
their gradients like any dense parameter's; OMoE gives them optimizer groups of their own.

Recording takes h from the experts' own computation, never recomputing it: every implementation
forms h = act(gate·x) ⊙ (up·x) and feeds it to down_proj —
- grouped_mm, batched_mm: through `self._apply_gate`, which this adapter wraps on the instance; its
  rows are the (token, route) pairs, sorted by expert (grouped_mm: torch.sort of the flat routes, the
  same call on the same tensor) or in token-major order (batched_mm);
- eager: in a per-expert loop as F.linear(h, down_proj[e]); a TorchFunctionMode active only during
  the recording forward catches that call and reads e from the weight view's offset in down_proj.
Any other implementation is refused by name, before any compute.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core.config import OMoEConfigError
from ..core.projection_hooks import FusedGradProjector
from ..core.wrapping import wrap_instance_method
from .base import H, X, ExpertLayer, ProjectorView, RecordContext, Stream
from .fused_token_side import FusedTokenSide

RECORDABLE_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
SWIGLU_NAMES = ("gate", "up", "down")


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module (decorated by use_experts_implementation), any variant."""
    return hasattr(module, "is_concatenated") and hasattr(module, "has_gate") and isinstance(
        getattr(module, "down_proj", None), nn.Parameter)


def implementation(module: nn.Module) -> str:
    config = getattr(module, "config", None)
    return getattr(config, "_experts_implementation", None) or "eager"


class HFFusedExpertsLayer(ExpertLayer):
    layout = "hf-fused"
    matrix_names = SWIGLU_NAMES
    matrix_streams = (X, X, H)

    def __init__(self, index: int, name: str, module: nn.Module):
        E, two_ff, d = module.gate_up_proj.shape
        super().__init__(index, name, module, E, 1, (Stream(d, False), Stream(two_ff // 2, False)))
        self.ff = two_ff // 2

    def expert_parameters(self) -> List[nn.Parameter]:
        return [self.module.gate_up_proj, self.module.down_proj]

    routes_padding = True

    def watch_routing(self, callback) -> list:
        def before_experts(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            tokens = hidden.detach().reshape(-1, hidden.shape[-1])
            callback(tokens, index.reshape(tokens.shape[0], -1).to(torch.int64))
        return [self.module.register_forward_pre_hook(before_experts, with_kwargs=True)]

    def matrices(self, local: int) -> Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        gate_up = self.module.gate_up_proj[local]
        return {"gate": (gate_up[:self.ff], None), "up": (gate_up[self.ff:], None),
                "down": (self.module.down_proj[local], None)}

    def expert_forward(self, local: int, tokens: torch.Tensor) -> torch.Tensor:
        h = self.module._apply_gate(F.linear(tokens, self.module.gate_up_proj[local]))
        return F.linear(h, self.module.down_proj[local])

    def attach_projection(self, view: ProjectorView, is_active, timer: list) -> list:
        return [FusedGradProjector(self.module.gate_up_proj, lambda G: view.weight_product_stack(X, G),
                                   lambda: is_active() and view.side(X) != "token", timer),
                FusedGradProjector(self.module.down_proj, lambda G: view.weight_product_stack(H, G),
                                   lambda: is_active() and view.side(H) != "token", timer),
                FusedTokenSide(self.module, {X: {"gate_up_proj": self.module.gate_up_proj},
                                             H: {"down_proj": self.module.down_proj}},
                               {X: 2 * self.ff, H: self.module.down_proj.shape[1]}, _routed_pairs, view, is_active,
                               timer)]

    def attach_recorder(self, context: RecordContext) -> list:
        return [_FusedRecorder(self, context)]


class _FusedRecorder:
    """Wraps the experts' forward and _apply_gate on the instance; both are plain passthroughs
    outside a recording forward, so outputs and gradients keep their bits."""

    def __init__(self, layer: HFFusedExpertsLayer, context: RecordContext):
        self.layer, self.context = layer, context
        self.module = layer.module
        self._routes = None  # (top_k_index [T, k], real-token mask [T] or None) of the recording forward
        forward, apply_gate = self.module.forward, self.module._apply_gate

        def recording_forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            if not self.context.should_capture(self.module):
                return forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
            impl = implementation(self.module)
            if impl not in RECORDABLE_IMPLEMENTATIONS:
                raise OMoEConfigError(_unrecordable(layer.name, impl))
            used = self.context.token_mask(hidden_states)
            self._record_x(hidden_states.detach(), top_k_index, used)
            self._routes = (top_k_index, used, impl)
            try:
                if impl == "eager":
                    with _DownProjWatch(self):
                        return forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
                return forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
            finally:
                self._routes = None

        def recording_apply_gate(gate_up_out):
            h = apply_gate(gate_up_out)
            if self._routes is not None and self._routes[2] != "eager":
                self._record_h_rows(h.detach())
            return h

        self._restore = [wrap_instance_method(self.module, "forward", recording_forward),
                         wrap_instance_method(self.module, "_apply_gate", recording_apply_gate)]

    def remove_hooks(self) -> None:
        for restore in reversed(self._restore):
            restore()

    def _record_x(self, x: torch.Tensor, top_k_index: torch.Tensor, used: Optional[torch.Tensor]) -> None:
        M = self.layer.num_experts
        routed = F.one_hot(top_k_index.to(torch.int64), M).sum(1) > 0  # [T, M]; routes name distinct experts
        if used is not None:
            routed &= used.unsqueeze(1)
        self.context.window.add_routed(X, routed, x)

    def _record_h_rows(self, h: torch.Tensor) -> None:
        top_k_index, used, impl = self._routes
        k = top_k_index.shape[-1]
        expert_ids = top_k_index.reshape(-1).to(torch.int64)
        if impl == "grouped_mm":
            expert_ids, perm = torch.sort(expert_ids)
            tokens = perm // k
        else:  # batched_mm: one row per (token, route), token-major
            tokens = torch.arange(expert_ids.shape[0], device=expert_ids.device) // k
        if used is not None:
            keep = used[tokens]
            expert_ids, h = expert_ids[keep], h[keep]
        self.context.window.add_per_expert(H, expert_ids, h)

    def record_eager_expert(self, expert: int, h: torch.Tensor) -> None:
        top_k_index, used, _ = self._routes
        _, tokens = torch.where((top_k_index == expert).T)  # the rows eager's loop gathered, in its order
        if used is not None:
            h = h[used[tokens]]
        self.context.window.add_expert(H, expert, h.sum(0), h.shape[0])


class _DownProjWatch(TorchFunctionMode):
    """During an eager recording forward: F.linear(h, down_proj[e]) hands h of expert e to the recorder."""

    def __init__(self, recorder: _FusedRecorder):
        super().__init__()
        self.recorder = recorder
        down = recorder.module.down_proj
        self.start = down.data_ptr()
        self.expert_bytes = down.stride(0) * down.element_size()
        self.end = self.start + down.shape[0] * self.expert_bytes
        self.shape = tuple(down.shape[1:])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if (isinstance(weight, torch.Tensor) and tuple(weight.shape) == self.shape
                    and self.start <= weight.data_ptr() < self.end):
                expert = (weight.data_ptr() - self.start) // self.expert_bytes
                self.recorder.record_eager_expert(int(expert), args[0].detach())
        return func(*args, **kwargs)


def _routed_pairs(hidden_states, top_k_index, *args, **kwargs) -> int:
    return top_k_index.numel()  # (token, route) pairs: every expert is local


def _unrecordable(name: str, impl: str) -> str:
    return (f"experts {name}: experts_implementation={impl!r} computes h inside a kernel OMoE cannot read; OMoE records "
            f"it from {list(RECORDABLE_IMPLEMENTATIONS)}: load the model with experts_implementation=\"grouped_mm\" "
            "(or set model.config._experts_implementation)")


def describe(index: int, name: str, module: nn.Module) -> Optional[HFFusedExpertsLayer]:
    if not is_fused_experts(module):
        return None
    where = f"experts {name} ({type(module).__name__})"
    unsupported = [why for flag, why in (
        (getattr(module, "is_transposed", False), "transposed [E, in, out] weights"),
        (not getattr(module, "is_concatenated", True), "interleaved gate/up rows"),
        (getattr(module, "has_bias", False), "expert biases"),
        (not getattr(module, "has_gate", True), "ungated up_proj experts"),
        (getattr(module, "has_post_expert_norm", False), "a post-expert norm")) if flag]
    if unsupported:
        raise OMoEConfigError(f"{where} has {', '.join(unsupported)}; OMoE supports concatenated, untransposed, "
                              "bias-free gate_up_proj [E, 2·ff, d] with down_proj [E, d, ff] (Mixtral, Qwen2-MoE, "
                              "Qwen3-MoE, OLMoE, DeepSeek-V3); GPT-OSS-style experts are not supported yet")
    if getattr(module, "_is_expert_parallel", False):
        raise OMoEConfigError(f"{where} is sharded by transformers' own expert parallelism; OMoE runs these experts "
                              "replicated (EP = 1) through DeepSpeed: load the model without a distributed/tp plan")
    impl = implementation(module)
    if impl not in RECORDABLE_IMPLEMENTATIONS:
        raise OMoEConfigError(_unrecordable(name, impl))
    E = module.gate_up_proj.shape[0]
    if E < 2:
        raise OMoEConfigError(f"{where} has {E} expert: OMoE projects by the other experts' projectors; use >= 2")
    if module.gate_up_proj.dim() != 3 or module.down_proj.shape != (E, module.gate_up_proj.shape[2],
                                                                    module.gate_up_proj.shape[1] // 2):
        raise OMoEConfigError(f"{where}: gate_up_proj {tuple(module.gate_up_proj.shape)} and down_proj "
                              f"{tuple(module.down_proj.shape)} are not [E, 2·ff, d] and [E, d, ff]")
    return HFFusedExpertsLayer(index, name, module)
