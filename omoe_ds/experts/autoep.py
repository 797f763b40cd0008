"""Adapter for DeepSpeed AutoEP layers (`deepspeed.module_inject.auto_ep_layer.AutoEPMoELayer`).

AutoEP swaps a Hugging Face MoE block for an AutoEPMoELayer inside `deepspeed.initialize`, so these
layers exist only on `engine.module` (omoe_ds.initialize finds them there). Each holds
`experts = GroupedExperts` with w1 (gate), w3 (up) [E_local, ff, d] and w2 (down) [E_local, d, ff], no
biases, h = act(w1·x, w3·x) entering w2; rank `ep_rank` holds global experts ep_rank·E_local… (the
seam's contiguous layout). Its parameters are DeepSpeed MoE parameters (allreduce=False, group
"ep_size_N"), so DeepSpeed's own MoE groups keep them apart from the dense ones.

Recording, receive side, inside `experts.forward(x, aligned_counts)` (wrapped on the instance):
x arrives expert-major, each local expert's chunk its real rows first and then zero rows up to a
multiple of 8 (ep_kernels.generate_permute_indices); a row is filled iff it is nonzero. Padding
tokens of the batch are zeroed at the layer's input during recording forwards (a forward pre-hook),
so they are excluded the same way; a padded position's MoE output never reaches a real token (the
attention mask hides it, the loss ignores it), so real-token outputs keep their bits. h is caught,
never recomputed, where it enters w2: `torch.matmul(h, w2[e].T)` (for-loop path) or
`torch._grouped_mm(h, w2.T, offs)` (grouped_mm path), by a TorchFunctionMode that is active during
recording forwards only and tells w2 by its storage (under ZeRO-3 the experts' forward hook has
gathered it by then). DeepEP dispatch and the Triton grouped GEMM run outside torch functions and
are refused by name, as is expert tensor parallelism (folding).

Projection, on the side core/projection_side.py picks per stream and O step: on the gradient side one
batched product per fused parameter (w1 and w3 by P̄ over x, w2 by P̄ over h), in tensor hooks that see
each rank's full local expert gradient before ZeRO (1, 2 or 3) reduces and partitions it; on the token
side fused_token_side.py returns δᵀ(X̃·P̄) from the matmul / _grouped_mm calls themselves (w1 and w3 share
X̃·P̄), which autograd accumulates into the same full local gradient. Alignment rows are zero in x and h, so
their X̃·P̄ rows are zero and add nothing. Under ZeRO-3 the parameters are placeholders outside the forward:
`matrices()` views are valid only inside `deepspeed.zero.GatheredParameters(layer.expert_parameters())`.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core.config import OMoEConfigError
from ..core.projection_hooks import FusedGradProjector
from ..core.wrapping import wrap_instance_method
from .base import H, X, ExpertLayer, ProjectorView, RecordContext, Stream, nonzero_rows
from .fused_token_side import FusedTokenSide

SWIGLU_NAMES = ("gate", "up", "down")


def is_autoep_layer(module: nn.Module) -> bool:
    return getattr(type(module), "_is_autoep_layer", False) and hasattr(module, "experts")


class AutoEPLayer(ExpertLayer):
    layout = "autoep-swiglu"
    matrix_names = SWIGLU_NAMES
    matrix_streams = (X, X, H)

    def __init__(self, index: int, name: str, module: nn.Module):
        experts = module.experts
        ff, d = _shape(experts.w1)[1:]
        super().__init__(index, name, module, module.num_experts, module.ep_size, (Stream(d, False), Stream(ff, False)))
        self.experts = experts
        self.ff = ff

    def expert_parameters(self) -> List[nn.Parameter]:
        return [self.experts.w1, self.experts.w3, self.experts.w2]

    def matrix_shapes(self) -> List[List[int]]:
        return [list(_shape(p)[1:]) for p in self.expert_parameters()]

    routes_padding = True

    def watch_routing(self, callback) -> list:
        def after_router(router, inputs, output):
            tokens = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            callback(tokens, output[1].reshape(tokens.shape[0], -1).to(torch.int64))  # selected_experts [T, k]
        return [self.module.router.register_forward_hook(after_router)]

    def matrices(self, local: int) -> Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        e = self.experts
        return {"gate": (e.w1[local], None), "up": (e.w3[local], None), "down": (e.w2[local], None)}

    def expert_forward(self, local: int, tokens: torch.Tensor) -> torch.Tensor:
        from deepspeed.moe.ep_experts import apply_expert_activation
        e = self.experts
        gate, up = tokens @ e.w1[local].T, tokens @ e.w3[local].T
        h = apply_expert_activation(gate, up, e.activation, e.activation_alpha, e.activation_limit, fused=False)
        return h @ e.w2[local].T

    def attach_projection(self, view: ProjectorView, is_active, timer: list) -> list:
        e = self.experts
        on_gradient_side = {s: (lambda s=s: is_active() and view.side(s) != "token") for s in (X, H)}
        return [FusedGradProjector(e.w1, lambda G: view.weight_product_stack(X, G), on_gradient_side[X], timer),
                FusedGradProjector(e.w3, lambda G: view.weight_product_stack(X, G), on_gradient_side[X], timer),
                FusedGradProjector(e.w2, lambda G: view.weight_product_stack(H, G), on_gradient_side[H], timer),
                FusedTokenSide(e, {X: {"w1": e.w1, "w3": e.w3}, H: {"w2": e.w2}},
                               {X: 2 * self.ff, H: self.streams[X].d_in}, _received_rows, view, is_active, timer)]

    def attach_recorder(self, context: RecordContext) -> list:
        return [_AutoEPRecorder(self, context)]


def _received_rows(x, num_tokens_per_expert, *args, **kwargs) -> int:
    return int(num_tokens_per_expert.sum())  # every local expert's rows, alignment rows included: both sides pay them


def _shape(param: torch.Tensor) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)  # ZeRO-3 keeps the full shape there


class _AutoEPRecorder:
    """A pre-hook on the layer (zeroes padding tokens while recording) and the experts' forward wrapped on
    the instance; outside recording forwards both pass everything through unchanged."""

    def __init__(self, layer: AutoEPLayer, context: RecordContext):
        self.layer, self.context = layer, context
        self.experts = layer.experts
        self.first_global = layer.module.ep_rank * layer.num_local_experts
        self._chunks: Optional[List[torch.Tensor]] = None  # per local expert: filled-row mask of this forward
        self._handle = layer.module.register_forward_pre_hook(self._mask_padding)
        forward = self.experts.forward

        def recording_forward(x, num_tokens_per_expert, *args, **kwargs):
            if not self.context.should_capture(self.layer.module):
                return forward(x, num_tokens_per_expert, *args, **kwargs)
            counts = [int(c) for c in num_tokens_per_expert.tolist()]
            xs = torch.split(x.detach()[:sum(counts)], counts)
            self._chunks = [nonzero_rows(rows) for rows in xs]
            for local, (rows, filled) in enumerate(zip(xs, self._chunks)):
                self._add(X, local, rows[filled])
            try:
                with _DownProjWatch(self, counts):
                    return forward(x, num_tokens_per_expert, *args, **kwargs)
            finally:
                self._chunks = None

        self._restore = wrap_instance_method(self.experts, "forward", recording_forward)

    def remove_hooks(self) -> None:
        self._handle.remove()
        self._restore()

    def _mask_padding(self, module, args):
        if not self.context.should_capture(module) or not args:
            return None
        used = self.context.token_mask(args[0])
        if used is None:
            return None
        hidden = args[0]
        # × 1.0 keeps a real row's bits (and its gradient's); padding rows become the zero rows we skip
        return (hidden * used.reshape(*hidden.shape[:-1], 1).to(hidden.dtype), *args[1:])

    def _add(self, stream: int, local: int, rows: torch.Tensor) -> None:
        self.context.window.add_expert(stream, self.first_global + local, rows.sum(0), rows.shape[0])

    def record_h(self, local: int, h: torch.Tensor) -> None:
        self._add(H, local, h[self._chunks[local]])


class _DownProjWatch(TorchFunctionMode):
    """During a recording forward: h where it meets w2, per expert (matmul with w2[e].T) or all experts at
    once (_grouped_mm with w2.T, split by the aligned counts)."""

    def __init__(self, recorder: _AutoEPRecorder, counts: List[int]):
        super().__init__()
        self.recorder, self.counts = recorder, counts
        w2 = recorder.experts.w2
        self.start, self.expert_bytes = w2.data_ptr(), w2.stride(0) * w2.element_size()
        self.end = self.start + w2.shape[0] * self.expert_bytes
        self.expert_shape = tuple(w2.shape[1:])[::-1]  # w2[e].T: [ff, d]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.matmul and len(args) == 2 and self._reads_w2(args[1], self.expert_shape):
            self.recorder.record_h(int((args[1].data_ptr() - self.start) // self.expert_bytes), args[0].detach())
        elif func is torch._grouped_mm and len(args) >= 2 and self._reads_w2(args[1], (len(self.counts),
                                                                                         *self.expert_shape)):
            if args[1].data_ptr() == self.start:
                h = args[0].detach()[:sum(self.counts)]
                for local, rows in enumerate(torch.split(h, self.counts)):
                    self.recorder.record_h(local, rows)
        return func(*args, **kwargs)

    def _reads_w2(self, weight, shape) -> bool:
        return isinstance(weight, torch.Tensor) and tuple(weight.shape) == shape and \
            self.start <= weight.data_ptr() < self.end


def describe(index: int, name: str, module: nn.Module) -> Optional[AutoEPLayer]:
    if not is_autoep_layer(module):
        return None
    where = f"AutoEP layer {name}"
    experts = module.experts
    if getattr(module, "comm_backend", "comm") == "deepep" and module.ep_size > 1:
        raise OMoEConfigError(f"{where}: expert_parallel.comm_backend=\"deepep\" dispatches inside DeepEP's kernels, "
                              "where OMoE cannot record the experts' inputs; set \"comm_backend\": \"comm\"")
    if getattr(experts, "use_triton_grouped_mm", False):
        raise OMoEConfigError(f"{where}: the Triton grouped GEMM computes h where OMoE cannot read it; set "
                              "expert_parallel.disable_triton_grouped_mm=true (torch._grouped_mm) or use_grouped_mm=false")
    if getattr(module, "folding_group_handles", None) is not None:
        raise OMoEConfigError(f"{where} is folded with tensor parallelism (AutoEP+AutoTP); OMoE projects whole expert "
                              "matrices: set expert_tensor_parallel_size=1 and tensor_parallel.autotp_size=1")
    if module.num_experts < 2:
        raise OMoEConfigError(f"{where} has {module.num_experts} expert: OMoE projects by the other experts' "
                              "projectors; use >= 2")
    shapes = [tuple(_shape(p)) for p in (experts.w1, experts.w3, experts.w2)]
    E, ff, d = shapes[0]
    if E != module.num_local_experts or shapes[1] != shapes[0] or shapes[2] != (E, d, ff):
        raise OMoEConfigError(f"{where}: w1, w3, w2 of shapes {shapes} are not [E_local, ff, d], [E_local, ff, d], "
                              f"[E_local, d, ff] with E_local = {module.num_local_experts}")
    return AutoEPLayer(index, name, module)
