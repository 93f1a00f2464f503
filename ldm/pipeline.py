"""`from ldm.pipeline import LatentDiffusionPipeline`, as before the pipeline moved to
ldm/pipelines/latent_diffusion.py."""

from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline

__all__ = ["LatentDiffusionPipeline"]
