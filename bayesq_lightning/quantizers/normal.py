"""Standard-normal pieces of the closed-form expected distortion, shared by both quantizers."""

from __future__ import annotations

import math

import torch

SQRT2 = math.sqrt(2.0)
INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def Phi(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / SQRT2))


def phi(x: torch.Tensor) -> torch.Tensor:
    return INV_SQRT2PI * torch.exp(-0.5 * x * x)


def xphi(x: torch.Tensor) -> torch.Tensor:
    # x * phi(x) -> 0 at +-inf; keep it finite there.
    return torch.where(torch.isinf(x), torch.zeros_like(x), x * phi(x))


def cell_terms(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Standardised E[(d - z)^2 1{a < z <= b}] for z ~ N(0, 1)."""
    return (1 + d * d) * (Phi(b) - Phi(a)) - 2 * d * (phi(a) - phi(b)) + xphi(a) - xphi(b)
