"""Expert-diversity figures that work on expert-sharded models: only per-expert rows cross ranks.

Per MoE layer, for [W1|b1] and [W2|b2] each (weight and bias flattened together, "positions"):
- percent_differing: averaged over all expert pairs i<j, the share of positions with
  |θ_i − θ_j| > threshold, in percent (paper A §III.A: ">99% of parameters similar" without OMoE);
- param_variance: population variance of each position across the M experts, averaged over positions
  (paper A, Tables I/II).
Per MoE layer: output_variance, the variance across experts of their outputs on the same tokens,
averaged over tokens and dims. "overall" applies the same definitions with every (pair, position),
position or (token, dim) of every layer counted once. diverse_degree compares two runs (paper A, Fig. 3);
ExpertLoadCounter counts the tokens each gate sends to each expert.

Sharding: a rank holds all M experts' values only for one slice of `chunk` positions (or outputs) at a
time, all-gathered from the [E_local, chunk] rows of the EP group, so memory stays O(M·chunk).
"""
from __future__ import annotations

import contextlib
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from ..core import collectives
from ..experts import ExpertLayer

DEFAULT_THRESHOLD = 1e-3  # paper A §III.A
DEFAULT_CHUNK = 1 << 16   # floats per expert in one gathered slice
GATHER_LOG = "omoe_diversity_allgather"
EXPERT_PARAM_KEY = re.compile(r"layer(\d+)\.expert(\d+)\.(w1|w2|gate|up|down)\.(weight|bias)$")


@dataclass
class _Mean:
    """A sum over elements and their count, so layer and overall figures share one definition."""
    total: float = 0.0
    count: float = 0.0

    def add(self, total: float, count: float) -> None:
        self.total += total
        self.count += count

    def merge(self, other: "_Mean") -> None:
        self.add(other.total, other.count)

    @property
    def value(self) -> float:
        return self.total / self.count if self.count else math.nan


def _pair_abs_differences(every: torch.Tensor) -> Iterator[torch.Tensor]:
    """|θ_i − θ_j| for all pairs i<j of the rows of [M, c], one i at a time to keep memory O(M·c)."""
    for i in range(every.shape[0] - 1):
        yield (every[i + 1:] - every[i]).abs()


def _num_pairs(num_experts: int) -> int:
    return num_experts * (num_experts - 1) // 2


def _weight_slices(layer: ExpertLayer, matrix: str, chunk: int) -> Iterator[torch.Tensor]:
    """[M, ≤chunk] slices of every expert's flat [W|b], in global-expert order."""
    local = [[t.detach().reshape(-1) for t in layer.matrices(l)[matrix] if t is not None]
             for l in range(layer.num_local_experts)]
    for same_tensor in zip(*local):  # the weight of every local expert, then the bias
        for start in range(0, same_tensor[0].numel(), chunk):
            rows = torch.stack([t[start:start + chunk] for t in same_tensor]).float()
            yield collectives.gather_over_ep(rows, layer.ep_size, log_name=GATHER_LOG)


@torch.no_grad()  # also keeps OMoE's input capture from recording these forwards
def _output_slices(layer: ExpertLayer, tokens: torch.Tensor, chunk: int) -> Iterator[torch.Tensor]:
    """[M, ≤chunk] slices of every expert's output on the same tokens, flattened over (token, dim)."""
    tokens_per_slice = max(1, chunk // tokens.shape[1])
    for start in range(0, tokens.shape[0], tokens_per_slice):
        x = tokens[start:start + tokens_per_slice]
        rows = torch.stack([layer.expert_forward(l, x).reshape(-1) for l in range(layer.num_local_experts)]).float()
        yield collectives.gather_over_ep(rows, layer.ep_size, log_name=GATHER_LOG)


def _variance_sum(every: torch.Tensor) -> tuple:
    """(Σ over columns of the population variance across the rows of [M, c], c)."""
    return float(every.double().var(dim=0, unbiased=False).sum()), every.shape[1]


def _differing_pairs(every: torch.Tensor, threshold: float) -> tuple:
    """(number of (pair i<j, column) with |θ_i − θ_j| > threshold, number of (pair, column))."""
    count = sum(int((d > threshold).sum()) for d in _pair_abs_differences(every))
    return count, _num_pairs(every.shape[0]) * every.shape[1]


def _weight_figures(layer: ExpertLayer, matrix: str, threshold: float, chunk: int) -> tuple:
    differing, variance = _Mean(), _Mean()
    for every in _weight_slices(layer, matrix, chunk):  # one pass: each slice is gathered once
        differing.add(*_differing_pairs(every, threshold))
        variance.add(*_variance_sum(every))
    return differing, variance


def _output_variance(layer: ExpertLayer, tokens: torch.Tensor, chunk: int) -> _Mean:
    variance = _Mean()
    for every in _output_slices(layer, tokens, chunk):
        variance.add(*_variance_sum(every))
    return variance


def _shared_tokens(layer: ExpertLayer, tokens: torch.Tensor) -> torch.Tensor:
    """Rank 0's tokens on every rank: all experts, wherever they live, must see the same input."""
    weight = layer.expert_parameters()[0]
    return collectives.broadcast_from_rank0(tokens.detach().reshape(-1, layer.streams[0].d_in).to(weight.dtype))


def expert_diversity(layers: List[ExpertLayer], threshold: float = DEFAULT_THRESHOLD,
                     inputs: Optional[Sequence[torch.Tensor]] = None, chunk: int = DEFAULT_CHUNK) -> dict:
    """{"layers": [{<matrix>: {...} for each of the layer's matrices ("w1", "w2" for FFN experts; "gate",
    "up", "down" for SwiGLU ones), "output_variance"?}], "overall": {...}}; see the module doc.

    inputs: per layer, token vectors [..., d_model] the experts are compared on; rank 0's are used on
    every rank. output_variance is left out without inputs (or without tokens). Every rank must call.
    """
    per_layer = []
    overall: Dict[str, Dict[str, _Mean]] = {}
    overall_outputs = _Mean()
    for layer in layers:
        with _gathered(layer):
            figures = _layer_figures(layer, threshold, inputs, chunk, overall, overall_outputs)
        per_layer.append(figures)
    return {"layers": per_layer, "overall": _overall(overall, overall_outputs)}


def _gathered(layer: ExpertLayer):
    """ZeRO-3 keeps a shard of each expert parameter outside the forward: gather this layer's while it is read."""
    partitioned = [p for p in layer.expert_parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(partitioned)


def _layer_figures(layer: ExpertLayer, threshold: float, inputs, chunk: int, overall: dict,
                   overall_outputs: _Mean) -> dict:
    """One layer's figures; adds its sums to the overall ones."""
    figures = {}
    for name in layer.matrix_names:
        differing, variance = _weight_figures(layer, name, threshold, chunk)
        overall.setdefault(name, {"differing": _Mean(), "variance": _Mean()})
        overall[name]["differing"].merge(differing)
        overall[name]["variance"].merge(variance)
        figures[name] = {"percent_differing": 100 * differing.value, "param_variance": variance.value}
    tokens = _shared_tokens(layer, inputs[layer.index]) if inputs is not None else None
    if tokens is not None and tokens.shape[0]:
        outputs = _output_variance(layer, tokens, chunk)
        overall_outputs.merge(outputs)
        figures["output_variance"] = outputs.value
    return figures


def _overall(per_weight: Dict[str, Dict[str, _Mean]], outputs: _Mean) -> dict:
    differing, variance = _Mean(), _Mean()
    result = {}
    for name, means in per_weight.items():
        differing.merge(means["differing"])
        variance.merge(means["variance"])
        result[name] = {"percent_differing": 100 * means["differing"].value,
                        "param_variance": means["variance"].value}
    result.update(percent_differing=100 * differing.value, param_variance=variance.value)
    if outputs.count:
        result["output_variance"] = outputs.value
    return result


def param_variance_by_layer(diversity: dict) -> List[Dict[str, float]]:
    """The per-layer {<matrix>, ..., "mean"} parameter variances of an expert_diversity result."""
    out = []
    for figures in diversity["layers"]:
        per_matrix = {name: f["param_variance"] for name, f in figures.items() if isinstance(f, dict)}
        out.append({**per_matrix, "mean": sum(per_matrix.values()) / len(per_matrix)})
    return out


def mean_param_variance(per_layer: List[Dict[str, float]]) -> float:
    """The one-number figure the job tables report: the per-layer "mean" variances, averaged over layers."""
    return sum(d["mean"] for d in per_layer) / len(per_layer)


def expert_parameter_variance(layers: List[ExpertLayer]) -> List[Dict[str, float]]:
    """Per MoE layer: mean over parameter positions of the variance across experts, per matrix ([W|b] each)."""
    return param_variance_by_layer(expert_diversity(layers))


def diversity_events(diversity: dict, step: int) -> list:
    """Monitor events: the overall figures, and per layer and weight the differing share and variance."""
    events = [(f"Diversity/overall/{key}", value, step)
              for key, value in diversity["overall"].items() if not isinstance(value, dict)]
    for index, figures in enumerate(diversity["layers"]):
        for name, per_matrix in figures.items():
            if isinstance(per_matrix, dict):
                events += [(f"Diversity/layer{index}/{name}/{key}", value, step) for key, value in per_matrix.items()]
    return events


def _stacked_experts(state: Dict[str, torch.Tensor]) -> Dict[tuple, torch.Tensor]:
    """{(layer, "w1"|"w2"): [M, positions]} from a state dict keyed by global expert id, experts in id order."""
    parts = defaultdict(dict)
    for key, tensor in state.items():
        match = EXPERT_PARAM_KEY.search(key)
        if match:
            layer, expert, weight, kind = match.groups()
            parts[(int(layer), weight)].setdefault(int(expert), {})[kind] = tensor.detach().reshape(-1).double()
    return {key: torch.stack([torch.cat([by_kind[k] for k in ("weight", "bias") if k in by_kind])
                              for _, by_kind in sorted(experts.items())])
            for key, experts in sorted(parts.items())}


def _mean_pairwise_abs_difference(every: torch.Tensor) -> torch.Tensor:
    """Per position, the mean over expert pairs i<j of |θ_i − θ_j|."""
    return sum(d.sum(dim=0) for d in _pair_abs_differences(every)) / _num_pairs(every.shape[0])


def diverse_degree(run_a: Dict[str, torch.Tensor], run_b: Dict[str, torch.Tensor]) -> dict:
    """Share of positions (in [0, 1]) whose mean pairwise |difference| across experts is larger in run B
    (e.g. OMoE) than in run A (e.g. the AdamW baseline), paper A Fig. 3; ties count as not larger.

    The runs are full state dicts keyed "layer{L}.expert{g}.{w1|w2}.{weight|bias}" (as
    expert_parameters_by_global_id names them, gathered from every rank); other keys are ignored.
    Returns {"layers": [{"w1": share, "w2": share}, ...], "overall": share over all positions}.
    """
    stacked_a, stacked_b = _stacked_experts(run_a), _stacked_experts(run_b)
    if stacked_a.keys() != stacked_b.keys() or not stacked_a:
        raise ValueError("diverse_degree needs two runs with the same, non-empty set of MoE layers and weights")
    per_layer = defaultdict(dict)
    overall = _Mean()
    for (layer, weight), a in stacked_a.items():
        b = stacked_b[(layer, weight)]
        if a.shape != b.shape:
            raise ValueError(f"layer{layer}.{weight}: expert parameters of shape {tuple(a.shape)} vs {tuple(b.shape)}")
        larger = int((_mean_pairwise_abs_difference(b) > _mean_pairwise_abs_difference(a)).sum())
        overall.add(larger, a.shape[1])
        per_layer[layer][weight] = larger / a.shape[1]
    return {"layers": [per_layer[layer] for layer in sorted(per_layer)], "overall": overall.value}


class _RoutingWatch:
    """Each layer's routed real tokens: `layer.watch_routing`, with padding masked out by the model forward's
    attention_mask where the layout's router routes padding too (transformers' and AutoEP's)."""

    def __init__(self, layers: List[ExpertLayer], model: Optional[torch.nn.Module], on_route):
        self._mask = None
        self._handles = []
        if model is not None and any(layer.routes_padding for layer in layers):
            self._handles.append(model.register_forward_pre_hook(self._keep_mask, with_kwargs=True))
        for i, layer in enumerate(layers):
            self._handles += layer.watch_routing(self._make_callback(i, layer, on_route))

    def _keep_mask(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _make_callback(self, index: int, layer: ExpertLayer, on_route):
        def route(tokens, experts):
            if layer.routes_padding and self._mask is not None and self._mask.numel() == tokens.shape[0]:
                used = self._mask.reshape(-1).to(tokens.device) != 0
                tokens, experts = tokens[used], experts[used]
            on_route(index, tokens, experts)
        return route

    def remove(self) -> None:
        self._watch.remove()


class LayerInputSample:
    """Keeps the first max_tokens token vectors each MoE layer routes while enabled (padding skipped): the
    common input expert_diversity runs every expert on. model: the module whose forward gets the
    attention_mask, needed for layouts that route padding."""

    def __init__(self, layers: List[ExpertLayer], model: Optional[torch.nn.Module] = None, max_tokens: int = 256):
        self.max_tokens = max_tokens
        self.enabled = False
        self.tokens: List[List[torch.Tensor]] = [[] for _ in layers]
        self._watch = _RoutingWatch(layers, model, self._keep)

    def _keep(self, index: int, tokens: torch.Tensor, experts: torch.Tensor) -> None:
        room = self.max_tokens - sum(len(t) for t in self.tokens[index])
        if self.enabled and room > 0:
            self.tokens[index].append(tokens[:room].clone())

    def take(self) -> List[torch.Tensor]:
        """Per layer, the kept tokens [T, d_model] (T may be 0); the sample starts empty again."""
        taken = [torch.cat(t) if t else torch.empty(0, 0) for t in self.tokens]
        self.tokens = [[] for _ in self.tokens]
        return taken

    def remove(self) -> None:
        self._watch.remove()


class ExpertLoadCounter:
    """Counts the tokens each layer's router sends to each expert while enabled; summed over all ranks on read."""

    def __init__(self, layers: List[ExpertLayer], model: Optional[torch.nn.Module] = None):
        self.layers = layers
        self.enabled = False
        self.counts = [torch.zeros(layer.num_experts, dtype=torch.float64) for layer in layers]
        self._watch = _RoutingWatch(layers, model, self._count)

    def _count(self, index: int, tokens: torch.Tensor, experts: torch.Tensor) -> None:
        if self.enabled:
            routed = experts[experts >= 0]
            self.counts[index] += torch.bincount(routed, minlength=self.layers[index].num_experts).double().cpu()

    def reset(self) -> None:
        for c in self.counts:
            c.zero_()

    def read(self) -> List[Dict[str, object]]:
        """Per layer: tokens per expert, their share, and the routing entropy of that share (nats)."""
        result = []
        for c in self.counts:
            total = collectives.sum_over_world_(c.clone())
            share = total / total.sum().clamp(min=1)
            entropy = float(-(share[share > 0] * share[share > 0].log()).sum())
            result.append({"tokens": total.tolist(), "share": share.tolist(), "entropy": entropy})
        return result

    def remove(self) -> None:
        self._watch.remove()
