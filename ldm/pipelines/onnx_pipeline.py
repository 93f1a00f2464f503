"""OnnxLatentDiffusionPipeline: LatentDiffusionPipeline's text-to-image recipe with its three models
run by ONNX Runtime, from a folder `python -m ldm.export onnx` wrote (ldm/export.py).

The recipe itself is LatentDiffusionPipeline's: the same prompt batching and guidance layout, the
same initial noise from the same generators (diffusers' `randn_tensor`, on the CPU), the same
diffusers scheduler stepping in torch, the same latent denormalisation and postprocessing. Only the
text encoder, UNet and VAE decoder calls go to ONNX Runtime, through the small adapters below that
take and return torch tensors, so a seed draws the same image as the PyTorch pipeline, up to the
runtimes' float rounding.

    pipe = OnnxLatentDiffusionPipeline.from_pretrained("outputs/unet-demo-onnx")
    pipe.set_scheduler("euler_a")
    image = pipe("grinning face", generator=torch.Generator().manual_seed(0)).images[0]
"""

from __future__ import annotations

import importlib.util
import json
import os

import diffusers
import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict
from transformers import CLIPTokenizer

from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline

NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(int32)": np.int32, "tensor(int64)": np.int64}
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "tokenizer", "scheduler")
MANIFEST = "onnx_export.json"  # written last by ldm/export.py: what made the export


class OnnxModel:
    """One exported model in an ONNX Runtime session, fed and answering torch tensors."""

    dtype = torch.float32

    def __init__(self, folder: str, providers: list[str], session_options=None):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(os.path.join(folder, "model.onnx"), session_options,
                                                    providers=providers)
        self.input_types = {node.name: NUMPY_TYPES[node.type] for node in self.session.get_inputs()}
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as file:
            self.config = FrozenDict(json.load(file))

    def run(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        feeds = {name: value.detach().cpu().numpy().astype(self.input_types[name], copy=False)
                 for name, value in inputs.items() if value is not None}
        return [torch.from_numpy(output) for output in self.session.run(None, feeds)]


class OnnxTextEncoder(OnnxModel):
    def __call__(self, input_ids: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(self.run(input_ids=input_ids))


class OnnxUNet(OnnxModel):
    def __init__(self, folder: str, providers: list[str], session_options=None):
        super().__init__(folder, providers, session_options)
        # Tracing fixed whether the upsamplers are told their output size: only latent sides that
        # halve evenly at every downsampler come out right.
        self.latent_multiple = 2 ** (len(self.config.block_out_channels) - 1)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 timestep_cond: torch.Tensor | None = None, cross_attention_kwargs: dict | None = None,
                 return_dict: bool = False) -> tuple[torch.Tensor]:
        timestep = torch.as_tensor(timestep).reshape(-1).expand(sample.shape[0])
        return tuple(self.run(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                              timestep_cond=timestep_cond))


class OnnxVaeDecoder(OnnxModel):
    def decode(self, latents: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        return tuple(self.run(latent_sample=latents))


class OnnxLatentDiffusionPipeline(LatentDiffusionPipeline):
    """Text-to-image with ONNX Runtime: `text_encoder`, `unet` and `vae` (the decoder) are sessions
    over the exported graphs; `tokenizer` and `scheduler` are the usual transformers and diffusers
    objects (swap samplers with `set_scheduler`). Editing, LoRA and fast mode need the PyTorch models
    and are not offered; `vae_encoder/` is exported for diffusers' ONNX img2img pipeline, not used here."""

    @classmethod
    def from_pretrained(cls, folder: str, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                        session_options=None) -> OnnxLatentDiffusionPipeline:
        """The pipeline in `folder`, an ldm.export output. Raises ValueError naming what is missing."""
        check_export_folder(folder)
        providers = list(providers)
        return cls(vae=OnnxVaeDecoder(os.path.join(folder, "vae_decoder"), providers, session_options),
                   text_encoder=OnnxTextEncoder(os.path.join(folder, "text_encoder"), providers, session_options),
                   tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
                   unet=OnnxUNet(os.path.join(folder, "unet"), providers, session_options),
                   scheduler=load_scheduler(folder))

    def check_inputs(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, height, width, *args):
        super().check_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, height, width, *args)
        self.check_size(height, width)

    def check_size(self, height: int, width: int) -> None:
        """Sizes the traced UNet draws correctly; others would fail deep in ONNX Runtime, or worse."""
        pixels = self.vae_scale_factor * self.unet.latent_multiple
        for name, size in (("height", height), ("width", width)):
            if size % pixels:
                raise ValueError(f"{name} {size} does not fit this ONNX UNet: tracing fixed its upsampling for "
                                 f"latent sides that are multiples of {self.unet.latent_multiple}, so sizes must be "
                                 f"multiples of {pixels} pixels (try {max(size // pixels, 1) * pixels})")

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                 height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 eta: float = 0.0, output_type: str = "pil", return_dict: bool = True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: list[str] = ("latents",), watermark: bool = False):
        """LatentDiffusionPipeline.__call__ for text-to-image: the same arguments, meanings and results."""
        return super().__call__(
            prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, height=height, width=width,
            num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, eta=eta,
            output_type=output_type, return_dict=return_dict, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, watermark=watermark)


def load_scheduler(folder: str):
    """The scheduler saved in `folder`/scheduler, of the diffusers class its config names."""
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), encoding="utf-8") as file:
        class_name = json.load(file)["_class_name"]
    return getattr(diffusers, class_name).from_pretrained(folder, subfolder="scheduler")


def check_export_folder(folder: str) -> None:
    if importlib.util.find_spec("onnxruntime") is None:
        raise ValueError('running an ONNX export needs the onnxruntime package: pip install -e ".[onnx]"')
    if not os.path.isdir(folder):
        raise ValueError(f"ONNX model folder {folder} does not exist")
    if not os.path.isfile(os.path.join(folder, MANIFEST)):
        hint = (" (it is a PyTorch pipeline: export it with `python -m ldm.export onnx` first)"
                if os.path.isfile(os.path.join(folder, "model_index.json")) else "")
        raise ValueError(f"{folder} is not an ONNX export: it has no {MANIFEST}{hint}")
    for name in COMPONENTS:
        if not os.path.isdir(os.path.join(folder, name)):
            raise ValueError(f"ONNX export {folder} lacks its {name}/ folder")
