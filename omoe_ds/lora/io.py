"""An adapter on its own: adapter_model.safetensors (adapters, routers, head) plus adapter_config.json."""
import json
import os

import torch
from safetensors.torch import load_file, save_file

from omoe_ds.core.config import OMoEConfigError
from omoe_ds.lora.config import LoRAMixtureConfig
from omoe_ds.lora.inject import adapter_parameter_names, inject

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "omoe-ds-lora/1"


def save_adapter(model, report, directory):
    """Write report's adapter (not the frozen base) of model to directory; returns the two paths."""
    os.makedirs(directory, exist_ok=True)
    parameters = dict(model.named_parameters())
    tensors = {name: parameters[name].detach().cpu().contiguous() for name in adapter_parameter_names(model, report)}
    weights_path, config_path = os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, CONFIG_NAME)
    save_file(tensors, weights_path, metadata={"format": "pt", "omoe_format": FORMAT})
    with open(config_path, "w") as handle:
        json.dump({"format": FORMAT, "config": report.config.to_dict(), "adapted_modules": list(report.adapted_modules),
                   "head_modules": list(report.head_modules)}, handle, indent=2)
    return weights_path, config_path


def load_adapter(model, directory):
    """Inject the saved adapter into the fresh base model and copy its weights in, bit for bit; returns the report."""
    with open(os.path.join(directory, CONFIG_NAME)) as handle:
        saved = json.load(handle)
    if saved.get("format") != FORMAT:
        raise OMoEConfigError(f"{directory}: not an omoe-ds LoRA adapter (format {saved.get('format')!r}, "
                              f"expected {FORMAT!r})")
    report = inject(model, LoRAMixtureConfig.from_dict(saved["config"]))
    if list(report.adapted_modules) != saved["adapted_modules"] or list(report.head_modules) != saved["head_modules"]:
        raise OMoEConfigError(f"{directory}: the adapter was saved from a model with other modules "
                              f"(adapted {len(saved['adapted_modules'])}, here {len(report.adapted_modules)}): "
                              f"load it onto the base model it was trained on")
    tensors = load_file(os.path.join(directory, WEIGHTS_NAME))
    parameters = dict(model.named_parameters())
    expected = set(adapter_parameter_names(model, report))
    if set(tensors) != expected:
        raise OMoEConfigError(f"{directory}: adapter weights do not fit: missing {sorted(expected - set(tensors))[:5]},"
                              f" unexpected {sorted(set(tensors) - expected)[:5]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if parameters[name].shape != tensor.shape:
                raise OMoEConfigError(f"{directory}: {name} has shape {tuple(tensor.shape)}, the model "
                                      f"{tuple(parameters[name].shape)}")
            parameters[name].copy_(tensor)
    return report
