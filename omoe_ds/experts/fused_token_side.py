"""The token side of the O-step projection for fused expert parameters W [E, out, in]: transformers' fused
experts (hf_fused.py) and DeepSpeed AutoEP's GroupedExperts (autoep.py).

In an O step whose stream projects on the token side (core/projection_side.py), each expert's slice of a
fused parameter gets δᵀ(X̃·P̄) instead of autograd's δᵀX̃. During such a forward a TorchFunctionMode
replaces the implementation's products with that parameter by autograd Functions that make the same call
forward and return the projected gradient backward, to the weight operand the implementation passed (a view
of the parameter), so autograd carries it into the parameter's one full gradient as it would its own:
- grouped_mm: grouped_mm(x sorted by expert, W.transpose(-2, -1), offs) — torch's kernel or transformers'
  fallback op (transformers' grouped_mm, AutoEP's torch._grouped_mm path); AutoEP's fused gate/up
  concatenates w1 and w3 first, and that concatenation is projected as one parameter of their stream;
- batched_mm: W[expert_ids] (taken from the detached W), then torch.bmm(W_selected, x.unsqueeze(-1));
- per expert: F.linear(x_e, W[e]) (transformers' eager) or torch.matmul(x_e, W[e].T) (AutoEP's for-loop),
  both core ProjectedLinear on the view.
X̃·P̄ is computed once per input and stream: AutoEP's w1 and w3 read the same x. A token-side forward that
routed rows but met no product with a token-side parameter raises: an implementation that changed must not
leave gradients unprojected.
"""
from __future__ import annotations

import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core.projection_hooks import ProjectedLinear
from ..core.wrapping import wrap_instance_method
from ..core.projector import PROJECTOR_DTYPE
from .base import ProjectorView


def _grouped_mm_functions() -> tuple:
    import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)
    found = [getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)]
    fallback = getattr(torch.ops.transformers, "grouped_mm_fallback", None)
    if fallback is not None:
        found += [fallback, fallback.default]
    return tuple(f for f in found if f is not None)


class _ProjectedGroupedMM(torch.autograd.Function):
    """grouped_mm(x, W_t, offs) with W_t = W.transpose(-2, -1) [E, in, out]; backward: δ·W per segment, and
    (δ_eᵀ(X̃_e·P̄_e))ᵀ for W_t[e]."""

    @staticmethod
    def forward(ctx, x, weight_t, offs, x_pbar, func):
        ctx.save_for_backward(weight_t, offs, x_pbar)
        ctx.func = func
        return func(x, weight_t, offs=offs)

    @staticmethod
    def backward(ctx, grad_out):
        weight_t, offs, x_pbar = ctx.saved_tensors
        grad_x = ctx.func(grad_out.contiguous(), weight_t.transpose(-2, -1), offs=offs) \
            if ctx.needs_input_grad[0] else None
        delta = grad_out.to(PROJECTOR_DTYPE)
        grad_w = torch.zeros_like(weight_t)  # W's own layout once transposed back; experts without rows get 0
        start = 0
        for e, end in enumerate(offs.tolist()):
            if end > start:
                grad_w[e] = (x_pbar[start:end].T @ delta[start:end]).to(weight_t.dtype)
            start = end
        return grad_x, grad_w, None, None, None


class _ProjectedBatchedMM(torch.autograd.Function):
    """bmm(W[ids], x [S, in, 1]); backward: W[ids]ᵀ·δ for x, and δ_eᵀ(X̃_e·P̄_e) for W[e]."""

    @staticmethod
    def forward(ctx, x, selected, param, ids, x_pbar):
        ctx.save_for_backward(selected, param, ids, x_pbar)
        return torch.bmm(selected, x)

    @staticmethod
    def backward(ctx, grad_out):
        selected, param, ids, x_pbar = ctx.saved_tensors
        grad_x = torch.bmm(selected.transpose(1, 2), grad_out) if ctx.needs_input_grad[0] else None
        delta = grad_out.squeeze(-1).to(PROJECTOR_DTYPE)
        grad_w = torch.zeros_like(param)
        for e in ids.unique().tolist():
            rows = ids == e
            grad_w[e] = (delta[rows].T @ x_pbar[rows]).to(param.dtype)
        return grad_x, None, grad_w, None, None


class _TokenSideMode(TorchFunctionMode):
    """Active during one token-side experts forward; `streams` maps each token-side parameter to its stream."""

    def __init__(self, streams: Dict[nn.Parameter, int], view: ProjectorView, timer: list):
        super().__init__()
        self.streams, self.view, self.timer = dict(streams), view, timer
        self.grouped = _grouped_mm_functions()
        self.met = set()
        self._selected = {}  # id(W[ids]) -> (W[ids], W, ids), for the bmm that follows
        self._products = {}  # (stream, id(x), part) -> (x, part, X̃·P̄): each input's product once per stream

    def _owner(self, weight):
        base = getattr(weight, "_base", None) if isinstance(weight, torch.Tensor) else None
        return base if base is not None and any(base is p for p in self.streams) else None

    def _shared(self, param, x: torch.Tensor, part, compute) -> torch.Tensor:
        key = (self.streams[param], id(x), part if isinstance(part, int) else id(part))
        if key not in self._products:  # the entry holds x and part, so their ids stay theirs
            start = time.perf_counter()
            with torch.no_grad():
                self._products[key] = (x, part, compute())
            self.timer[0] += time.perf_counter() - start
        return self._products[key][2]

    def _rows(self, param, expert: int, rows: torch.Tensor) -> torch.Tensor:
        return self.view.token_product(self.streams[param], expert, rows.detach())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.grouped and len(args) >= 2:
            param, offs = self._owner(args[1]), args[2] if len(args) > 2 else kwargs.get("offs")
            plain = all(kwargs.get(k) is None for k in set(kwargs) - {"offs"})  # no bias, no out_dtype
            if param is not None and offs is not None and plain and args[1].shape == param.transpose(-2, -1).shape:
                self.met.add(param)
                x_pbar = self._shared(param, args[0], offs, lambda: self._segments(param, args[0], offs))
                return _ProjectedGroupedMM.apply(args[0], args[1], offs, x_pbar, func)
        elif func is F.linear or func is torch.matmul:
            weight = args[1] if len(args) > 1 else kwargs.get("weight", kwargs.get("other"))
            param = self._owner(weight)
            if func is torch.matmul and param is not None:  # x @ W[e].T: F.linear's weight is W[e]
                weight = weight.transpose(-2, -1) if weight.dim() == 2 and len(args) == 2 and not kwargs else None
            if param is not None and weight is not None and tuple(weight.shape) == tuple(param.shape[1:]) and \
                    weight.stride() == param.stride()[1:]:  # W[e] itself, not a transposed square slice
                expert = int((weight.data_ptr() - param.data_ptr()) // (param.stride(0) * param.element_size()))
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                self.met.add(param)
                x = args[0]
                x_pbar = self._shared(param, x, expert, lambda: self._rows(param, expert, x.reshape(-1, x.shape[-1])))
                return ProjectedLinear.apply(x, weight, bias, x_pbar)
        elif func is torch.cat and args and self._one_stream(args[0]) and \
                (args[1] if len(args) > 1 else kwargs.get("dim", 0)) in (1, -2):
            joined = func(*args, **kwargs)  # AutoEP's fused gate/up: [w1 | w3] as one parameter of their stream
            self.streams[joined] = self.streams[args[0][0]]
            self.met.update(args[0])
            return joined
        elif func is torch.Tensor.__getitem__ and any(args[0] is p for p in self.streams):
            index = args[1]
            if isinstance(index, torch.Tensor) and index.dim() == 1 and not index.is_floating_point():
                selected = func(args[0].detach(), index)  # the gradient comes through the bmm below
                self._selected[id(selected)] = (selected, args[0], index)
                return selected
        elif func is torch.bmm and id(args[0]) in self._selected and self._selected[id(args[0])][0] is args[0]:
            selected, param, ids = self._selected.pop(id(args[0]))
            self.met.add(param)
            x = args[1].squeeze(-1)
            x_pbar = self._shared(param, x, ids, lambda: self._by_expert(param, x, ids))
            return _ProjectedBatchedMM.apply(args[1], selected, param, ids, x_pbar)
        return func(*args, **kwargs)

    def _one_stream(self, tensors) -> bool:
        """Parameters of one stream, whole, concatenated along their out axis (the first after the experts')."""
        return isinstance(tensors, (list, tuple)) and len(tensors) > 1 and all(
            any(t is p for p in self.streams) for t in tensors) and len({self.streams[t] for t in tensors}) == 1

    def _segments(self, param, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.view_n(param), dtype=PROJECTOR_DTYPE, device=x.device)
        start = 0
        for e, end in enumerate(offs.tolist()):
            if end > start:
                out[start:end] = self._rows(param, e, x[start:end])
            start = end
        return out

    def _by_expert(self, param, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], self.view_n(param), dtype=PROJECTOR_DTYPE, device=x.device)
        for e in ids.unique().tolist():
            rows = ids == e
            out[rows] = self._rows(param, e, x[rows])
        return out

    def view_n(self, param) -> int:
        return param.shape[-1]  # fused experts have no bias: n = d_in


class FusedTokenSide:
    """Wraps an experts module's forward on the instance: in an O step, decides each stream's side and runs the
    forward under _TokenSideMode when any stream projects on the token side.

    params: {stream: {name: fused parameter reading it}}; out_features: {stream: one expert's out features
    reading it}; routed_rows(*args, **kwargs): the rows the forward's local experts receive."""

    def __init__(self, module: nn.Module, params: Dict[int, Dict[str, nn.Parameter]], out_features: Dict[int, int],
                 routed_rows: Callable[..., int], view: ProjectorView, is_active, timer: list):
        self.module = module
        forward = module.forward

        def token_side_forward(*args, **kwargs):
            if not (is_active() and torch.is_grad_enabled()):
                return forward(*args, **kwargs)
            rows = routed_rows(*args, **kwargs)
            token = {p: s for s, named in params.items() for p in named.values()
                     if p.requires_grad and view.choose(s, rows, out_features[s]) == "token"}
            if not token:
                return forward(*args, **kwargs)
            mode = _TokenSideMode(token, view, timer)
            with mode:
                out = forward(*args, **kwargs)
            missed = [name for named in params.values() for name, p in named.items()
                      if p in token and p not in mode.met]
            if missed and rows:
                raise RuntimeError(f"OMoE token-side projection: the experts forward ({type(module).__name__}) never "
                                   f"multiplied by {missed} in a way OMoE recognises; set omoe.projection_side to "
                                   "\"gradient\" for this model")
            return out

        self._restore = wrap_instance_method(module, "forward", token_side_forward)

    def remove_hooks(self) -> None:
        self._restore()
