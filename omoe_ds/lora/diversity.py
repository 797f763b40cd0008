"""Diversity figures of mixtures of LoRA experts (paper B, arXiv 2501.10062), measured on given batches.

Forward pre-hooks on every LoRAMixtureLinear of a model see each module's input x during one no_grad, eval-mode
forward per batch; the hook recomputes the module's MixtureParts from x (the forward keeps none; in eval mode,
without dropout, they are the very values the forward mixed) and keeps only the real tokens, those whose
attention-mask entry is nonzero. Per module, over those tokens:
- expert_cosine: the pairwise cosine similarity cos(e_i, e_j), i < j, of the experts' outputs *before* the
  Gram–Schmidt (collapse shows as a mean near 1); "mean" over every (token, pair) whose two vectors are nonzero
  (with no zero vectors, the per-token mean over pairs averaged over tokens), "mean_abs", "max_abs", and "pairs"
  counted. At LoRA's init (B = 0) every e_i is 0, no pair counts, and the figures are None, not 0 or NaN.
- representation_cosine: the same for u, what is mixed (u = e for moe-lora; ~0 for omoe-lora where ‖u‖² ≫ ε).
- load: the mean gate g_i per expert (sums to 1); gate_entropy: the mean per-token entropy −Σ g log g (nats,
  0 log 0 = 0 under top-k); load_entropy: the entropy of the mean load; max_entropy = log N for scale.
Cosines and entropies are computed in fp64 from the module's fp32 values and summed in fp64.
"summary" averages each scalar over modules (each module counts once). Everything is JSON-serialisable.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from omoe_ds.core.config import OMoEConfigError
from omoe_ds.lora.layers import LoRAMixtureLinear

COSINE_KEYS = ("mean", "mean_abs", "max_abs")
ROUTER_KEYS = ("gate_entropy", "load_entropy")


def mixture_modules(model: nn.Module) -> dict:
    """{full name: LoRAMixtureLinear} of model, in module order; refused if there is none (plain LoRA has none)."""
    modules = {name: m for name, m in model.named_modules() if isinstance(m, LoRAMixtureLinear)}
    if not modules:
        raise OMoEConfigError(f"{type(model).__name__} has no LoRAMixtureLinear modules: diversity figures are for "
                              f"mixtures of LoRA experts (kind 'moe-lora' or 'omoe-lora'), not plain LoRA")
    return modules


def pairwise_cosines(vectors: torch.Tensor):
    """(cosines [T, P], valid [T, P]) of every pair i < j of vectors [T, N, d], in fp64; valid: both nonzero."""
    vectors = vectors.double()
    norms = vectors.norm(dim=-1)
    first, second = torch.triu_indices(vectors.shape[1], vectors.shape[1], offset=1, device=vectors.device)
    dots = (vectors[:, first] * vectors[:, second]).sum(-1)
    scale = norms[:, first] * norms[:, second]
    valid = scale > 0
    return torch.where(valid, dots / torch.where(valid, scale, 1.0), 0.0), valid


class _CosineSums:
    def __init__(self):
        self.total = self.total_abs = 0.0
        self.max_abs, self.pairs = None, 0

    def add(self, vectors):
        cosines, valid = pairwise_cosines(vectors)
        cosines = cosines[valid]
        if cosines.numel():
            self.total += cosines.sum().item()
            self.total_abs += cosines.abs().sum().item()
            largest = cosines.abs().max().item()
            self.max_abs = largest if self.max_abs is None else max(self.max_abs, largest)
            self.pairs += cosines.numel()

    def figures(self):
        if not self.pairs:
            return {"mean": None, "mean_abs": None, "max_abs": None, "pairs": 0}
        return {"mean": self.total / self.pairs, "mean_abs": self.total_abs / self.pairs, "max_abs": self.max_abs,
                "pairs": self.pairs}


class _ModuleSums:
    """fp64 sums over the real tokens one module has seen."""

    def __init__(self, module):
        self.kind = "omoe-lora" if module.orthogonalize else "moe-lora"
        self.num_experts = module.num_experts
        self.tokens = 0
        self.expert, self.representation = _CosineSums(), _CosineSums()
        self.gate_sum = torch.zeros(module.num_experts, dtype=torch.float64)
        self.entropy_sum = 0.0

    def add(self, parts, keep):
        expert_outputs, representations, gates = (parts.expert_outputs[keep], parts.representations[keep],
                                                   parts.gates[keep].double())
        self.tokens += gates.shape[0]
        self.expert.add(expert_outputs)
        self.representation.add(expert_outputs if self.kind == "moe-lora" else representations)
        self.gate_sum += gates.sum(0).cpu()
        self.entropy_sum += -torch.special.xlogy(gates, gates).sum().item()

    def figures(self):
        load = (self.gate_sum / self.tokens) if self.tokens else None
        return {"kind": self.kind, "num_experts": self.num_experts, "tokens": self.tokens,
                "expert_cosine": self.expert.figures(), "representation_cosine": self.representation.figures(),
                "load": None if load is None else load.tolist(),
                "gate_entropy": self.entropy_sum / self.tokens if self.tokens else None,
                "load_entropy": -torch.special.xlogy(load, load).sum().item() if self.tokens else None,
                "max_entropy": math.log(self.num_experts)}


def _as_batches(batches):
    return [batches] if isinstance(batches, Mapping) else list(batches)


def _token_mask(batch, mask_key):
    """The flat bool mask of real tokens of a batch, or None (every token is real)."""
    mask = batch.get(mask_key) if mask_key else None
    return None if mask is None else mask.reshape(-1) != 0


@contextmanager
def _eval_no_grad(model):
    """Eval mode (no dropout: the hook's recomputed parts are the forward's), then each module's own mode back."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes:
            module.train(mode)


def _run(model, batches, modules, on_parts, mask_key):
    """One forward per batch with a hook on each of modules ({name: module}) calling on_parts(name, parts, keep)."""
    device = next(model.parameters()).device
    state = {}

    def hook_for(name):
        def hook(module, args):
            x, mask = args[0], state["mask"]
            if mask is not None and mask.numel() != x.numel() // x.shape[-1]:
                raise OMoEConfigError(f"{name}: input of shape {tuple(x.shape)} does not match the attention mask "
                                      f"({mask.numel()} tokens): the mask must cover the module's tokens")
            parts = module.mixture_parts(x)
            keep = mask.to(x.device) if mask is not None else slice(None)
            on_parts(name, parts, keep)
        return hook

    # Pre-hooks: ZeRO-3's own pre-hook (registered first, at engine init) has gathered the module's adapters by
    # then; after the forward its post-hook has partitioned them again.
    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in modules.items()]
    try:
        with _eval_no_grad(model):
            for batch in batches:
                inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items() if k != "labels"}
                state["mask"] = _token_mask(inputs, mask_key)
                model(**inputs)
    finally:
        for handle in handles:
            handle.remove()


def lora_diversity(model: nn.Module, batches, mask_key: Optional[str] = "attention_mask") -> dict:
    """Diversity figures of every LoRAMixtureLinear of model on batches (a dict of model inputs, or several).

    Each batch is passed as model(**batch) ("labels" dropped); its mask_key entry (default "attention_mask",
    [batch, seq], nonzero for real tokens) both reaches the model and picks the tokens that count. With no mask
    every token counts. Returns {"modules": {name: figures}, "summary": means over modules}, JSON-serialisable.
    """
    modules = mixture_modules(model)
    sums = {name: _ModuleSums(module) for name, module in modules.items()}
    _run(model, _as_batches(batches), modules, lambda name, parts, keep: sums[name].add(parts, keep), mask_key)
    figures = {name: s.figures() for name, s in sums.items()}
    return {"modules": figures, "summary": summarise(figures)}


def summarise(figures: dict) -> dict:
    """Means over modules of every scalar figure (None where no module has one), the load of all modules pooled."""
    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    entries = list(figures.values())
    summary = {"modules": len(entries), "tokens": max((e["tokens"] for e in entries), default=0)}
    for which in ("expert_cosine", "representation_cosine"):
        summary[which] = {key: mean(e[which][key] for e in entries) for key in COSINE_KEYS}
        summary[which]["max_abs"] = max((e[which]["max_abs"] for e in entries if e[which]["max_abs"] is not None),
                                        default=None)
    for key in ROUTER_KEYS:
        summary[key] = mean(e[key] for e in entries)
    loads = [e["load"] for e in entries if e["load"] is not None]
    same_n = len({len(load) for load in loads}) == 1
    summary["load"] = [sum(column) / len(loads) for column in zip(*loads)] if loads and same_n else None
    summary["max_entropy"] = mean(e["max_entropy"] for e in entries)
    return summary


def collect_representations(model: nn.Module, batches, module_name: Optional[str] = None,
                            which: str = "representations", mask_key: Optional[str] = "attention_mask"):
    """(name, [T_real, N, d_out] fp32 CPU tensor) of one mixture module's u ("representations") or e
    ("expert_outputs") on the real tokens of batches. module_name None picks the middle mixture module."""
    if which not in ("representations", "expert_outputs"):
        raise OMoEConfigError(f"which={which!r}: choose 'representations' (u) or 'expert_outputs' (e)")
    modules = mixture_modules(model)
    names = list(modules)
    name = names[len(names) // 2] if module_name is None else module_name
    if name not in modules:
        raise OMoEConfigError(f"{name!r} is no LoRAMixtureLinear of this model; its mixtures include: "
                              f"{', '.join(names[:8])}{', …' if len(names) > 8 else ''}")
    kept = []
    _run(model, _as_batches(batches), {name: modules[name]},
         lambda _, parts, keep: kept.append(getattr(parts, which)[keep].float().cpu()), mask_key)
    return name, torch.cat(kept)


def plot_representation_pca(panels: Mapping, path, title: Optional[str] = None, max_points_per_expert: int = 400,
                            seed: int = 0, dpi: int = 100, panel_size=(4.5, 4.0)):
    """Write a PNG with one 2-D PCA scatter per panel ({label: [T, N, d] tensor}), a colour per expert.

    Each panel has its own PCA (sklearn, fitted on all its experts' points): the models' spaces differ, and the
    question is how the experts' clouds sit relative to each other within one model. At most
    max_points_per_expert tokens per panel (seeded choice, the same tokens for every expert). Returns path.
    """
    import matplotlib
    matplotlib.use("Agg")  # headless; no display on the training machines
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    figure, axes = plt.subplots(1, len(panels), figsize=(panel_size[0] * len(panels), panel_size[1]),
                                dpi=dpi, squeeze=False)
    try:
        for axis, (label, vectors) in zip(axes[0], panels.items()):
            vectors = torch.as_tensor(vectors).double().cpu().numpy()
            tokens, num_experts, width = vectors.shape
            chosen = np.sort(rng.choice(tokens, size=min(tokens, max_points_per_expert), replace=False))
            points = vectors[chosen].transpose(1, 0, 2).reshape(-1, width)  # expert-major: [N·t, d]
            projection = PCA(n_components=2, random_state=seed).fit(points)
            xy = projection.transform(points).reshape(num_experts, len(chosen), 2)
            cosines, valid = pairwise_cosines(torch.from_numpy(vectors))
            kept = cosines[valid]
            shown = (f"pairwise cos: mean {kept.mean().item():+.3f}, mean |cos| {kept.abs().mean().item():.3f}"
                     if kept.numel() else "pairwise cos: undefined (zero outputs)")
            for expert in range(num_experts):
                axis.scatter(xy[expert, :, 0], xy[expert, :, 1], s=8, alpha=0.6, color=f"C{expert}",
                             label=f"expert {expert + 1}", edgecolors="none")
            explained = projection.explained_variance_ratio_
            axis.set_title(f"{label}\n{shown}", fontsize=10)
            axis.set_xlabel(f"PC1 ({100 * explained[0]:.0f}% var.)")
            axis.set_ylabel(f"PC2 ({100 * explained[1]:.0f}% var.)")
            axis.legend(fontsize=8, markerscale=2, loc="best")
            axis.grid(alpha=0.3)
        if title:
            figure.suptitle(title, fontsize=11)
        figure.tight_layout()
        figure.savefig(path, dpi=dpi, format="png")
    finally:
        plt.close(figure)
    return path


def plot_expert_pca(models: Mapping, batches, path, module_name: Optional[str] = None,
                    which: str = "representations", mask_key: Optional[str] = "attention_mask", **plot_options):
    """PCA plot of one module's expert representations for several models ({label: model}, e.g. "moe-lora" and
    "omoe-lora" trained alike), in the spirit of paper B's Fig. 1; returns (path, module name)."""
    batches = _as_batches(batches)  # iterated once per model
    panels, name = {}, module_name
    for label, model in models.items():
        name, panels[label] = collect_representations(model, batches, name, which, mask_key)
    what = "u (mixed)" if which == "representations" else "e (before Gram–Schmidt)"
    plot_options.setdefault("title", f"{name}: expert outputs {what}, {next(iter(panels.values())).shape[0]} tokens")
    return plot_representation_pca(panels, path, **plot_options), name
