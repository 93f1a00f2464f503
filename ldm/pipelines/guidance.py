"""Helpers of classifier-free guidance."""

from __future__ import annotations

import torch


def rescale_guidance(guided: torch.Tensor, conditional: torch.Tensor, phi: float) -> torch.Tensor:
    """Match the guided prediction's per-sample standard deviation to the conditional one's, then
    blend by φ (https://arxiv.org/abs/2305.08891, §3.4, eq. 15-16): large guidance weights inflate
    the prediction's scale, which shows as over-saturated images."""
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1.0 - phi) * guided
