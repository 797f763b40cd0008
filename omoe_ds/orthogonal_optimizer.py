"""OMoE inside a DeepSpeed engine: R/O alternation, projector state, and the O-step exchange.

Step i (engine.global_steps, counted in optimizer steps) is an O step when i % s == 0 and i > 0.
- R step: the base optimizer updates everything; expert inputs are recorded (input_capture).
- O step: before the first forward, the window's mean inputs update every local expert's
  projectors through one all-reduce (EDP) and one all-gather of rank-1 factors (EP); then the grad
  hooks project expert gradients by P̄_m and the dense parameters get lr 0 for that step, so only
  experts move while the optimizer state stays shared between both kinds of step.
"""
from __future__ import annotations

import time
from collections import defaultdict
from functools import partial
from typing import Dict, List, Tuple

import torch

from . import collectives, projector
from .config import OMoEConfig
from .grad_projection import ExpertGradProjector
from .input_capture import LayerInputWindow, flatten_windows, unflatten_windows_
from .moe_layers import MoELayerInfo, expert_key


class OMoE:
    """Attached to the engine as `engine.omoe` by `omoe_ds.initialize`."""

    def __init__(self, engine, layers: List[MoELayerInfo], config: OMoEConfig):
        self.engine, self.layers, self.config = engine, layers, config
        self.phase = "R"
        self.prepared_step = -1          # the O step whose projector update has run
        self.o_steps_done = 0
        self.projection_seconds = [0.0]  # time spent inside the grad hooks
        self.exchange_seconds = 0.0      # time of the last O-step projector update + exchange
        self.ep_ranks = [collectives.ep_rank(layer.ep_size) for layer in layers]
        self.windows = [LayerInputWindow(layer, self._is_r_step) for layer in layers]
        # P[layer][local expert][weight] and S[layer][weight] = Σ_j P_j; P starts at I, so S at M·I.
        self.P: List[List[List[torch.Tensor]]] = []
        self.S: List[List[torch.Tensor]] = []
        self._grad_projectors: List[ExpertGradProjector] = []
        for L, layer in enumerate(layers):
            self.P.append([[projector.identity_projector(self._n(lin), lin.weight.device) for lin in linears]
                           for linears in layer.local_experts])
            self.S.append([layer.num_experts * projector.identity_projector(self._n(lin), lin.weight.device)
                           for lin in layer.local_experts[0]])
            for l, linears in enumerate(layer.local_experts):
                for w, linear in enumerate(linears):
                    self._grad_projectors.append(ExpertGradProjector(
                        linear, partial(self.leave_one_out_projector, L, l, w), partial(self._pbar_bias_column, L, l, w),
                        partial(self._pbar_bias_corner, L, l, w), self._is_o_step, self.projection_seconds))
        self._forward_handle = engine.module.register_forward_pre_hook(self._before_forward)
        self._wrap_optimizer_step(engine.optimizer)

    # ---- phase ------------------------------------------------------------------------------
    @staticmethod
    def _n(linear) -> int:
        return linear.in_features + (1 if linear.bias is not None else 0)

    def _is_r_step(self) -> bool:
        return self.phase == "R"

    def _is_o_step(self) -> bool:
        return self.phase == "O"

    def _before_forward(self, module, args) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        step = self.engine.global_steps
        if self.config.is_o_step(step):
            if self.prepared_step != step:
                self.update_projectors(step)
            self.phase = "O"
        else:
            self.phase = "R"

    def alpha(self, step: int) -> float:
        return projector.alpha_at(step, self.config.alpha0, self.config.lam, self.config.total_steps)

    # ---- O step -----------------------------------------------------------------------------
    @torch.no_grad()
    def update_projectors(self, step: int) -> None:
        """Close the window: one RLS update per local expert and weight, exchanged as rank-1 factors."""
        start = time.perf_counter()
        alpha = self.alpha(step)
        by_shape: Dict[Tuple[int, int], List[int]] = defaultdict(list)  # layers that can share collectives
        for L, layer in enumerate(self.layers):
            by_shape[(layer.ep_size, layer.num_experts)].append(L)
        for (ep_size, _), layer_ids in by_shape.items():
            windows = [self.windows[L] for L in layer_ids]
            flat = collectives.sum_over_expert_replicas_(flatten_windows(windows), ep_size)
            unflatten_windows_(windows, flat)
            local_factors = torch.cat([self._local_factors(L, alpha) for L in layer_ids], dim=1)
            all_factors = collectives.gather_factors(local_factors, ep_size)  # [M, Σn], global expert order
            offset = 0
            for L in layer_ids:
                offset = self._apply_factors(L, all_factors, offset)
            for window in windows:
                window.reset()
        self.prepared_step = step
        self.o_steps_done += 1
        self.exchange_seconds = time.perf_counter() - start

    def _local_factors(self, L: int, alpha: float) -> torch.Tensor:
        window, layer = self.windows[L], self.layers[L]
        rows = []
        for l, linears in enumerate(layer.local_experts):
            count = float(window.counts[l])
            parts = []
            for w, linear in enumerate(linears):
                if count > 0:
                    x_mean = projector.augmented_mean(window.sums[w][l], count, linear.bias is not None)
                    parts.append(projector.rls_factor(self.P[L][l][w], x_mean, alpha))
                else:  # an expert that saw no token in the window gets no update
                    parts.append(torch.zeros(self._n(linear), dtype=projector.PROJECTOR_DTYPE,
                                             device=linear.weight.device))
            rows.append(torch.cat(parts))
        return torch.stack(rows)

    def _apply_factors(self, L: int, all_factors: torch.Tensor, offset: int) -> int:
        layer = self.layers[L]
        first_global = self.ep_ranks[L] * layer.num_local_experts
        for w, linear in enumerate(layer.local_experts[0]):
            n = self._n(linear)
            U = all_factors[:, offset:offset + n]
            projector.apply_factors_(self.S[L][w], U)
            for l in range(layer.num_local_experts):
                projector.apply_factors_(self.P[L][l][w], U[first_global + l:first_global + l + 1])
            offset += n
        return offset

    def _divisor(self, L: int) -> int:
        return projector.loo_divisor_value(self.config.loo_divisor, self.layers[L].num_experts)

    def leave_one_out_projector(self, L: int, l: int, w: int) -> torch.Tensor:
        """P̄ for local expert l's weight w of layer L."""
        return projector.leave_one_out_mean(self.S[L][w], self.P[L][l][w], self._divisor(L))

    def _pbar_bias_column(self, L: int, l: int, w: int) -> torch.Tensor:
        return (self.S[L][w][:-1, -1] - self.P[L][l][w][:-1, -1]) / self._divisor(L)

    def _pbar_bias_corner(self, L: int, l: int, w: int) -> torch.Tensor:
        return (self.S[L][w][-1, -1] - self.P[L][l][w][-1, -1]) / self._divisor(L)

    def _wrap_optimizer_step(self, optimizer) -> None:
        """In O steps, dense (non-expert) groups take lr 0: φ stays bit-identical, state stays shared."""
        original_step = optimizer.step

        def step(*args, **kwargs):
            if self.phase != "O":
                return original_step(*args, **kwargs)
            dense_groups = [g for g in optimizer.param_groups if not g.get("moe", False)]
            saved = [g["lr"] for g in dense_groups]
            for g in dense_groups:
                g["lr"] = 0.0
            try:
                return original_step(*args, **kwargs)
            finally:
                for g, lr in zip(dense_groups, saved):
                    g["lr"] = lr

        optimizer.step = step

    # ---- inspection -------------------------------------------------------------------------
    def global_expert_id(self, L: int, l: int) -> int:
        return self.ep_ranks[L] * self.layers[L].num_local_experts + l

    def projectors_by_global_id(self) -> Dict[str, torch.Tensor]:
        """{"layer{L}.expert{g}.{w1|w2}": P} for the local experts, keyed by global expert id."""
        return {expert_key(L, self.global_expert_id(L, l), w): P
                for L in range(len(self.layers)) for l, per_w in enumerate(self.P[L]) for w, P in enumerate(per_w)}
