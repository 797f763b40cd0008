"""Wrap the targeted nn.Linear modules of any Hugging Face model with LoRA adapters; freeze all but adapters and head."""
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from omoe_ds.core.config import OMoEConfigError
from omoe_ds.lora.config import DECODER_TARGETS, ENCODER_TARGETS, LoRAMixtureConfig, name_matches
from omoe_ds.lora.layers import LoRAMixtureLinear

PEFT_ADAPTER_NAME = "default"


@dataclass(frozen=True)
class LoRAReport:
    """What inject() did: the handle to save, load and merge the adapter by."""
    config: LoRAMixtureConfig
    adapted_modules: tuple      # full names of the wrapped nn.Linear modules
    head_modules: tuple         # full names of the modules trained in full
    trainable_parameters: int
    total_parameters: int
    peft_tuner: Any = field(default=None, repr=False, compare=False)  # kind="lora": PEFT's LoraModel, for merging

    @property
    def trainable_share(self):
        return self.trainable_parameters / self.total_parameters

    def summary(self):
        return (f"{self.config.kind}: {len(self.adapted_modules)} adapted Linear modules, trainable "
                f"{self.trainable_parameters:,} of {self.total_parameters:,} parameters "
                f"({100 * self.trainable_share:.3f}%)")


def _is_adapted(module):
    from peft.tuners.lora import LoraLayer
    return isinstance(module, (LoRAMixtureLinear, LoraLayer))


def _listing(names, limit=12):
    names = list(names)
    more = f", … ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def resolve_modules(model, config):
    """(adapted Linear names, head names) for config on model, or OMoEConfigError; touches nothing."""
    if any(_is_adapted(module) for module in model.modules()):
        raise OMoEConfigError("this model already carries LoRA adapters; inject into a fresh base model")
    head_names = [name for name, _ in model.named_modules()
                  if name and any(name_matches(name, pattern) for pattern in config.head_modules)]
    head_names = [name for name in head_names if not any(name.startswith(h + ".") for h in head_names)]
    linear_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)
                    and not any(name == h or name.startswith(h + ".") for h in head_names)]
    if config.targets is None:
        family = DECODER_TARGETS if any(name_matches(n, "q_proj") for n in linear_names) else ENCODER_TARGETS
        patterns = [p for p in family if any(name_matches(n, p) for n in linear_names)]
        if not patterns:
            raise OMoEConfigError(
                f"no default LoRA targets ({', '.join(DECODER_TARGETS)} for decoders; {', '.join(ENCODER_TARGETS)} "
                f"for encoders) in this model: pass targets=(…) from its nn.Linear modules: {_listing(linear_names)}")
    else:
        patterns = config.targets
        for pattern in patterns:
            if not any(name_matches(name, pattern) for name in linear_names):
                raise OMoEConfigError(
                    f"LoRA target {pattern!r} matches no nn.Linear module (outside the task head) of "
                    f"{type(model).__name__}; its nn.Linear modules include: {_listing(linear_names)}")
    adapted = [name for name in linear_names if any(name_matches(name, p) for p in patterns)]
    return tuple(adapted), tuple(head_names)


def _inject_peft_lora(model, config, adapted):
    from peft import LoraConfig
    from peft.functional import cast_adapter_dtype
    from peft.tuners.lora import LoraModel
    peft_config = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                             target_modules=list(adapted), bias="none", init_lora_weights=True)
    tuner = LoraModel(model, peft_config, PEFT_ADAPTER_NAME)  # injects in place, as peft.inject_adapter_in_model
    cast_adapter_dtype(model, PEFT_ADAPTER_NAME)  # fp16/bf16 bases get fp32 adapters, as PeftModel does
    return tuner


def _inject_mixture(model, config, adapted):
    for name in adapted:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base_layer = getattr(parent, child_name)
        setattr(parent, child_name, LoRAMixtureLinear(
            base_layer, config.r, config.alpha, config.num_experts, config.dropout, config.routing, config.top_k,
            orthogonalize=config.kind == "omoe-lora", normalize=config.normalize, eps_relative=config.eps_relative))


def inject(model: nn.Module, config: LoRAMixtureConfig = LoRAMixtureConfig()) -> LoRAReport:
    """Wrap model's targeted nn.Linear modules in place with config's adapters; train only adapters, routers, head.

    Every refusal (OMoEConfigError) comes before the model is touched. kind="lora" is PEFT's LoRA; the
    mixtures are LoRAMixtureLinear. Both then follow one path: freeze all, unfreeze each adapted module's
    own parameters (not its base_layer) and the head, count.
    """
    if not isinstance(config, LoRAMixtureConfig):
        raise OMoEConfigError(f"config must be a LoRAMixtureConfig, not {type(config).__name__}")
    adapted, heads = resolve_modules(model, config)
    tuner = _inject_peft_lora(model, config, adapted) if config.kind == "lora" else _inject_mixture(model, config,
                                                                                                     adapted)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name in adapted:
        for parameter_name, parameter in model.get_submodule(name).named_parameters():
            parameter.requires_grad_(not parameter_name.startswith("base_layer."))
    for name in heads:
        model.get_submodule(name).requires_grad_(True)
    parameters = list(model.parameters())
    return LoRAReport(config, adapted, heads, sum(p.numel() for p in parameters if p.requires_grad),
                      sum(p.numel() for p in parameters), tuner)


def adapter_parameter_names(model, report):
    """Full names of the parameters an adapter file holds: the adapters' own (not base_layer's) and the head's."""
    names = []
    for name, _ in model.named_parameters():
        in_adapter = any(name.startswith(m + ".") and not name.startswith(m + ".base_layer.")
                         for m in report.adapted_modules)
        if in_adapter or any(name.startswith(h + ".") for h in report.head_modules):
            names.append(name)
    return names


def merge_and_unload(model, report):
    """Fold a plain LoRA adapter into the base weights through PEFT's merge_and_unload; returns the plain model."""
    if report.config.kind != "lora":
        raise OMoEConfigError(
            f"a routed mixture (kind={report.config.kind!r}) cannot be merged into the base weights: its router "
            f"weights g(x) change with every token (and omoe-lora's Gram–Schmidt is nonlinear in x), so "
            f"W0 + Σ g_i(x) B_i A_i is no fixed matrix. Keep the adapter on the model, or train kind='lora'.")
    if report.peft_tuner is None or report.peft_tuner.model is not model:
        raise OMoEConfigError("this report does not belong to this model: merge with the report inject() or "
                              "load_adapter() returned for it")
    return report.peft_tuner.merge_and_unload()
