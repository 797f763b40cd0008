"""A frozen nn.Linear with a routed mixture of LoRA experts, orthogonalised per token for OMoE-LoRA (paper B)."""
import math
from dataclasses import dataclass

import torch
from torch import nn

from omoe_ds.lora.orthogonal import gram_schmidt

LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class MixtureParts:
    """One forward's pieces, all but base_output flattened over tokens T: for diversity figures and tests."""
    base_output: torch.Tensor     # y0 [..., d_out], in the shape of x
    expert_outputs: torch.Tensor  # e [T, N, d_out], before orthogonalisation
    representations: torch.Tensor  # u [T, N, d_out], what is mixed (u = e for moe-lora)
    gates: torch.Tensor           # g [T, N], rows sum to 1 (zeros outside the top-k)
    eps: torch.Tensor             # ε [T, 1] of the Gram–Schmidt


class LoRAMixtureLinear(nn.Module):
    """y = W0 x (+ b) + Σ_i g_i(x) u_i(x), with e_i = (α/r) B_i A_i dropout(x), g = softmax(W_g x), u = GS(e).

    The base layer is kept as a submodule and called, never read (ZeRO-3 gathers it for its own forward).
    A_i [r, d_in] takes PEFT's LoRA init (kaiming-uniform, a=√5: nn.Linear's), B_i [d_out, r] starts at zero, so
    at init the output equals the base's bit for bit. The router is an nn.Linear(d_in, N, bias=False) with
    PyTorch's default init, fed the undropped x. Under routing="topk" all N experts are still computed and
    orthogonalised (cheap at LoRA ranks, and u then does not depend on the routing); only g is sparsified.
    Adapters of a half-precision base are kept and computed in fp32, as PEFT does for its LoRA.

    ε of the Gram–Schmidt per token is eps_relative · mean_k(y0_k²), the frozen output's squared scale (detached):
    scale-equivariant, so the same 1e-6 serves every layer, model and precision; it damps a projection only onto
    experts with ‖u_j‖ ≲ 1e-3·RMS(y0), whose contribution to y is negligible (B = 0 at init gives u = 0, not 0/0).
    A floor of finfo.tiny covers an all-zero output.
    """

    def __init__(self, base_layer: nn.Linear, r, alpha, num_experts, dropout=0.0, routing="soft", top_k=2,
                 orthogonalize=True, normalize=False, eps_relative=1e-6):
        super().__init__()
        weight = base_layer.weight
        dtype = torch.float32 if weight.dtype in LOW_PRECISION else weight.dtype
        factory = dict(dtype=dtype, device=weight.device)
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.num_experts, self.scaling = r, num_experts, alpha / r
        self.routing, self.top_k = routing, top_k
        self.orthogonalize, self.normalize, self.eps_relative = orthogonalize, normalize, eps_relative
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.out_features, r, **factory))
        self.router = nn.Linear(self.in_features, num_experts, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        with torch.no_grad():
            for expert_A in self.lora_A:  # per expert: a stacked [N, r, d_in] would get fan_in = r·d_in
                nn.init.kaiming_uniform_(expert_A, a=math.sqrt(5))
            self.lora_B.zero_()

    def gate_weights(self, x_td):
        probabilities = torch.softmax(self.router(x_td).float(), dim=-1)
        if self.routing == "topk":
            top, index = probabilities.topk(self.top_k, dim=-1)
            probabilities = torch.zeros_like(probabilities).scatter(-1, index, top / top.sum(-1, keepdim=True))
        return probabilities.to(x_td.dtype)

    def mixture_parts(self, x):
        base_output = self.base_layer(x)
        x_td = x.reshape(-1, self.in_features).to(self.lora_A.dtype)
        y0_td = base_output.reshape(-1, self.out_features).to(self.lora_A.dtype)
        hidden = torch.einsum("td,nrd->tnr", self.lora_dropout(x_td), self.lora_A)
        expert_outputs = torch.einsum("tnr,nor->tno", hidden, self.lora_B) * self.scaling
        eps = (self.eps_relative * y0_td.detach().square().mean(-1, keepdim=True)).clamp_min(
            torch.finfo(y0_td.dtype).tiny)
        representations = (gram_schmidt(expert_outputs, eps, self.normalize) if self.orthogonalize
                           else expert_outputs)
        return MixtureParts(base_output, expert_outputs, representations, self.gate_weights(x_td), eps)

    def forward(self, x):
        parts = self.mixture_parts(x)
        mixed = torch.einsum("tn,tno->to", parts.gates, parts.representations)
        return parts.base_output + mixed.reshape(parts.base_output.shape).to(parts.base_output.dtype)

    def extra_repr(self):
        kind = "omoe-lora" if self.orthogonalize else "moe-lora"
        return (f"{kind}: in={self.in_features}, out={self.out_features}, r={self.r}, experts={self.num_experts}, "
                f"scaling={self.scaling:g}, routing={self.routing}"
                + (f"(k={self.top_k})" if self.routing == "topk" else "") + f", normalize={self.normalize}")
