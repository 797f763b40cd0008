"""Per-token modified Gram–Schmidt across the expert axis, the orthogonalisation of OMoE-LoRA (paper B).

Written by hand: no library orthogonalises a mixture's expert outputs per token with a damped, differentiable MGS.
"""
import torch


def gram_schmidt(expert_outputs, eps, normalize=False):
    """Orthogonalise N expert outputs per token, in the fixed expert order 1…N, by modified Gram–Schmidt.

    expert_outputs: [T, N, d] (e_i of every token); eps: [T, 1] or a float, ε of the projections. Returns u [T, N, d]
    with u_1 = e_1 and, for each later i, the running residual v ← v − (⟨v, u_j⟩ / (⟨u_j, u_j⟩ + ε)) u_j for
    j = 1…i−1 (the modified form: stable where classical GS loses orthogonality). When ‖u_j‖² ≫ ε this is
    u_i = R_ii q_i of the thin QR [e_1 … e_N] = Q R, with no sign ambiguity (a sign flip of q_i flips R_ii too).

    normalize=True then rescales each u_i ← u_i / (‖u_i‖ + √ε), i.e. sign(R_ii) q_i · |R_ii| / (|R_ii| + √ε):
    orthonormal where ‖u_i‖ ≫ √ε (the Stiefel manifold of paper B's abstract). The projections run on the
    unnormalised residuals, so ε keeps one unit (that of ‖u‖²) and √ε that of a norm. It is off by default: LoRA's
    B starts at zero so that training starts exactly at the base model and the adapter's output grows smoothly
    from 0, scaled by α/r. Unnormalised GS keeps that (the identity on e_1, and near e = 0 each u_i is e_i minus
    projections of the same order), while normalisation jumps each expert to unit norm as soon as ‖e_i‖ ≫ √ε
    (a gradient of order 1/√ε at B = 0), fixes the adapter's magnitude at ≤ 1 whatever α/r or the layer's output
    scale, and makes the output blind to the scale of B.

    Row-oriented loop over experts (N ≤ 8): once u_j is final, its projection leaves every later residual at once.
    These are the same floating-point operations, in the same order per vector, as the textbook MGS loop.
    """
    num_experts = expert_outputs.shape[1]
    eps = torch.as_tensor(eps, dtype=expert_outputs.dtype, device=expert_outputs.device)
    eps_col = eps.reshape(-1, 1, 1) if eps.dim() else eps
    residual = expert_outputs
    orthogonal = []
    for j in range(num_experts):
        u = residual[:, :1]  # [T, 1, d], final
        orthogonal.append(u)
        if j + 1 < num_experts:
            later = residual[:, 1:]
            coefficient = (later * u).sum(-1, keepdim=True) / ((u * u).sum(-1, keepdim=True) + eps_col)
            residual = later - coefficient * u
    orthogonal = torch.cat(orthogonal, dim=1)
    if normalize:
        orthogonal = orthogonal / (orthogonal.norm(dim=-1, keepdim=True) + eps_col.sqrt())
    return orthogonal
