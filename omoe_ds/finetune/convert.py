"""Turn the FFNs of a pretrained Hugging Face encoder into stock DeepSpeed MoE layers.

Every expert starts as a copy of the pretrained FFN (Linear d→d_ff, activation, Linear d_ff→d), and
the converted model computes the dense model's function at initialisation. Residual, dropout and
LayerNorm keep their places: the MoE block stands where the FFN's first Linear was, and the
activation and second Linear, which now live inside every expert, become identities.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate, _capacity, einsum as _ds_einsum, gumbel_rsample
from deepspeed.utils import groups
from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size

from ..core import collectives
from ..core.config import OMoEConfigError

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "albert", "distilbert", "mpnet")


@dataclass(frozen=True)
class MoEConversionConfig:
    num_experts: int = 4
    k: int = 1                      # 1 = the paper's token gate; 2 also allowed
    ep_size: int = 1
    layers: Optional[Tuple[int, ...]] = None   # encoder layer indices to convert; None = all (paper default)
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 0
    drop_tokens: bool = False
    use_rts: bool = False

    def __post_init__(self):
        if not _is_int(self.num_experts) or self.num_experts < 2:
            raise OMoEConfigError(f"num_experts={self.num_experts!r}: OMoE projects each expert's gradient by the "
                                  "other experts' projectors, which needs at least 2 experts; use num_experts >= 2")
        if not _is_int(self.ep_size) or self.ep_size < 1 or self.num_experts % self.ep_size:
            raise OMoEConfigError(f"ep_size={self.ep_size!r} does not divide num_experts={self.num_experts}; "
                                  "choose an expert-parallel size >= 1 that divides the expert count")
        if not _is_int(self.k) or self.k not in (1, 2):
            raise OMoEConfigError(f"k={self.k!r}: the converter supports DeepSpeed's top-1 and top-2 gates; "
                                  "use k=1 (the paper's gate) or k=2")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))  # a list read back from a saved config
            bad = [i for i in self.layers if not _is_int(i) or i < 0]
            if not self.layers or bad or len(set(self.layers)) != len(self.layers):
                raise OMoEConfigError(f"layers={self.layers!r}: give distinct non-negative encoder layer indices, "
                                      "or layers=None to convert every layer")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0:
                raise OMoEConfigError(f"{name}={value!r}: the expert capacity factor must be a number > 0 "
                                      "(1.0 gives each expert an equal share of the tokens)")
        if not _is_int(self.min_capacity) or self.min_capacity < 0:
            raise OMoEConfigError(f"min_capacity={self.min_capacity!r}: use an integer >= 0")
        for name in ("drop_tokens", "use_rts"):
            if not isinstance(getattr(self, name), bool):
                raise OMoEConfigError(f"{name}={getattr(self, name)!r}: use True or False")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class _FFNSite:
    """Where one encoder layer keeps its FFN, as dotted submodule paths."""
    linear_in: str   # Linear d→d_ff: replaced by the MoE block
    activation: str  # moves into the experts: replaced by an identity
    linear_out: str  # Linear d_ff→d: moves into the experts, replaced by an identity


_BERT_LIKE = _FFNSite("intermediate.dense", "intermediate.intermediate_act_fn", "output.dense")
_FFN_SITES: Dict[str, _FFNSite] = {
    "bert": _BERT_LIKE, "roberta": _BERT_LIKE, "mpnet": _BERT_LIKE,
    "albert": _FFNSite("ffn", "activation", "ffn_output"),
    "distilbert": _FFNSite("ffn.lin1", "ffn.activation", "ffn.lin2"),
}
_ENCODER_LAYERS: Dict[str, Callable[[nn.Module], List[nn.Module]]] = {
    "bert": lambda base: list(base.encoder.layer),
    "roberta": lambda base: list(base.encoder.layer),
    "mpnet": lambda base: list(base.encoder.layer),
    "distilbert": lambda base: list(base.transformer.layer),
    # ALBERT reuses its layers across depth: an index names a distinct (shared) AlbertLayer, whose one MoE
    # block then runs at every repetition, so the parameters stay shared.
    "albert": lambda base: [layer for group in base.encoder.albert_layer_groups for layer in group.albert_layers],
}


class _ForwardState:
    """What one forward of the converted encoder shares with its MoE blocks: the token mask and the aux losses."""

    def __init__(self, mask_position: Optional[int]):
        self.mask_position = mask_position  # attention_mask's place among the encoder forward's positional args
        self.attention_mask: Optional[torch.Tensor] = None
        self.aux_losses: List[torch.Tensor] = []

    def capture(self, module, args, kwargs) -> None:
        """Forward pre-hook on the model that owns the encoder."""
        mask = kwargs.get("attention_mask")
        if mask is None and self.mask_position is not None and len(args) > self.mask_position:
            mask = args[self.mask_position]
        # Kept after the forward, so a gradient-checkpointing recompute routes the same tokens.
        self.attention_mask = mask
        self.aux_losses = []

    def used_token(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        if self.attention_mask is None:
            return None  # no mask given: every token is routed
        used = self.attention_mask.reshape(-1)
        if used.numel() != hidden_states.shape[:-1].numel():
            raise ValueError(f"the attention mask of shape {tuple(self.attention_mask.shape)} does not give one value "
                             f"per token of the MoE input {tuple(hidden_states.shape)}; pass a [batch, seq] 0/1 mask")
        # top1gating multiplies its int64 one-hot routes by used_token, so the mask must be int64 too.
        return used.to(device=hidden_states.device, dtype=torch.long)


class MoEFeedForward(nn.Module):
    """A converted FFN: the stock DeepSpeed MoE, called with the padding mask of the current forward."""

    def __init__(self, moe: MoE, forward_state: _ForwardState):
        super().__init__()
        self.moe = moe
        self.forward_state = forward_state

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Padding is never routed, for k=1 (DeepSpeed's top-1 gate) and k=2 (PaddingMaskedTopKGate): it takes
        # no capacity slot and enters no recorded window; its MoE output is 0 (attention never reads it and
        # losses skip it).
        output, l_aux, _exp_counts = self.moe(hidden_states, self.forward_state.used_token(hidden_states))
        self.forward_state.aux_losses.append(l_aux)
        return output


class PaddingMaskedTopKGate(TopKGate):
    """DeepSpeed's TopKGate, except that with k=2 tokens masked out by used_token get no route.

    DeepSpeed's top-2 gate ignores used_token. Here its sparse top-2 routing (top2gating, deepspeed
    0.19.8) runs unchanged but for one step: both routes of a padding token are masked *before* the slot
    cumsum, so real tokens take slots contiguous from slot 0 and padding never pushes a real token back
    or out. For real tokens the experts, combine weights and random draws are DeepSpeed's; the capacity
    under drop_tokens stays derived from the padded token count (the same on every rank, no collective).
    l_aux counts routed tokens only, as DeepSpeed's top-1 gate does with used_token. Without a mask, or
    with k=1, this is the stock gate. Same parameters and state dict as TopKGate.
    """

    def forward(self, input: torch.Tensor, used_token: Optional[torch.Tensor] = None, sparse_routes: bool = False,
                use_tutel: bool = False):
        if self.k != 2 or used_token is None:
            return super().forward(input, used_token, sparse_routes, use_tutel)
        if not sparse_routes or use_tutel:
            raise OMoEConfigError("the padding-masked top-2 gate implements DeepSpeed's sparse dispatch only "
                                  f"(sparse_routes={sparse_routes}, use_tutel={use_tutel}); build the MoE with "
                                  "use_tutel=False")
        input_fp32 = input.float()
        if self.noisy_gate_policy == "Jitter" and self.training:
            from deepspeed.moe.sharded_moe import multiplicative_jitter
            input_fp32 = multiplicative_jitter(input_fp32, device=input.device)
        logits = F.linear(input_fp32, weight=self.wg.weight.float(), bias=None)
        return _masked_top2gating(logits, used_token, self.capacity_factor if self.training else self.eval_capacity_factor,
                                  self.min_capacity, self.drop_tokens, self.ep_group, self.top2_2nd_expert_sampling)


def mask_padding_in_gate(moe: MoE) -> None:
    """In place: the MoE's stock TopKGate becomes a PaddingMaskedTopKGate (same attributes, parameters and
    state dict), so that tokens masked by used_token get no route with k=2 too."""
    gate = moe.deepspeed_moe.gate
    if type(gate) is not TopKGate and not isinstance(gate, PaddingMaskedTopKGate):
        raise OMoEConfigError(f"the MoE gate is a {type(gate).__name__}, not DeepSpeed's TopKGate; padding can only "
                              "be masked in the stock gate")
    gate.__class__ = PaddingMaskedTopKGate


def _masked_top2gating(logits: torch.Tensor, used_token: torch.Tensor, capacity_factor: float, min_capacity: int,
                       drop_tokens: bool, ep_group, second_expert_sampling: bool):
    """deepspeed.moe.sharded_moe.top2gating(sparse_routes=True), line for line, with padding masked before the
    slot cumsum (marked below). tests/test_capture.py checks it equals DeepSpeed's with an all-ones mask."""
    gates = F.softmax(logits, dim=1)
    indices1_s = torch.argmax(gates, dim=1)
    num_experts = int(gates.shape[1])
    mask1 = F.one_hot(indices1_s, num_classes=num_experts)
    if second_expert_sampling:
        logits += gumbel_rsample(logits.shape, device=logits.device)  # every token draws, as in DeepSpeed
    logits_except1 = logits.masked_fill(mask1.bool(), float("-inf"))
    indices2_s = torch.argmax(logits_except1, dim=1)
    mask2 = F.one_hot(indices2_s, num_classes=num_experts)
    # The one change: padding routes nowhere, so it counts in no location, capacity or exp_counts.
    used = used_token.reshape(-1, 1).to(mask1.dtype)
    mask1, mask2 = mask1 * used, mask2 * used
    locations1 = torch.cumsum(mask1, dim=0) - 1
    locations2 = torch.cumsum(mask2, dim=0) - 1
    locations2 += torch.sum(mask1, dim=0, keepdim=True)
    me = torch.mean(gates, dim=0)
    ce = torch.mean(mask1.float(), dim=0)
    l_aux = torch.mean(me * ce) * num_experts * num_experts
    exp_counts = torch.sum(mask1 + mask2, dim=0).detach().to(logits.device)
    if drop_tokens:
        # gates has one row per token, padding included: the capacity is the padded B·L's, equal on every rank.
        capacity = _capacity(gates, torch.tensor(capacity_factor * 2), torch.tensor(min_capacity))
        mask1 *= torch.lt(locations1, capacity)
        mask2 *= torch.lt(locations2, capacity)
    else:
        new_capacity = torch.max(exp_counts)
        collectives.max_over_group_(new_capacity, ep_group)  # DeepSpeed's own capacity all-reduce
        if groups._get_expert_model_parallel_world_size() == 1:
            tp = 1 if groups.mpu is None else bwc_tensor_model_parallel_world_size(mpu=groups.mpu)
            new_capacity = torch.ceil(new_capacity / tp).mul(tp).to(new_capacity.dtype)
        capacity = new_capacity
    locations1_s = torch.sum(locations1 * mask1, dim=1)
    locations2_s = torch.sum(locations2 * mask2, dim=1)
    mask1_float, mask2_float = mask1.float(), mask2.float()
    gates1_s = _ds_einsum("se,se->s", gates, mask1_float)
    gates2_s = _ds_einsum("se,se->s", gates, mask2_float)
    denom_s = torch.clamp(gates1_s + gates2_s, min=torch.finfo(gates1_s.dtype).eps)
    gates1_s /= denom_s
    gates2_s /= denom_s
    indices1_s = torch.where(mask1.any(dim=1), indices1_s, torch.full_like(indices1_s, -1))
    indices2_s = torch.where(mask2.any(dim=1), indices2_s, torch.full_like(indices2_s, -1))
    return (l_aux, capacity, num_experts, torch.stack([indices1_s, indices2_s]).to(torch.int32),
            torch.stack([locations1_s, locations2_s]).to(torch.int32), torch.stack([gates1_s, gates2_s]), exp_counts)


def _unit_top1_combine_weights(gate, inputs, output):
    """Forward hook on a k=1 TopKGate: each route's combine weight g becomes g / sg(g) (0 where not routed)."""
    l_aux, capacity, num_experts, indices, locations, gates, exp_counts = output
    # Top-1 scales the expert by its probability (≈1/M at init); g/sg(g) is exactly 1 yet gives the router d/dg = 1/g.
    unit_gates = gates / torch.where(gates > 0, gates.detach(), torch.ones_like(gates))
    return l_aux, capacity, num_experts, indices, locations, unit_gates, exp_counts


def convert_to_moe(model: "transformers.PreTrainedModel",
                   config: MoEConversionConfig) -> "transformers.PreTrainedModel":
    """In place: every chosen encoder layer's FFN becomes a stock deepspeed.moe.layer.MoE whose
    config.num_experts experts are copies of the pretrained FFN. Records the layout in
    model.config.omoe_moe (the conversion config, with `layers` the converted indices). Returns the model."""
    model_type = _checked_model_type(model)
    base = model.base_model
    layers = _ENCODER_LAYERS[model_type](base)
    indices = _chosen_layers(config, len(layers), model_type)
    forward_state = _ForwardState(_positional_index(base.forward, "attention_mask"))
    base.register_forward_pre_hook(forward_state.capture, with_kwargs=True)
    for i in indices:
        _convert_layer(layers[i], _FFN_SITES[model_type], config, forward_state, where=f"{model_type} layer {i}")
    model.config.omoe_moe = {**dataclasses.asdict(config), "layers": list(indices)}
    return model


def _checked_model_type(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise OMoEConfigError(f"model_type={model_type!r} ({type(model).__name__}) cannot be converted to MoE; "
                              f"supported model types are {SUPPORTED_MODEL_TYPES}")
    if any(isinstance(m, (MoE, MoEFeedForward)) for m in model.modules()):
        raise OMoEConfigError(f"{type(model).__name__} already has MoE layers; convert the dense model once")
    chunk = getattr(model.config, "chunk_size_feed_forward", 0)
    if chunk:
        raise OMoEConfigError(f"chunk_size_feed_forward={chunk}: a chunked FFN sees slices of the sequence that the "
                              "attention mask no longer lines up with; load the model with chunk_size_feed_forward=0")
    return model_type


def _chosen_layers(config: MoEConversionConfig, num_layers: int, model_type: str) -> Tuple[int, ...]:
    if config.layers is None:
        return tuple(range(num_layers))
    out_of_range = [i for i in config.layers if i >= num_layers]
    if out_of_range:
        shared = " distinct shared" if model_type == "albert" else ""
        raise OMoEConfigError(f"layers={config.layers}: index {out_of_range[0]} is out of range, the {model_type} "
                              f"encoder has {num_layers}{shared} layers; use indices 0..{num_layers - 1}")
    return tuple(sorted(config.layers))


def _positional_index(forward, name: str) -> Optional[int]:
    positional = [p.name for p in inspect.signature(forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional.index(name) if name in positional else None


def _convert_layer(layer: nn.Module, site: _FFNSite, config: MoEConversionConfig, forward_state: _ForwardState,
                   where: str) -> None:
    linear_in, linear_out = layer.get_submodule(site.linear_in), layer.get_submodule(site.linear_out)
    activation = _submodule_or_attribute(layer, site.activation)
    if not isinstance(activation, nn.Module):
        raise OMoEConfigError(f"{where}: the FFN activation {activation!r} is not an nn.Module, so it cannot be "
                              "copied into the experts; build the model with a string hidden_act (e.g. \"gelu\")")
    expert = nn.Sequential(linear_in, activation, linear_out)  # MoE deep-copies it into every expert
    moe = MoE(hidden_size=linear_in.in_features, expert=expert, num_experts=config.num_experts,
              ep_size=config.ep_size, k=config.k, capacity_factor=config.capacity_factor,
              eval_capacity_factor=config.eval_capacity_factor, min_capacity=config.min_capacity,
              drop_tokens=config.drop_tokens, use_rts=config.use_rts, noisy_gate_policy=None)
    moe.to(linear_in.weight.device)  # the new gate starts on the CPU
    mask_padding_in_gate(moe)
    if config.k == 1:
        moe.deepspeed_moe.gate.register_forward_hook(_unit_top1_combine_weights)
    _replace(layer, site.linear_in, MoEFeedForward(moe, forward_state))
    _replace(layer, site.activation, nn.Identity())
    _replace(layer, site.linear_out, nn.Identity())


def _submodule_or_attribute(layer: nn.Module, path: str):
    parent, _, name = path.rpartition(".")
    return getattr(layer.get_submodule(parent), name)


def _replace(layer: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(layer.get_submodule(parent), name, module)


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the converted MoE layers' load-balancing losses (l_aux) from the last forward, a 0-dim
    tensor; an ALBERT layer counts once per repetition. 0 for a model without converted layers."""
    states = {id(m.forward_state): m.forward_state for m in model.modules() if isinstance(m, MoEFeedForward)}
    losses = [loss for state in states.values() for loss in state.aux_losses]
    if not losses:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    return torch.stack(losses).sum()


def bind_expert_groups(model: nn.Module) -> None:
    """Give every MoE layer its expert-parallel process group, as DeepSpeed's engine does at init: for
    single-process eval or export without an engine. Needs torch.distributed initialised
    (deepspeed.init_distributed). Layers already bound are left alone; the engine, however, binds every
    layer itself and fails on a bound one, so never call this before deepspeed.initialize."""
    for module in model.modules():
        if isinstance(module, MoE) and module.deepspeed_moe.ep_group is None:
            module.set_deepspeed_parallelism()
