"""Adapter for DeepSpeed's native `deepspeed.moe.layer.MoE`, with FFN or SwiGLU experts.

FFN experts hold two nn.Linear in forward order: w1 (d→d_ff, reads x) and w2 (d_ff→d, reads h).
SwiGLU experts hold three nn.Linear named gate, up, down (or gate_proj, up_proj, down_proj):
h = act(gate·x) ⊙ (up·x) enters down. DeepSpeed shards the experts over an EP group; this rank's
local expert l is global expert ep_rank·E_local + l.

Recording, with no collective, where the experts run: DeepSpeed dispatches exact copies of the routed
tokens into each source rank's block of C capacity slots, filled from slot 0 and padded with exact zero
rows (`_sparse_encode`), so a slot is filled iff the experts' input row is nonzero (dropped and masked
routes are never dispatched, so padding is never counted). A pre-hook on the experts module takes every
local expert's mask and Σx at once (the zero rows add nothing); each down Linear's pre-hook sums its filled
rows of h, and after the layer the sums and counts go to the local experts' global rows; other experts'
rows stay 0 on this rank.
Caveat (measure zero): a real token whose input (or hidden state) is exactly the zero vector is taken for
an empty slot; it would have added nothing to the sum, only to the count.

In O steps each expert Linear runs on its filled slots only (core/projection_hooks.py ProjectedLinear), on
either projection side: forward, δW and the weight gradient skip the padding, which DeepSpeed's
drop_tokens=False makes ~3/4 of the expert rows at 64 experts. R steps run DeepSpeed's own forward.
"""
from __future__ import annotations

from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from deepspeed.moe.layer import MoE

from ..core import collectives
from ..core.config import OMoEConfigError
from ..core.projector import augmented_rows
from ..core.projection_hooks import ExpertGradProjector, LinearTokenSide, TokenProduct
from .base import H, X, ExpertLayer, ProjectorView, RecordContext, Stream, nonzero_rows

FFN_NAMES = ("w1", "w2")
SWIGLU_NAMES = ("gate", "up", "down")
_SWIGLU_ATTRS = (("gate", "up", "down"), ("gate_proj", "up_proj", "down_proj"))


class SwiGLUExpert(nn.Module):
    """down(act(gate·x) ⊙ up·x), the expert of Mixtral, Qwen, DeepSeek and OLMoE, as three nn.Linear."""

    def __init__(self, d_model: int, d_ff: int, activation=nn.SiLU, bias: bool = False):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=bias)
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.act = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


class DeepSpeedMoELayer(ExpertLayer):
    """A native MoE layer; `linears[l]` are local expert l's nn.Linear in matrix_names order."""
    deepspeed_expert_files = True

    def __init__(self, index: int, name: str, module: MoE, linears: List[List[nn.Linear]], swiglu: bool):
        self.layout = "deepspeed-swiglu" if swiglu else "deepspeed-ffn"
        self.matrix_names = SWIGLU_NAMES if swiglu else FFN_NAMES
        self.matrix_streams = (X, X, H) if swiglu else (X, H)
        first, down = linears[0][0], linears[0][-1]
        streams = (Stream(first.in_features, first.bias is not None), Stream(down.in_features, down.bias is not None))
        super().__init__(index, name, module, module.num_experts, module.ep_size, streams)
        self.linears = linears
        self.experts = module.deepspeed_moe.experts.deepspeed_experts

    @property
    def local_experts(self) -> List[List[nn.Linear]]:
        """[local expert][matrix] nn.Linear, in matrix_names order."""
        return self.linears

    @property
    def gate(self):
        return self.module.deepspeed_moe.gate

    def expert_parameters(self) -> List[nn.Parameter]:
        return [p for per_expert in self.linears for linear in per_expert for p in linear.parameters()]

    def watch_routing(self, callback) -> list:
        def after_gate(gate, inputs, output):
            tokens = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            experts = output[3].to(torch.int64).T  # [S, k]: −1 where dropped or masked
            used = inputs[1] if len(inputs) > 1 else None
            if used is not None:
                keep = used.reshape(-1) > 0
                tokens, experts = tokens[keep], experts[keep]
            callback(tokens, experts)
        return [self.gate.register_forward_hook(after_gate)]

    def matrices(self, local: int) -> Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        return {name: (linear.weight, linear.bias) for name, linear in zip(self.matrix_names, self.linears[local])}

    def expert_forward(self, local: int, tokens: torch.Tensor) -> torch.Tensor:
        return self.experts[local](tokens)

    def attach_projection(self, view: ProjectorView, is_active, timer: list) -> list:
        # One expert's out features per stream (gate and up both read x).
        out_features = [sum(linear.out_features for linear, s in zip(self.linears[0], self.matrix_streams) if s == stream)
                        for stream in (X, H)]
        slots = _FilledSlots(self.module.deepspeed_moe.experts, is_active)
        augmented = [partial(augmented_rows, has_bias=stream.has_bias) for stream in self.streams]
        unprojected_timer = [0.0]  # X̃ of the filled rows is a copy, not projection time

        def rows_for(s, products):  # in an O step either side runs on the filled slots: the padding is skipped
            if not is_active():
                return None
            side = view.choose(s, slots.total(), out_features[s])  # the token side pays for filled slots only
            return products["token" if side == "token" else "gradient"][s]

        hooks = [slots]
        for local, per_expert in enumerate(self.linears):
            mask = lambda l=local: slots.of(l)  # noqa: E731
            streams = set(self.matrix_streams)
            products = {"token": {s: TokenProduct(lambda rows, s=s, l=local: view.token_product(s, l, rows), timer,
                                                  mask) for s in streams},
                        # the gradient side: G = δᵀX̃ over the filled slots, projected by ExpertGradProjector's hooks
                        "gradient": {s: TokenProduct(augmented[s], unprojected_timer, mask) for s in streams}}
            for linear, stream in zip(per_expert, self.matrix_streams):
                hooks.append(ExpertGradProjector(
                    linear, lambda G, d, s=stream, l=local: view.weight_product(s, l, G, d),
                    lambda s=stream, l=local: view.bias_column(s, l), lambda s=stream, l=local: view.bias_corner(s, l),
                    lambda s=stream: is_active() and view.side(s) != "token", timer))
                hooks.append(LinearTokenSide(linear, lambda x, s=stream, p=products: rows_for(s, p)))
        return hooks

    def attach_recorder(self, context: RecordContext) -> list:
        return [_NativeRecorder(self, context)]


class _FilledSlots:
    """Which capacity slots of each local expert hold a token, in an O step's forward. DeepSpeed fills each source
    rank's block of C slots from slot 0 and pads it with exact zero rows, so a slot is filled iff its row is
    nonzero; a token whose row is exactly zero is counted as empty, which the token side's empty-row term keeps
    exact (its row is the empty rows' row)."""

    def __init__(self, experts: nn.Module, is_active):
        self._is_active, self._masks = is_active, None
        self._handle = experts.register_forward_pre_hook(self._find)

    def _find(self, experts, inputs) -> None:
        active = self._is_active() and torch.is_grad_enabled()
        self._masks = nonzero_rows(inputs[0].detach()) if active else None  # [ep_size, E_local, C]

    def of(self, local: int) -> Optional[torch.Tensor]:
        """Local expert `local`'s mask over its input rows ([ep_size, 1, C] flattened), or None."""
        return None if self._masks is None else self._masks[:, local].reshape(-1)

    def total(self) -> int:
        return int(self._masks.sum()) if self._masks is not None else 0

    def remove_hooks(self) -> None:
        self._handle.remove()


class _NativeRecorder:
    """R-step recording with a few ops per layer, whatever E_local is: the filled-slot masks and Σx of every local
    expert come from the experts' input at once, each expert's Σh is one matrix-vector product into a staging row,
    and the rows reach the window once, after the layer. The gate is not hooked: tokens are summed where they arrive."""

    def __init__(self, layer: DeepSpeedMoELayer, context: RecordContext):
        self.layer, self.context = layer, context
        self.first_global = collectives.ep_rank(layer.ep_size) * layer.num_local_experts
        self._masks: Optional[torch.Tensor] = None  # [E_local, ep_size·C] float 0/1: filled slots
        self._input_sums: Optional[torch.Tensor] = None  # [E_local, d]
        self._hidden_sums: Dict[int, torch.Tensor] = {}
        self._handles = [layer.module.deepspeed_moe.experts.register_forward_pre_hook(self._before_experts),
                         layer.module.register_forward_hook(self._after_layer)]
        for local, per_expert in enumerate(layer.linears):
            self._handles.append(per_expert[-1].register_forward_pre_hook(self._make_hidden_hook(local)))

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _before_experts(self, experts, inputs) -> None:
        if not self.context.should_capture(experts):
            return
        x = inputs[0].detach()  # [ep_size, E_local, C, d]: per source rank, each local expert's C slots
        self._masks = nonzero_rows(x).transpose(0, 1).reshape(self.layer.num_local_experts, -1).float()
        self._input_sums = x.sum((0, 2), dtype=torch.float32)

    def _make_hidden_hook(self, local: int):
        def record_hidden(linear, inputs):
            if self._masks is None or not self.context.should_capture(linear):
                return
            h = inputs[0].detach()
            self._hidden_sums[local] = self._masks[local] @ h.reshape(self._masks.shape[1], -1).float()
        return record_hidden

    def _after_layer(self, moe, inputs, output) -> None:
        # The masks describe this dispatch only; an expert Linear called outside it records nothing.
        masks, input_sums, sums = self._masks, self._input_sums, self._hidden_sums
        self._masks, self._input_sums, self._hidden_sums = None, None, {}
        if masks is None:
            return
        counts = masks.sum(1)
        window = self.context.window
        window.add_experts(X, self.first_global, input_sums, counts)
        if len(sums) == masks.shape[0]:
            window.add_experts(H, self.first_global, torch.stack([sums[l] for l in range(len(sums))]), counts)
            return
        for local, row_sum in sums.items():  # an expert not called in this dispatch records no h
            window.add_expert(H, self.first_global + local, row_sum, counts[local])


def _expert_linears(expert: nn.Module, where: str) -> Tuple[List[nn.Linear], bool]:
    """(the expert's nn.Linear in matrix order, is SwiGLU), or one clear error."""
    linears = [m for m in expert.modules() if isinstance(m, nn.Linear)]
    linear_params = {id(p) for linear in linears for p in linear.parameters()}
    others = [name for name, p in expert.named_parameters() if id(p) not in linear_params]
    for attrs in _SWIGLU_ATTRS:
        named = [getattr(expert, a, None) for a in attrs]
        if len(linears) == 3 and not others and all(isinstance(m, nn.Linear) for m in named):
            gate, up, down = named
            if not (gate.in_features == up.in_features == down.out_features
                    and gate.out_features == up.out_features == down.in_features):
                raise OMoEConfigError(f"{where}: the SwiGLU expert {type(expert).__name__} has gate {_shape(gate)}, up "
                                      f"{_shape(up)} and down {_shape(down)}; OMoE expects gate, up d→d_ff and down d_ff→d")
            if (gate.bias is None) != (up.bias is None):
                raise OMoEConfigError(f"{where}: gate and up read the same input and share one projector, so they must "
                                      "both have a bias or both have none; build them alike")
            return named, True
    if len(linears) != 2 or others:
        raise OMoEConfigError(
            f"{where}: OMoE needs each expert to hold two nn.Linear (input→hidden, hidden→output) or three named "
            f"gate, up, down (SwiGLU), and no other parameters, but the expert module {type(expert).__name__} has "
            f"{len(linears)} nn.Linear" + (f" and other parameters {others}" if others else "")
            + "; build it with omoe_ds.make_moe_ffn(..., expert=\"ffn\" or \"swiglu\")")
    w1, w2 = linears
    if w1.out_features != w2.in_features or w1.in_features != w2.out_features:
        raise OMoEConfigError(
            f"{where}: the expert {type(expert).__name__} has Linear shapes {_shape(w1)} and {_shape(w2)}; OMoE "
            "expects d→d_ff then d_ff→d in that registration order")
    return [w1, w2], False


def _shape(linear: nn.Linear) -> str:
    return f"{linear.in_features}→{linear.out_features}"


def describe(index: int, name: str, module: nn.Module) -> Optional[DeepSpeedMoELayer]:
    """The layer's description if `module` is a native DeepSpeed MoE layer, else None."""
    if not isinstance(module, MoE):
        return None
    where = f"MoE layer {name or '<root>'}"
    if module.num_experts < 2:
        raise OMoEConfigError(
            f"{where} has num_experts={module.num_experts}: OMoE projects each expert's gradient by the mean "
            "projector of the *other* experts, which needs at least 2 experts; use num_experts >= 2")
    if module.num_experts % module.ep_size:
        raise OMoEConfigError(f"{where}: num_experts={module.num_experts} is not divisible by ep_size="
                              f"{module.ep_size}; pick an ep_size that divides the expert count")
    if getattr(module.deepspeed_moe, "use_tutel", False):
        raise OMoEConfigError(f"{where} uses Tutel dispatch; OMoE reads DeepSpeed's own dispatch, build the "
                              "layer with use_tutel=False")
    experts = module.deepspeed_moe.experts.deepspeed_experts
    found = [_expert_linears(e, f"{where}, local expert {i}") for i, e in enumerate(experts)]
    return DeepSpeedMoELayer(index, name, module, [linears for linears, _ in found], found[0][1])


def make_moe_ffn(d_model: int, d_ff: int, num_experts: int, ep_size: int = 1, k: int = 1, activation=None,
                 capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 drop_tokens: bool = True, use_rts: bool = True, noisy_gate_policy=None, expert: str = "ffn",
                 bias: Optional[bool] = None, top2_2nd_expert_sampling: bool = True) -> MoE:
    """A stock DeepSpeed MoE layer, checked first, whose experts are FFNs (expert="ffn":
    Linear→activation→Linear, GELU and biases by default) or SwiGLU (expert="swiglu": gate, up,
    down, SiLU and no biases by default, as in Mixtral and Qwen).

    drop_tokens=False, use_rts=False, noisy_gate_policy=None (and top2_2nd_expert_sampling=False with
    k=2: DeepSpeed samples the second expert with Gumbel noise by default) make routing deterministic
    and lossless, which is what equality across EP sizes needs.
    """
    if num_experts < 2:
        raise OMoEConfigError(f"num_experts={num_experts}: OMoE needs at least 2 experts per MoE layer")
    if ep_size < 1 or num_experts % ep_size:
        raise OMoEConfigError(f"num_experts={num_experts} is not divisible by ep_size={ep_size}; "
                              "choose an ep_size that divides the expert count")
    if k not in (1, 2):
        raise OMoEConfigError(f"k={k}: DeepSpeed's MoE gate supports top-1 and top-2 routing; use k=1 or k=2")
    if expert == "ffn":
        built = nn.Sequential(nn.Linear(d_model, d_ff, bias=True if bias is None else bias),
                              (activation or nn.GELU)(), nn.Linear(d_ff, d_model, bias=True if bias is None else bias))
    elif expert == "swiglu":
        built = SwiGLUExpert(d_model, d_ff, activation or nn.SiLU, bias=bool(bias))
    else:
        raise OMoEConfigError(f"expert={expert!r}: use \"ffn\" (Linear→activation→Linear) or \"swiglu\" (gate, up, down)")
    return MoE(hidden_size=d_model, expert=built, num_experts=num_experts, ep_size=ep_size, k=k,
               capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity,
               drop_tokens=drop_tokens, use_rts=use_rts, noisy_gate_policy=noisy_gate_policy,
               top2_2nd_expert_sampling=top2_2nd_expert_sampling)
