"""Train, measure and serve text-to-image latent diffusion models on the Hugging Face stack.

The subpackages follow the stages of the system, and import only from the stages below them
(docs/architecture.md): data, diffusion and hub; models; pipelines; training and generation; and
the entry points on top.
"""


def __getattr__(name: str):
    # `from ldm import LatentDiffusionPipeline`, loaded on first use: `import ldm.config` stays light.
    if name == "LatentDiffusionPipeline":
        from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline

        return LatentDiffusionPipeline
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
