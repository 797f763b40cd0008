"""Upcycle a dense pretrained llama-family decoder into a Mixtral MoE model (paper A §IV for decoders).

Every chosen layer's SwiGLU MLP becomes M experts copied from it (gate and up into the fused
`gate_up_proj`, down into `down_proj`); attention, norms, embeddings and the head are copied as they are.
Mixtral, not Qwen2-MoE, because its layers have no attention biases and no shared expert, so nothing has
to be zeroed to keep the function, and DeepSpeed AutoEP's `mixtral` preset drives it. Mixtral's router
renormalises the top-k weights to sum to 1, so with identical experts any top-k computes the dense MLP:
at init the MoE model's logits equal the dense model's (to fp32 rounding). The router starts random and
small (seeded, the same on every rank), so tokens spread over the experts from the first step.

Layers not chosen keep the dense MLP module itself inside the Mixtral layer: AutoEP matches the
`model.layers.N.mlp` modules whose class is Mixtral's, so it skips them, and OMoE never sees them. Mixtral's own
config cannot say that, so such a model is exported as Qwen2-MoE (`qwen2_moe_config`), whose `mlp_only_layers`
hold dense MLPs and which computes the same function.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from ..core.config import OMoEConfigError

UPCYCLABLE_MODEL_TYPES = ("llama", "mistral")
COPIED_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
                      "rms_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
                      "rope_parameters", "attention_dropout", "num_labels", "id2label", "label2id", "problem_type")
_EXPERT_KEY = re.compile(r"(.*\.layers\.(\d+)\.mlp\.)(experts\.gate_up_proj|experts\.down_proj|gate\.weight)")


@dataclass(frozen=True)
class UpcycleConfig:
    num_experts: int = 4
    top_k: int = 1
    layers: Optional[Tuple[int, ...]] = None  # decoder layer indices that become MoE; None = all
    router_std: float = 0.02  # the router's init: small, so the first routing is near-uniform but not tied
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.num_experts, int) or self.num_experts < 2:
            raise OMoEConfigError(f"num_experts={self.num_experts!r}: upcycling makes M >= 2 experts per layer")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise OMoEConfigError(f"top_k={self.top_k!r}: choose 1 <= top_k <= num_experts={self.num_experts}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
            if not self.layers or len(set(self.layers)) != len(self.layers) or \
                    any(not isinstance(i, int) or i < 0 for i in self.layers):
                raise OMoEConfigError(f"layers={self.layers!r}: give distinct non-negative decoder layer indices, "
                                      "or None for every layer")
        if not self.router_std > 0:
            raise OMoEConfigError(f"router_std={self.router_std!r} must be > 0: a zero router ties every expert")


def check_upcyclable(config, upcycle: UpcycleConfig) -> None:
    """Refuse, before any weight is copied, a model whose function the Mixtral copy would not keep."""
    model_type = getattr(config, "model_type", None)
    if model_type not in UPCYCLABLE_MODEL_TYPES:
        raise OMoEConfigError(f"model_type {model_type!r} cannot be upcycled to Mixtral: the upcycler takes the "
                              f"llama-family decoders {UPCYCLABLE_MODEL_TYPES} (SmolLM2, Llama, Mistral)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise OMoEConfigError(f"{model_type} with {flag}=True: Mixtral's attention and experts have no biases, so "
                                  "the upcycled model would not compute the dense one")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise OMoEConfigError(f"{model_type} with sliding_window={config.sliding_window}: not carried over; "
                              "upcycle a model with full attention")
    layers = config.num_hidden_layers
    bad = [i for i in upcycle.layers or () if i >= layers]
    if bad:
        raise OMoEConfigError(f"layers={upcycle.layers}: the model has {layers} decoder layers (0..{layers - 1})")


def mixtral_config(dense_config, upcycle: UpcycleConfig):
    from transformers import MixtralConfig
    values = dense_config.to_dict()
    kept = {k: values[k] for k in COPIED_CONFIG_KEYS if values.get(k) is not None}
    config = MixtralConfig(**kept, num_local_experts=upcycle.num_experts, num_experts_per_tok=upcycle.top_k,
                           sliding_window=None, router_jitter_noise=0.0, output_router_logits=False)
    config.omoe_upcycle = {**dataclasses.asdict(upcycle), "from_model_type": dense_config.model_type,
                           "layers": list(moe_layers(dense_config, upcycle))}
    return config


def moe_layers(config, upcycle: UpcycleConfig) -> Tuple[int, ...]:
    return tuple(sorted(upcycle.layers)) if upcycle.layers is not None else tuple(range(config.num_hidden_layers))


@torch.no_grad()
def upcycle_to_mixtral(model: nn.Module, upcycle: UpcycleConfig) -> nn.Module:
    """The Mixtral counterpart of `model` (same head: LlamaForCausalLM -> MixtralForCausalLM, ...)."""
    import transformers
    check_upcyclable(model.config, upcycle)
    head = type(model).__name__
    prefix = next((p for p in ("Llama", "Mistral") if head.startswith(p)), None)
    target = getattr(transformers, "Mixtral" + head[len(prefix):], None) if prefix else None
    if target is None:
        raise OMoEConfigError(f"{head}: no Mixtral class with this head; upcycle a {{Llama,Mistral}}ForCausalLM, "
                              "ForSequenceClassification, ForTokenClassification or ForQuestionAnswering")
    config = mixtral_config(model.config, upcycle)
    moe = target(config).to(next(model.parameters()).dtype)
    chosen = set(config.omoe_upcycle["layers"])
    for i, layer in enumerate(moe.model.layers):
        if i not in chosen:
            layer.mlp = model.model.layers[i].mlp  # stays dense: the pretrained module itself
    dense = model.state_dict()
    generator = torch.Generator().manual_seed(upcycle.seed)
    for name, tensor in moe.state_dict().items():
        match = _EXPERT_KEY.fullmatch(name)
        if match is None:
            tensor.copy_(dense[name])
            continue
        mlp, kind = match[1], match[3]
        if kind == "gate.weight":
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * upcycle.router_std)
        elif kind == "experts.gate_up_proj":
            tensor.copy_(torch.cat([dense[mlp + "gate_proj.weight"], dense[mlp + "up_proj.weight"]]).expand_as(tensor))
        else:
            tensor.copy_(dense[mlp + "down_proj.weight"].expand_as(tensor))
    moe.train(model.training)
    return moe


def partially_upcycled(config) -> bool:
    """Whether `config` (a Mixtral written by upcycle_to_mixtral) keeps dense MLPs in some decoder layers."""
    layers = (getattr(config, "omoe_upcycle", None) or {}).get("layers")
    return layers is not None and sorted(layers) != list(range(config.num_hidden_layers))


# The Qwen2-MoE shared expert the export adds: one hidden unit, all weights zero, so it adds exactly 0 (its gate
# sigmoid(0) = 1/2 times 0). Its gradients are exactly 0 as well (every one has a zero factor), so further training
# keeps it 0; one unit rather than none because ZeRO-3 and AutoEP partition parameters and zero-size ones are untested.
SHARED_EXPERT_WIDTH = 1
_SHARED_EXPERT_KEY = re.compile(r".*\.mlp\.shared_expert(\.\w+_proj|_gate)\.weight")


def is_shared_expert_key(name: str) -> bool:
    return _SHARED_EXPERT_KEY.fullmatch(name) is not None


def qwen2_moe_config(mixtral):
    """The Qwen2-MoE config of a partially upcycled Mixtral (same head), computing the same function:
    `mlp_only_layers` keep dense SwiGLU MLPs of the dense width, the other layers route to the same experts.
    Qwen2-MoE takes the softmax over all experts, then the top k, renormalised (`norm_topk_prob`) — what
    transformers' Mixtral router computes; its q/k/v biases are off (`qkv_bias=False`), sliding windows off, and its
    shared expert adds exactly 0 (SHARED_EXPERT_WIDTH). Norm eps, RoPE, heads, tied embeddings and labels are
    copied as upcycling copied them from the dense model."""
    from transformers import Qwen2MoeConfig
    for field, neutral in (("sliding_window", None), ("router_jitter_noise", 0.0)):
        if getattr(mixtral, field, neutral) not in (neutral, 0):
            raise OMoEConfigError(f"{mixtral.model_type} {field}={getattr(mixtral, field)}: the Qwen2-MoE form of a "
                                  f"partially upcycled model has no {field}; upcycle_to_mixtral sets {neutral}")
    values = mixtral.to_dict()
    kept = {k: values[k] for k in COPIED_CONFIG_KEYS if values.get(k) is not None}
    moe = set(mixtral.omoe_upcycle["layers"])
    config = Qwen2MoeConfig(**kept, moe_intermediate_size=mixtral.intermediate_size,
                            num_experts=mixtral.num_local_experts, num_experts_per_tok=mixtral.num_experts_per_tok,
                            norm_topk_prob=True, qkv_bias=False, use_sliding_window=False, decoder_sparse_step=1,
                            mlp_only_layers=[i for i in range(mixtral.num_hidden_layers) if i not in moe],
                            shared_expert_intermediate_size=SHARED_EXPERT_WIDTH,
                            router_aux_loss_coef=mixtral.router_aux_loss_coef, output_router_logits=False)
    config.architectures = [name.replace("Mixtral", "Qwen2Moe", 1) for name in mixtral.architectures or []]
    for extra in ("omoe_upcycle", "omoe_job"):
        if getattr(mixtral, extra, None) is not None:
            setattr(config, extra, getattr(mixtral, extra))
    return config
