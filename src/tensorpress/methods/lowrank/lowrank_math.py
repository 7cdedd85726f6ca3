"""Truncated SVD, plain and activation-aware, as pure functions.

Activation-aware truncation minimises the layer's *output* error on the calibration inputs,
``||(W - A B) X^T||_F``, instead of the weight error. With any square root ``S`` of the input
Gram matrix (``X^T X = S S^T``), ``||(W - W') X^T||_F = ||(W - W') S||_F``, so the best rank-r
``W'`` is ``(W S)_r S^-1``: truncate the SVD of ``W S``, then map back. ``S = Q diag(sqrt(l))``
from the eigendecomposition ``X^T X = Q diag(l) Q^T`` (the activations' eigenspace, as EoRA
writes it; SVD-LLM's Cholesky factor is another square root and gives the same truncation).
Eigenvalues are floored at ``damp * mean(l)`` so directions the calibration never excited keep
a small weight instead of an infinite inverse. Everything runs in float64.

ASVD's cheaper variant scales columns by per-channel activation magnitudes,
``S = diag(mean|x|^alpha)``.
"""

from __future__ import annotations

import torch


def hessian_root(xtx: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, S^-1)`` with ``S S^T = X^T X + floor``: float64 (in, in)."""
    h = xtx.double()
    h = (h + h.T) / 2
    evals, evecs = torch.linalg.eigh(h)
    floor = damp * max(evals.mean().item(), 1e-12)
    root = evals.clamp(min=floor).sqrt()
    return evecs * root[None, :], (evecs / root[None, :]).T


def channel_scales(act_abs_mean: torch.Tensor, alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """ASVD's diagonal ``(S, S^-1)`` from mean absolute activations per input channel."""
    s = act_abs_mean.double().clamp(min=1e-8).pow(alpha)
    s = s / s.mean()
    return torch.diag(s), torch.diag(1.0 / s)


def truncate(
    w: torch.Tensor, rank: int, root: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors ``(A, B)``, float32 ``(out, r)`` and ``(r, in)``, of the best rank-``rank``
    approximation of ``w``: in weight space, or in the output space that ``root = (S, S^-1)``
    defines."""
    w = w.double()
    m = w if root is None else w @ root[0]
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    rank = min(rank, s.numel())
    half = s[:rank].sqrt()
    a = u[:, :rank] * half[None, :]
    b = half[:, None] * vh[:rank]
    if root is not None:
        b = b @ root[1]
    return a.float(), b.float()


def spectrum(w: torch.Tensor, root: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Singular values (float64, descending) of ``w``, or of ``w S`` with ``root``."""
    m = w.double() if root is None else w.double() @ root[0]
    return torch.linalg.svdvals(m)


def fisher_component_costs(w: torch.Tensor, fisher: torch.Tensor, root: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Estimated LM-loss increase of dropping each SVD component of ``w`` (or of ``w S``), in
    descending order of singular value, float64 (k,).

    Component ``i`` of the decomposition contributes ``s_i u_i b_i^T`` to the weight (``b_i^T``
    the ``i``-th row of ``V^T S^-1``); with ``F`` the diagonal Fisher information of the weight,
    dropping it costs about ``1/2 sum_jk F_jk (s_i u_ji b_ki)^2`` (the cross terms between
    dropped components are ignored)."""
    m = w.double() if root is None else w.double() @ root[0]
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    b = vh if root is None else vh @ root[1]
    spread = fisher.float() @ b.float().square().T  # (out, k): sum_k F_jk b_ik^2
    return 0.5 * s.square() * (u.float().square() * spread).sum(0).double()
