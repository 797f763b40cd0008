"""O-step projection of expert gradients by P̄_m, on either side (core/projection_side.py).

Gradient side: tensor hooks on the weight and the bias, so they run before DeepSpeed accumulates,
reduces or partitions anything (ZeRO 0/1/2 alike). The projection couples the two: the weight's new
gradient needs g_b, the bias's needs G_W·c. Each leaf hook sees only its own gradient, so a hook on
the Linear's output gradient δ supplies the side terms: g_b = Σδ and G_W·c = δᵀ(X·c), both O(tokens·d).

Token side: `ProjectedLinear` is F.linear whose backward returns [G_W | g_b] = δᵀ(X̃·P̄) directly, so
autograd never forms δᵀX̃; X̃·P̄ is computed in the forward (saved in place of X) and shared by the
matrices that read the same input (`TokenProduct`). Where the rows are capacity slots (DeepSpeed's native
experts), X̃·P̄ is computed for the filled slots only: every empty slot's input row is one and the same row
r₀ (zeros, or the expert's function of zeros), so their part is the rank-1 (Σ_empty δ)ᵀ(r̃₀·P̄), exact.
"""
from __future__ import annotations

import time
import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import projector
from .wrapping import wrap_instance_method


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
            # Weakly: the graph's nodes hold this hook from C++, and a loss the caller (or the engine) keeps
            # would otherwise keep this projector, OMoE and the whole engine out of the collector's reach.
            x, projector_ref = inputs[0].detach(), weakref.ref(self)
            output.register_hook(lambda delta: _collect_side_terms(projector_ref, x, delta))

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


def _collect_side_terms(projector_ref, x: torch.Tensor, delta: torch.Tensor) -> None:
    projector = projector_ref()
    if projector is not None:
        projector._collect_side_terms(x, delta)


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
    """y = F.linear(x, W, b); backward: δW for x, and [G_W | g_b] = δᵀ(X̃·P̄) from x_pbar = X̃·P̄ [rows, n].
    With `filled` (a bool mask over the rows), x_pbar holds the filled rows only and `empty_pbar` [n] is
    r̃₀·P̄ of the one row every other row equals: [G_W | g_b] = δ_filledᵀ·x_pbar + (Σ_empty δ)ᵀ·empty_pbar.
    Capacity padding is then skipped in the forward and δW too: every empty row's output is the one row
    F.linear(r₀), and its input gradient is 0 where its δ is 0 (DeepSpeed's combine weights are 0 there), else
    computed. At M = 64 and 4096 tokens per rank the padding is ~3/4 of the expert rows (bench/expert_scaling.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias, x_pbar, filled=None, empty_pbar=None):
        ctx.save_for_backward(weight, x_pbar, filled, empty_pbar)
        ctx.has_bias = bias is not None
        if filled is None:
            return F.linear(x, weight, bias)
        rows = x.reshape(-1, x.shape[-1])
        out = rows.new_empty(rows.shape[0], weight.shape[0])
        out[filled] = F.linear(rows[filled], weight, bias)
        empty = ~filled
        if bool(empty.any()):
            if empty_pbar is None:
                raise ValueError("ProjectedLinear: rows outside `filled` need empty_pbar, r̃₀·P̄ of the row they "
                                 "all equal")
            # every empty row is r₀ (TokenProduct checked): one row's output stands for all of them
            out[empty] = F.linear(rows[int(empty.nonzero()[0])], weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        weight, x_pbar, filled, empty_pbar = ctx.saved_tensors
        delta = grad_out.reshape(-1, grad_out.shape[-1])
        d = weight.shape[1]
        grad_x = None
        if filled is None:
            if ctx.needs_input_grad[0]:
                grad_x = grad_out @ weight
            projected = delta.to(projector.PROJECTOR_DTYPE).T @ x_pbar  # [out, n]
        else:
            delta_filled = delta[filled]
            projected = delta_filled.to(projector.PROJECTOR_DTYPE).T @ x_pbar
            delta_empty = delta[~filled] if empty_pbar is not None else None  # None: every row is filled
            if delta_empty is not None:
                projected.add_(torch.outer(delta_empty.to(projector.PROJECTOR_DTYPE).sum(0), empty_pbar))
            if ctx.needs_input_grad[0]:
                grad_x = delta.new_zeros(delta.shape[0], d)
                grad_x[filled] = delta_filled @ weight
                if delta_empty is not None and bool(delta_empty.any()):
                    grad_x[~filled] = delta_empty @ weight
                grad_x = grad_x.view(*grad_out.shape[:-1], d)
        grad_b = projected[:, d].to(weight.dtype) if ctx.has_bias else None
        return grad_x, projected[:, :d].to(weight.dtype), grad_b, None, None, None


class TokenRows:
    """X̃·P̄ of one input, for ProjectedLinear: of every row, or of the filled rows plus the empty rows' one."""

    def __init__(self, x_pbar: torch.Tensor, filled: Optional[torch.Tensor] = None,
                 empty_pbar: Optional[torch.Tensor] = None):
        self.x_pbar, self.filled, self.empty_pbar = x_pbar, filled, empty_pbar

    def apply(self, x, weight, bias):
        return ProjectedLinear.apply(x, weight, bias, self.x_pbar, self.filled, self.empty_pbar)


class TokenProduct:
    """X̃·P̄ of one (expert, stream), timed, computed once per input tensor: gate and up read the same x.
    `filled_rows()`, where given, is the mask of the capacity slots holding tokens in the current forward
    (None: every row): the product then covers those rows and one empty row, when all empty rows are equal."""

    def __init__(self, product: Callable[[torch.Tensor], torch.Tensor], timer: list,
                 filled_rows: Optional[Callable[[], Optional[torch.Tensor]]] = None):
        self._product, self._timer, self._filled_rows = product, timer, filled_rows
        self._last = ()  # weak refs (input, X̃·P̄, filled, empty row's): the autograd graph owns the tensors

    def __call__(self, x: torch.Tensor) -> TokenRows:
        if self._last and self._last[0]() is x and self._last[1]() is not None:
            return TokenRows(*(ref() if ref is not None else None for ref in self._last[1:]))
        start = time.perf_counter()
        with torch.no_grad():
            value = self._rows(x.detach().reshape(-1, x.shape[-1]))
        self._timer[0] += time.perf_counter() - start
        self._last = tuple(weakref.ref(t) if t is not None else None
                           for t in (x, value.x_pbar, value.filled, value.empty_pbar))
        return value

    def _rows(self, rows: torch.Tensor) -> TokenRows:
        filled = self._filled_rows() if self._filled_rows is not None else None
        if filled is None or filled.shape[0] != rows.shape[0] or bool(filled.all()):
            return TokenRows(self._product(rows))
        empty = rows[~filled]
        if not torch.equal(empty, empty[:1].expand_as(empty)):  # not slots after all: every row, as given
            return TokenRows(self._product(rows))
        both = self._product(torch.cat([rows[filled], empty[:1]]))
        return TokenRows(both[:-1], filled, both[-1])


class LinearTokenSide:
    """Replaces an expert nn.Linear's forward (on the instance) by ProjectedLinear over the rows `rows_for(x)`
    gives (a TokenProduct) where it gives one; otherwise the class's own forward runs, so outputs and gradients
    keep their bits."""

    def __init__(self, linear: nn.Linear, rows_for: Callable[[torch.Tensor], Optional[TokenProduct]]):
        self.linear, self._rows_for = linear, rows_for
        self._restore = wrap_instance_method(linear, "forward", self._forward)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = self.linear
        product = self._rows_for(x) if torch.is_grad_enabled() and linear.weight.requires_grad else None
        if product is not None:
            return product(x).apply(x, linear.weight, linear.bias)
        return type(linear).forward(linear, x)

    def remove_hooks(self) -> None:
        self._restore()

