"""The validated settings of an OMoE-LoRA adapter (paper B, arXiv 2501.10062): kind, rank, experts, routing, targets."""
import re
from dataclasses import asdict, dataclass, fields
from typing import Optional

from omoe_ds.core.config import OMoEConfigError

ADAPTER_KINDS = ("lora", "moe-lora", "omoe-lora")
MIXTURE_KINDS = ("moe-lora", "omoe-lora")
ROUTINGS = ("soft", "topk")
# Paper B's setting (as CoMoE, arXiv 2505.17553, reports it): LLaMA-2's attention and SwiGLU projections.
DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# BERT-style encoders: self-attention query/key/value, attention output dense, FFN in/out dense (not the pooler).
ENCODER_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
# Task heads train in full next to the adapters, as PEFT's modules_to_save does for classification and QA.
HEAD_MODULES = ("classifier", "score", "qa_outputs")


def _as_names(value, field_name):
    """A name or a sequence of names as a tuple of non-empty strings (a lone string is one entry, as in PEFT)."""
    if value is None:
        return None
    names = (value,) if isinstance(value, str) else tuple(value)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise OMoEConfigError(f"{field_name}={value!r}: give one or more non-empty module names or regex patterns")
    return names


@dataclass(frozen=True)
class LoRAMixtureConfig:
    """One adapter for every targeted nn.Linear: plain LoRA (PEFT), a mixture of LoRA experts, or OMoE-LoRA.

    kind: "lora" (PEFT LoRA), "moe-lora" (N LoRA experts mixed by a router), "omoe-lora" (the same with the
        experts' outputs Gram–Schmidt-orthogonalised per token).
    r, alpha: the rank of every expert and the LoRA scale α/r.
    num_experts: N (mixtures only; at least 2).
    dropout: LoRA dropout on the adapters' input, in [0, 1).
    routing: "soft" (every expert weighted by softmax(W_g x)) or "topk" (the top_k largest weights, renormalised).
    top_k: experts kept per token under routing="topk"; 1 ≤ top_k ≤ N is checked for every mixture.
    normalize: omoe-lora only; rescale each orthogonalised output to unit norm (the Stiefel form). Off by
        default: see omoe_ds.lora.orthogonal.gram_schmidt for why.
    eps_relative: ε of the Gram–Schmidt as a share of the frozen output's mean square per token.
    targets: module names (a name matches itself and every module whose dotted name ends in ".name") or regex
        patterns (matched against the full name), like PEFT's target_modules; None picks DECODER_TARGETS or
        ENCODER_TARGETS by what the model has.
    head_modules: modules trained in full (the task head), matched the same way; absent ones are skipped.
    """
    kind: str = "omoe-lora"
    r: int = 16
    alpha: float = 32.0
    num_experts: int = 4
    dropout: float = 0.05
    routing: str = "soft"
    top_k: int = 2
    normalize: bool = False
    eps_relative: float = 1e-6
    targets: Optional[tuple] = None
    head_modules: tuple = HEAD_MODULES

    def __post_init__(self):
        if self.kind not in ADAPTER_KINDS:
            raise OMoEConfigError(f"kind={self.kind!r}: choose one of {', '.join(ADAPTER_KINDS)}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise OMoEConfigError(f"r={self.r!r}: the LoRA rank must be a positive integer (paper B uses 16)")
        if not self.alpha > 0:
            raise OMoEConfigError(f"alpha={self.alpha!r}: the LoRA scale α must be positive (paper B uses 32)")
        if not 0 <= self.dropout < 1:
            raise OMoEConfigError(f"dropout={self.dropout!r}: LoRA dropout must lie in [0, 1) (paper B uses 0.05)")
        if self.routing not in ROUTINGS:
            raise OMoEConfigError(f"routing={self.routing!r}: choose one of {', '.join(ROUTINGS)}")
        if not self.eps_relative > 0:
            raise OMoEConfigError(f"eps_relative={self.eps_relative!r}: must be positive (default 1e-6)")
        if self.kind in MIXTURE_KINDS:
            if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int) or self.num_experts < 2:
                raise OMoEConfigError(f"num_experts={self.num_experts!r}: a mixture ({self.kind}) needs at least 2 "
                                      f"LoRA experts; use kind='lora' for a single adapter")
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
                raise OMoEConfigError(f"top_k={self.top_k!r}: must lie in [1, num_experts={self.num_experts}]")
        if self.normalize and self.kind != "omoe-lora":
            raise OMoEConfigError(f"normalize=True belongs to the Gram–Schmidt of kind='omoe-lora', not {self.kind!r}")
        object.__setattr__(self, "targets", _as_names(self.targets, "targets"))
        object.__setattr__(self, "head_modules", _as_names(self.head_modules, "head_modules") or ())

    @property
    def is_mixture(self):
        return self.kind in MIXTURE_KINDS

    @property
    def scaling(self):
        return self.alpha / self.r

    def to_dict(self):
        data = asdict(self)
        for key in ("targets", "head_modules"):
            data[key] = None if data[key] is None else list(data[key])
        return data

    @classmethod
    def from_dict(cls, data):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise OMoEConfigError(f"unknown LoRA adapter settings {unknown}; known: {sorted(known)}")
        return cls(**data)


def name_matches(name, pattern):
    """PEFT's target_modules rule for one entry: the full name, a dotted suffix, or a full regex match."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:  # a plain name with regex metacharacters is still a name
        return False
