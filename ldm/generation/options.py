"""Which of generate.py's options a loaded model takes: the one description the web UI
(ldm/app.py) builds its form from, so a distilled model, a model with LoRA adapters or an ONNX
model shows only what applies to it.

The options themselves are GenerateConfig's fields (their help is the form's help, and
generate.py's checks are the form's checks); what varies between models is only which of them
a request may set, and which samplers fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ldm.diffusion.flow import flow_shift_of
from ldm.diffusion.schedulers import FLOW_MATCH_SCHEDULERS, SCHEDULERS, runs_flow
from ldm.generation.config import TORCH_ONLY_FLAGS, GenerateConfig

# What one request may set, in the form's order; the rest of GenerateConfig is fixed when the app starts.
REQUEST_OPTIONS = ("prompt", "negative_prompt", "scheduler", "num_inference_steps", "guidance_scale", "seed",
                   "num_images_per_prompt", "width", "height", "fast", "lora_scale")

# A distilled UNet is sampled with the sampler its method trained it for (ldm/training/distill.py):
# latent consistency with LCM (or TCD, the same student), progressive distillation with DDIM.
DISTILLED_SAMPLERS = {"lcm": ("lcm", "tcd"), "progressive": ("ddim",)}
UNDISTILLED_SAMPLERS = tuple(name for name in SCHEDULERS if name not in {"lcm", "tcd"})
FLOW_SAMPLERS = tuple(name for name in [*SCHEDULERS, *FLOW_MATCH_SCHEDULERS] if runs_flow(name))


@dataclass(frozen=True)
class ModelKind:
    """What about a loaded model changes the options it takes."""
    distillation: dict = field(default_factory=dict)  # its distillation.json (ldm/hub.read_distillation); {} if none
    lora: bool = False  # LoRA adapters loaded (--lora)
    backend: str = "torch"  # generate.py's --backend: "torch", or "onnx" (an ldm.export folder on ONNX Runtime)
    flow: bool = False  # a flow_prediction model (ldm/diffusion/flow.py), which only flow samplers can run


def model_kind(config: GenerateConfig, distillation: dict, scheduler_config) -> ModelKind:
    """The kind of the model loaded with `config`, whose saved sampler has `scheduler_config`."""
    return ModelKind(distillation=distillation, lora=config.lora is not None, backend=config.backend,
                     flow=flow_shift_of(scheduler_config) is not None)


def left_out(kind: ModelKind) -> dict[str, str]:
    """The request options that do not apply to `kind`, each with the reason the form shows."""
    reasons = {}
    if not kind.lora:
        reasons["lora_scale"] = "no LoRA adapters are loaded (start the app with --lora)"
    if kind.distillation:
        # ldm/pipelines/latent_diffusion.py: a UNet with time_cond_proj_dim takes the guidance scale as an
        # input, one pass a step
        reasons["negative_prompt"] = ("a distilled model takes the guidance scale as an input and makes no "
                                      "unconditional pass, so a negative prompt has nothing to act on")
        if kind.distillation.get("method") == "progressive":
            steps = kind.distillation["num_inference_steps"]
            reasons["num_inference_steps"] = f"a progressive student samples at exactly its own {steps} steps"
    if kind.backend == "onnx":  # generate.py refuses these flags with --backend onnx
        reasons.update({name: "an ONNX export runs as it was exported, and this needs the PyTorch pipeline"
                        for name in TORCH_ONLY_FLAGS if name in REQUEST_OPTIONS})
    return reasons


def applicable_options(kind: ModelKind) -> list[str]:
    """REQUEST_OPTIONS less those `kind` leaves out, in the form's order."""
    skipped = left_out(kind)
    return [name for name in REQUEST_OPTIONS if name not in skipped]


def samplers_for(kind: ModelKind) -> tuple[str, ...]:
    """The sampler names (ldm/diffusion/schedulers.py) that fit `kind`'s UNet."""
    if kind.flow:
        return FLOW_SAMPLERS
    method = kind.distillation.get("method")
    return DISTILLED_SAMPLERS.get(method, UNDISTILLED_SAMPLERS) if method else UNDISTILLED_SAMPLERS


def option_help(name: str) -> str:
    """The first sentence of GenerateConfig's help for `name`: what generate.py --help says."""
    text = GenerateConfig.__dataclass_fields__[name].metadata["help"]
    first, _, rest = text.partition(". ")
    return first + "." if rest else text
