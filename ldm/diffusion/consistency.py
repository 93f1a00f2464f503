"""The student of a distillation (Luo et al. 2023, arXiv 2310.04378), as plain functions that
ldm/training/distill.py's loop and the tests share: the guidance embedding, and the student built from its
teacher. The steps along the teacher's noise path are ldm/diffusion/noise_paths.py's.

Guidance follows the pipelines' convention: a user's scale g combines the conditional and
unconditional predictions as u + g (c − u), and the UNet is told g − 1 (`timestep_cond`).
"""

from __future__ import annotations

import math

import torch
from diffusers import UNet2DConditionModel


def guidance_embedding(guidance_scale: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (N×dim) of g − 1 for each scale g, the `timestep_cond` that diffusers'
    pipelines pass to a UNet with `time_cond_proj_dim` (VDM's embedding of 1000·w)."""
    w = (guidance_scale.float() - 1.0) * 1000.0
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float32,
                                                                           device=w.device))
    angles = w[:, None] * frequencies[None, :]
    embedding = torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.nn.functional.pad(embedding, (0, dim % 2))


def student_from(teacher: UNet2DConditionModel, embedding_dim: int) -> UNet2DConditionModel:
    """The teacher's UNet with a guidance input (`time_cond_proj_dim`) whose projection starts at
    zero, so that before any training the student computes exactly what the teacher computes."""
    if teacher.config.time_cond_proj_dim is not None:
        raise ValueError(f"the teacher's UNet already has a guidance input (time_cond_proj_dim "
                         f"{teacher.config.time_cond_proj_dim}): it is distilled already")
    # without "_use_default_values", which would put back the default (None) of a field it names
    config = {key: value for key, value in teacher.config.items() if key != "_use_default_values"}
    student = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": embedding_dim})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or missing != ["time_embedding.cond_proj.weight"]:
        raise RuntimeError(f"teacher and student differ beyond the guidance input: missing {missing}, "
                           f"unexpected {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(teacher.dtype)
