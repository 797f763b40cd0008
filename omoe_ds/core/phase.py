"""OMoE inside a DeepSpeed engine: R/O alternation, projector state, and the O-step exchange.

Step i (engine.global_steps, counted in optimizer steps) is an O step when i % s == 0 and i > 0.
- R step: the base optimizer updates everything; expert inputs are recorded (experts/).
- O step: before the first forward, the window's mean inputs update every local expert's
  projectors through one all-reduce of the windows' partial sums (world) and one all-gather of
  rank-1 factors (EP); then the grad
  hooks project expert gradients by P̄_m. Only experts move: dense parameters stop requiring grad
  for the step (no dense weight gradient is computed, none enters the clipping norm; input
  gradients still flow to the experts below) and their optimizer groups are hidden from the
  optimizer's step, so their values and their whole optimizer state keep their bits. The experts'
  optimizer state stays shared between both kinds of step (paper A, Fig. 2).
- fp16 overflow: an O step whose update DeepSpeed skips is deferred, not counted: the projectors
  it prepared are kept and the next step that is applied is the O step (`deferred_o_step`).
"""
from __future__ import annotations

import inspect
import time
from collections import defaultdict
from functools import partial
from typing import Dict, List, Optional, Tuple

import torch

from ..experts.base import STREAMS, ExpertLayer, RecordContext, expert_key
from . import collectives, optimizer_groups, projector
from .config import OMoEConfig, OMoEConfigError
from .projection_side import LayerProjection, side_report
from .projector_state import StreamProjectors
from .windows import InputWindow, flatten_windows, unflatten_windows_
from .wrapping import wrap_instance_method


def _refuse_recompute(name: str, module, args) -> None:
    # Activation checkpointing reruns the forward inside backward: the window would count the tokens twice.
    if module.training and torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1:
        raise RuntimeError(f"MoE layer {name or '<root>'} ran its forward inside backward (activation checkpointing "
                           "recomputes it): OMoE would record its inputs twice; do not checkpoint MoE layers")


class OMoE:
    """Attached to the engine as `engine.omoe` by `omoe_ds.initialize`."""

    def __init__(self, engine, layers: List[ExpertLayer], config: OMoEConfig):
        self.engine, self.layers, self.config = engine, layers, config
        self.phase = "R"
        self.prepared_step = -1          # the O step whose projector update has run
        self.o_steps_done = 0
        self.projection_seconds = [0.0]  # time spent inside the grad hooks
        self.exchange_seconds = 0.0      # time of the last O-step projector update + exchange
        self.ep_ranks = [collectives.ep_rank(layer.ep_size) for layer in layers]
        self.windows = [InputWindow(layer.num_experts, [s.d_in for s in layer.streams], layer.device) for layer in layers]
        # Per layer and input stream s (0 = x, 1 = h): this rank's experts' projectors and S = Σ_j P_j over
        # all experts, dense or factored (core/projector_state.py).
        self.projectors: List[List[StreamProjectors]] = [
            [StreamProjectors(stream.n, layer.num_experts, layer.num_local_experts,
                              self.ep_ranks[L] * layer.num_local_experts,
                              projector.loo_divisor_value(config.loo_divisor, layer.num_experts), layer.device,
                              config.projector_storage) for stream in layer.streams]
            for L, layer in enumerate(layers)]
        self._attention_mask: Optional[torch.Tensor] = None
        self._mask_position = _positional_index(engine.module, "attention_mask")
        # "auto" | "gradient" | "token", from the config; tests and benches may set it between O steps.
        self.projection_side = config.projection_side
        self.views = [LayerProjection(partial(self._stores_of, L), lambda: self.projection_side) for L in range(len(layers))]
        self._recorders = [hook for L, layer in enumerate(layers) for hook in layer.attach_recorder(
            RecordContext(self._records, self._token_mask, self.windows[L]))]
        # The projection's hooks exist during O steps only (attached at the step's first forward, removed after its
        # update): R steps carry the recorder's hooks alone (idle, they cost ~0.2 ms of an 8 ms small-shape step).
        self._projection_hooks: list = []
        self.deferred_o_step = None      # an O step whose update fp16 overflow skipped: it runs next
        # Not a config key: bench/step_overhead.py turns it off to measure what freezing saves.
        self.freeze_dense_in_o_steps = True
        expert_ids = {id(p) for layer in layers for p in layer.expert_parameters()}
        names = {id(p): n for n, p in engine.module.named_parameters()}
        self._dense_params = [p for p in engine.module.parameters() if p.requires_grad and id(p) not in expert_ids]
        self._frozen: List[torch.nn.Parameter] = []
        self._optimizer, model_groups = optimizer_groups.innermost_optimizer(engine.optimizer)
        if optimizer_groups.is_zero3(engine.optimizer):
            self._dense_tensors = optimizer_groups.zero3_dense_tensors(engine.optimizer, expert_ids, names)
        else:
            self._dense_tensors = optimizer_groups.dense_group_tensors(self._optimizer, model_groups, expert_ids, names)
        self._forward_handle = engine.module.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        self._recompute_guards = [layer.module.register_forward_pre_hook(partial(_refuse_recompute, layer.name))
                                  for layer in layers]
        self._restore = []  # undo each wrapper, last first
        self._wrap_optimizer_step(self._optimizer)
        self._wrap_model_step(engine)
        self._wrap_destroy(engine)

    def detach(self) -> None:
        """Remove every hook and wrapper OMoE put on the engine, model and optimizer (engine.destroy() calls it).
        A parameter's tensor hooks are held from C++, where Python's collector cannot see the cycle
        parameter → hook → OMoE → engine → parameter: without this, a destroyed engine stayed alive."""
        self._remove_projection_hooks()
        _remove(self._recorders)
        for handle in (self._forward_handle, *self._recompute_guards):
            handle.remove()
        for restore in reversed(self._restore):
            restore()
        self._recorders, self._recompute_guards, self._restore = [], [], []
        self._thaw_dense()

    def _wrap_destroy(self, engine) -> None:
        original = engine.destroy

        def destroy(*args, **kwargs):
            self.detach()  # restores engine.destroy too
            return original(*args, **kwargs)

        self._wrap(engine, "destroy", destroy)

    def _wrap(self, obj, name: str, wrapper) -> None:
        self._restore.append(wrap_instance_method(obj, name, wrapper))

    # ---- phase ------------------------------------------------------------------------------
    def _records(self, module) -> bool:
        return module.training and torch.is_grad_enabled() and self.phase == "R"

    def _token_mask(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        """[T] bool, the real tokens of the current model forward, for layouts whose router routes padding."""
        if self._attention_mask is None or self._attention_mask.dim() != 2:
            return None
        used = self._attention_mask.reshape(-1)
        if used.shape[0] != hidden_states.reshape(-1, hidden_states.shape[-1]).shape[0]:
            raise OMoEConfigError(f"the attention_mask of shape {tuple(self._attention_mask.shape)} does not give one "
                                  f"value per token of the MoE input {tuple(hidden_states.shape)}; OMoE records real "
                                  "tokens only: pass a [batch, seq] 0/1 attention_mask")
        return used.to(hidden_states.device) != 0

    def _is_o_step(self) -> bool:
        return self.phase == "O"

    def _before_forward(self, module, args, kwargs) -> None:
        self._forget_zero3_trace()
        if not (module.training and torch.is_grad_enabled()):
            return
        mask = kwargs.get("attention_mask")
        if mask is None and self._mask_position is not None and len(args) > self._mask_position:
            mask = args[self._mask_position]
        self._attention_mask = mask if isinstance(mask, torch.Tensor) else None
        step = self.engine.global_steps
        if self.deferred_o_step is not None or self.config.is_o_step(step):
            if self.deferred_o_step is None and self.prepared_step != step:
                self.update_projectors(step)
            self.phase = "O"
            self._attach_projection_hooks()
            if self.freeze_dense_in_o_steps:
                self._freeze_dense()
        else:
            self.phase = "R"
            self._thaw_dense()

    def _attach_projection_hooks(self) -> None:
        if not self._projection_hooks:  # once per O step, whatever its micro-batches
            self._projection_hooks = [hook for L, layer in enumerate(self.layers)
                                      for hook in layer.attach_projection(self.views[L], self._is_o_step,
                                                                          self.projection_seconds)]

    def _remove_projection_hooks(self) -> None:
        _remove(reversed(self._projection_hooks))  # last attached first: instance wrappers restore what they found
        self._projection_hooks = []

    def _forget_zero3_trace(self) -> None:
        """Every forward under ZeRO-3 runs without DeepSpeed's parameter trace (fetch on demand, no prefetch). The
        trace replays the fetch order of an earlier pass and checks it by module order only; an O step's backward
        fetches other parameters than an R step's (frozen dense modules), and passes recorded after a phase change
        disagreed between ranks. Seen on 2 ranks, SmolLM2 upcycled in 6 layers under AutoEP at ZeRO-3, short
        batches: a gloo size mismatch in the first O step with the trace kept, DeepSpeed's "tracing error" with
        prefetching off, and its rank-disagreement check on a trace recorded after an O step."""
        offload = getattr(self.engine.optimizer, "parameter_offload", None)
        coordinator = offload.get_param_coordinator() if offload is not None else None
        if coordinator is not None and not coordinator.is_invalid_trace():
            coordinator._invalidate_trace()

    def _freeze_dense(self) -> None:
        if not self._frozen:
            self._frozen = [p for p in self._dense_params if p.requires_grad]
            for p in self._frozen:
                p.requires_grad_(False)

    def _thaw_dense(self) -> None:
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen = []

    def alpha(self, step: int) -> float:
        return projector.alpha_at(step, self.config.alpha0, self.config.lam, self.config.total_steps)

    # ---- O step -----------------------------------------------------------------------------
    @torch.no_grad()
    def update_projectors(self, step: int) -> None:
        """Close the window: one RLS update per local expert and weight, exchanged as rank-1 factors."""
        start = time.perf_counter()
        alpha = self.alpha(step)
        if self.windows:  # the window's only exchange: every layer's per-global-expert partial sums, one all-reduce
            unflatten_windows_(self.windows, collectives.sum_windows_over_world_(flatten_windows(self.windows)))
        by_shape: Dict[Tuple[int, int], List[int]] = defaultdict(list)  # layers that can share collectives
        for L, layer in enumerate(self.layers):
            by_shape[(layer.ep_size, layer.num_experts)].append(L)
        for (ep_size, _), layer_ids in by_shape.items():
            local_factors = torch.cat([self._local_factors(L, alpha) for L in layer_ids], dim=1)
            all_factors = collectives.gather_factors(local_factors, ep_size)  # [M, Σn], global expert order
            offset = 0
            for L in layer_ids:
                offset = self._apply_factors(L, all_factors, offset)
        for window in self.windows:
            window.reset()
        self.prepared_step = step
        self.exchange_seconds = time.perf_counter() - start

    def _local_factors(self, L: int, alpha: float) -> torch.Tensor:
        window, layer = self.windows[L], self.layers[L]
        rows = []
        for l in range(layer.num_local_experts):
            g = self.global_expert_id(L, l)
            parts = []
            for s, stream in enumerate(layer.streams):
                # each stream's mean uses its own count: a layout may count x where it routes, h where experts run
                count = float(window.counts[s][g])
                if count > 0:
                    x_mean = projector.augmented_mean(window.sums[s][g], count, stream.has_bias)
                    parts.append(projector.rls_factor_from(self.projectors[L][s].times(l, x_mean), x_mean, alpha))
                else:  # an expert that saw no token in the window gets no update
                    parts.append(torch.zeros(stream.n, dtype=projector.PROJECTOR_DTYPE, device=layer.device))
            rows.append(torch.cat(parts))
        return torch.stack(rows)

    def _apply_factors(self, L: int, all_factors: torch.Tensor, offset: int) -> int:
        for s, stream in enumerate(self.layers[L].streams):
            self.projectors[L][s].apply_factors_(all_factors[:, offset:offset + stream.n])
            offset += stream.n
        return offset

    def _wrap_optimizer_step(self, optimizer) -> None:
        """In O steps the innermost optimizer steps the expert groups only (see optimizer_groups)."""
        original_step = optimizer.step

        def step(*args, **kwargs):
            if self.phase != "O":
                return original_step(*args, **kwargs)
            with optimizer_groups.without_groups(optimizer, self._dense_tensors) as any_left:
                return original_step(*args, **kwargs) if any_left else None

        self._wrap(optimizer, "step", step)

    def _wrap_model_step(self, engine) -> None:
        """After each applied update: close the O step (count it, thaw the dense parameters); after one
        that DeepSpeed skipped for fp16 overflow, defer it to the next step."""
        original = engine._take_model_step

        def take_model_step(*args, **kwargs):
            if self.phase != "O":
                return original(*args, **kwargs)
            skipped_before = engine.skipped_steps
            try:
                return original(*args, **kwargs)
            finally:
                self._thaw_dense()
                self._remove_projection_hooks()
                for per_layer in self.projectors:
                    for store in per_layer:
                        store.release_o_step()
                for view in self.views:
                    view.end_o_step()
                if engine.skipped_steps > skipped_before:
                    self.deferred_o_step = self.prepared_step
                else:
                    self.deferred_o_step = None
                    self.o_steps_done += 1

        self._wrap(engine, "_take_model_step", take_model_step)

    # ---- inspection -------------------------------------------------------------------------
    def global_expert_id(self, L: int, l: int) -> int:
        return self.ep_ranks[L] * self.layers[L].num_local_experts + l

    @property
    def P(self) -> List[List[torch.Tensor]]:
        """P[L][s] [E_local, n, n], this rank's experts' projectors as dense matrices (formed if factored)."""
        return [[store.dense_local() for store in per_layer] for per_layer in self.projectors]

    @property
    def S(self) -> List[List[torch.Tensor]]:
        """S[L][s] = Σ_j P_j over all experts, dense (formed if factored)."""
        return [[store.dense_sum() for store in per_layer] for per_layer in self.projectors]

    def projectors_by_global_id(self) -> Dict[str, torch.Tensor]:
        """{"layer{L}.expert{g}.{x|h}": P} for the local experts, keyed by global expert id."""
        return {expert_key(L, self.global_expert_id(L, l), STREAMS[s]): P_stack[l]
                for L, per_layer in enumerate(self.P) for s, P_stack in enumerate(per_layer)
                for l in range(P_stack.shape[0])}

    def _stores_of(self, L: int) -> List[StreamProjectors]:
        return self.projectors[L]  # looked up at each use: a checkpoint load may replace the stores

    def storage_report(self) -> List[Dict[str, object]]:
        """Per layer and stream: the form chosen, O steps stored, bytes held, what dense would hold, and the
        side the current (or last) O step projects on (None before the first O step)."""
        return [{"layer": L, "stream": STREAMS[s], "form": store.form, "o_steps": store.steps, "bytes": store.nbytes(),
                 "dense_bytes": store.dense_nbytes(), "side": (self.views[L].report(s) or {}).get("side")}
                for L, per_layer in enumerate(self.projectors) for s, store in enumerate(per_layer)]

    def side_report(self) -> List[Dict[str, object]]:
        """Per layer and stream: the projection side of the current (or last) O step, its token rows and both
        sides' multiply-adds (core/projection_side.py)."""
        return side_report(self.views, STREAMS)


def _remove(hooks) -> None:
    for hook in hooks:
        hook.remove_hooks() if hasattr(hook, "remove_hooks") else hook.remove()


def _positional_index(module, name: str) -> Optional[int]:
    """Where `name` sits among module.forward's positional parameters, or None."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional.index(name) if name in positional else None
