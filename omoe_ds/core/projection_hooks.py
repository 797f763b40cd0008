"""O-step projection of expert gradients by P̄_m, on either side (core/projection_side.py).

Gradient side: tensor hooks on the weight and the bias, so they run before DeepSpeed accumulates,
reduces or partitions anything (ZeRO 0/1/2 alike). The projection couples the two: the weight's new
gradient needs g_b, the bias's needs G_W·c. Each leaf hook sees only its own gradient, so a hook on
the Linear's output gradient δ supplies the side terms: g_b = Σδ and G_W·c = δᵀ(X·c), both O(tokens·d).

Token side: `ProjectedLinear` is F.linear whose backward returns [G_W | g_b] = δᵀ(X̃·P̄) directly, so
autograd never forms δᵀX̃; X̃·P̄ is computed in the forward (saved in place of X) and shared by the
matrices that read the same input (`TokenProduct`).
"""
from __future__ import annotations

import time
import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import projector


class ExpertGradProjector:
    """Projection hooks on one expert Linear. With P̄_m = [[A, c], [cᵀ, e]] (no c, e without a bias):
    `weight_product(G, d)` returns G·A in fp32 (whatever form the projectors are stored in),
    `bias_column()` c and `bias_corner()` e."""

    def __init__(self, linear: nn.Linear, weight_product: Callable[[torch.Tensor, int], torch.Tensor],
                 bias_column: Callable[[], torch.Tensor], bias_corner: Callable[[], torch.Tensor],
                 is_active: Callable[[], bool], timer: list):
        self.linear = linear
        self.has_bias = linear.bias is not None
        self._weight_product, self._pbar_bias_column, self._pbar_bias_corner = weight_product, bias_column, bias_corner
        self._is_active = is_active
        self._timer = timer  # [seconds] shared with the owner
        self._bias_grad_sum: Optional[torch.Tensor] = None     # Σδ, for the weight hook
        self._weight_grad_dot_c: Optional[torch.Tensor] = None  # δᵀ(X c), for the bias hook
        self._handles = [linear.weight.register_hook(self._project_weight)]
        if self.has_bias:
            self._handles += [linear.bias.register_hook(self._project_bias),
                              linear.register_forward_hook(self._watch_output)]

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _watch_output(self, linear, inputs, output) -> None:
        if self._is_active() and torch.is_grad_enabled() and output.requires_grad:
            x = inputs[0].detach()
            output.register_hook(lambda delta: self._collect_side_terms(x, delta))

    def _collect_side_terms(self, x: torch.Tensor, delta: torch.Tensor) -> None:
        start = time.perf_counter()
        delta_td = delta.reshape(-1, delta.shape[-1]).float()
        x_c = x.reshape(-1, x.shape[-1]).float() @ self._pbar_bias_column()
        # A Linear called several times per backward (shared layers) gets one leaf gradient: sum the calls.
        self._bias_grad_sum = _accumulate(self._bias_grad_sum, delta_td.sum(0))
        self._weight_grad_dot_c = _accumulate(self._weight_grad_dot_c, delta_td.T @ x_c)
        self._timer[0] += time.perf_counter() - start

    def _project_weight(self, grad_w: torch.Tensor):
        if not self._is_active():
            return None
        start = time.perf_counter()
        out = self._weight_product(grad_w.to(projector.PROJECTOR_DTYPE), grad_w.shape[1])
        if self.has_bias:  # + g_b cᵀ: the bias column moves with the weight
            out.addr_(self._take("_bias_grad_sum").to(projector.PROJECTOR_DTYPE), self._pbar_bias_column())
        out = out.to(grad_w.dtype)
        self._timer[0] += time.perf_counter() - start
        return out

    def _project_bias(self, grad_b: torch.Tensor):
        if not self._is_active():
            return None
        start = time.perf_counter()
        out = projector.project_bias_grad(grad_b, self._take("_weight_grad_dot_c"), self._pbar_bias_corner())
        self._timer[0] += time.perf_counter() - start
        return out

    def _take(self, name: str) -> torch.Tensor:
        value = getattr(self, name)
        if value is None:
            raise RuntimeError("OMoE O step: an expert Linear's gradient arrived without the forward that makes it "
                               "being seen in this O step; run forward and backward through the engine in the same step")
        setattr(self, name, None)
        return value


def _accumulate(total: Optional[torch.Tensor], term: torch.Tensor) -> torch.Tensor:
    return term if total is None else total + term


class FusedGradProjector:
    """The projection hook of a fused expert parameter W [E_local, out, in] (no bias): G ← G·P̄, one
    batched product over the expert axis, `stack_product(G)` in fp32."""

    def __init__(self, param: torch.nn.Parameter, stack_product: Callable[[torch.Tensor], torch.Tensor],
                 is_active: Callable[[], bool], timer: list):
        self._stack_product, self._is_active, self._timer = stack_product, is_active, timer
        self._handles = [param.register_hook(self._project)]

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _project(self, grad: torch.Tensor):
        if not self._is_active():
            return None
        start = time.perf_counter()
        out = self._stack_product(grad.to(projector.PROJECTOR_DTYPE)).to(grad.dtype)
        self._timer[0] += time.perf_counter() - start
        return out


class ProjectedLinear(torch.autograd.Function):
    """y = F.linear(x, W, b); backward: δW for x, and [G_W | g_b] = δᵀ(X̃·P̄) from x_pbar = X̃·P̄ [rows, n]."""

    @staticmethod
    def forward(ctx, x, weight, bias, x_pbar):
        ctx.save_for_backward(weight, x_pbar)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        weight, x_pbar = ctx.saved_tensors
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        projected = grad_out.reshape(-1, grad_out.shape[-1]).to(projector.PROJECTOR_DTYPE).T @ x_pbar  # [out, n]
        d = weight.shape[1]
        grad_b = projected[:, d].to(weight.dtype) if ctx.has_bias else None
        return grad_x, projected[:, :d].to(weight.dtype), grad_b, None


class TokenProduct:
    """X̃·P̄ of one (expert, stream), timed, computed once per input tensor: gate and up read the same x."""

    def __init__(self, product: Callable[[torch.Tensor], torch.Tensor], timer: list):
        self._product, self._timer = product, timer
        self._last = (None, None)  # weak refs (input, X̃·P̄): the autograd graph owns both

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        seen, value = (ref() if ref is not None else None for ref in self._last)
        if seen is x and value is not None:
            return value
        start = time.perf_counter()
        with torch.no_grad():
            value = self._product(x.detach().reshape(-1, x.shape[-1]))
        self._timer[0] += time.perf_counter() - start
        self._last = (weakref.ref(x), weakref.ref(value))
        return value


class LinearTokenSide:
    """Replaces an expert nn.Linear's forward (on the instance) by ProjectedLinear while `uses_token_side(x)`;
    otherwise the class's own forward runs, so outputs and gradients keep their bits."""

    def __init__(self, linear: nn.Linear, uses_token_side: Callable[[torch.Tensor], bool], product: TokenProduct):
        self.linear, self._uses_token_side, self._product = linear, uses_token_side, product
        linear.forward = self._forward

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = self.linear
        if torch.is_grad_enabled() and linear.weight.requires_grad and self._uses_token_side(x):
            return ProjectedLinear.apply(x, linear.weight, linear.bias, self._product(x))
        return type(linear).forward(linear, x)

    def remove_hooks(self) -> None:
        self.linear.__dict__.pop("forward", None)
