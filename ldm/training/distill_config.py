"""distill.py's settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from ldm.config import ConfigError, require
from ldm.data.config import CacheConfig
from ldm.training.config import HeldOutConfig, TrainConfig


@dataclass
class DistillConfig(TrainConfig, CacheConfig, HeldOutConfig):
    """distill.py: a few-step student of a trained pipeline, on the same caches as train_unet.py."""

    teacher: str = field(default="outputs/unet-demo", metadata={
        "help": "the pipeline to distill: a folder or Hub id that generate.py loads"})
    revision: Optional[str] = field(default=None, metadata={"help": "Hub revision of the teacher"})
    method: Literal["lcm", "progressive"] = field(default="lcm", metadata={
        "help": "lcm: latent consistency distillation (arXiv 2310.04378); progressive: progressive distillation "
                "(arXiv 2202.00512)"})
    num_inference_steps: int = field(default=4, metadata={
        "help": "the student's step count: the saved pipeline's default (lcm), or the count progressive "
                "distillation halves down to"})
    num_ddim_timesteps: int = field(default=50, metadata={
        "help": "lcm: the teacher's DDIM solver grid; also the most steps the student samples with (a flow "
                "teacher: one solver step spans 1/num_ddim_timesteps of its unshifted sigma range)"})
    teacher_steps: int = field(default=32, metadata={
        "help": "progressive: the DDIM steps of the first teacher; each stage halves them, down to "
                "num_inference_steps, in an equal share of max_train_steps"})
    min_guidance: float = field(default=2.0, metadata={
        "help": "the teacher's guidance scale is drawn per sample from [min_guidance, max_guidance] (the "
                "pipelines' scale: 1 is none); the student then takes any scale in it as an input"})
    max_guidance: float = 8.0
    guidance_embedding_dim: int = field(default=256, metadata={"help": "the student's time_cond_proj_dim"})
    loss_type: Literal["huber", "l2"] = field(default="huber", metadata={
        "help": "pseudo-Huber sqrt(d^2 + c^2) - c with c = huber_c, or L2"})
    huber_c: float = 0.001
    timestep_scaling: float = field(default=10.0, metadata={
        "help": "the boundary scalings' timestep scale (LCMScheduler's timestep_scaling); a flow student "
                "needs no boundary scalings"})
    learning_rate: float = 1e-5
    use_ema: bool = field(default=True, metadata={"help": "the target network is the student's EMA: always on"})
    ema_decay: float = field(default=0.95, metadata={"help": "decay of the target network, the student's EMA"})
    validation_prompts: list[str] = field(default_factory=lambda: ["grinning face", "red heart"])
    validation_guidance_scale: float = 5.0
    validation_inference_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8], metadata={
        "help": "lcm: a validation grid row per step count (progressive: the current stage's count)"})
    output_dir: str = "outputs/lcm"

    # What the shared data setup (ldm/training/latent_batches.py's training_data) reads: the teacher's encoders are
    # frozen, so a distillation always reads both caches.
    streaming = False
    uses_caches = True
    cache_text_embeddings = True
    trains_text_encoder = False

    def validate(self) -> None:
        super().validate()
        self.validate_cache()
        self.validate_held_out()
        for name in ("evaluation_steps", "inception_weights"):  # a student is measured by its held-out loss here
            require(getattr(self, name) is None, name, getattr(self, name), "null for distill.py: the bound is for "
                    "denoisers, not students; measure a student's images with python -m ldm.evaluate")
        require(self.use_ema or self.method != "lcm", "use_ema", self.use_ema,
                "true: the target network of lcm is the student's EMA")
        require(self.num_inference_steps >= 1, "num_inference_steps", self.num_inference_steps, "a positive integer")
        require(1.0 <= self.min_guidance <= self.max_guidance, "min_guidance, max_guidance",
                (self.min_guidance, self.max_guidance), "1 <= min_guidance <= max_guidance")
        require(self.guidance_embedding_dim >= 4, "guidance_embedding_dim", self.guidance_embedding_dim, "4 or more")
        require(self.huber_c > 0 and self.timestep_scaling > 0, "huber_c, timestep_scaling",
                (self.huber_c, self.timestep_scaling), "positive numbers")
        require(bool(self.validation_inference_steps) and min(self.validation_inference_steps) >= 1,
                "validation_inference_steps", self.validation_inference_steps, "one or more positive step counts")
        if self.method == "lcm":
            most = max(self.validation_inference_steps + [self.num_inference_steps])
            require(self.num_ddim_timesteps >= most, "num_ddim_timesteps", self.num_ddim_timesteps,
                    f"at least the largest step count asked for ({most}, of num_inference_steps and "
                    "validation_inference_steps): the student samples on that grid")
        else:
            halvings = self.teacher_steps / self.num_inference_steps
            require(halvings >= 2 and halvings == 2 ** round(math.log2(halvings)), "teacher_steps",
                    self.teacher_steps, f"num_inference_steps ({self.num_inference_steps}) times a power of 2 "
                    "(2, 4, 8, ...): each stage halves the steps")
            require(self.max_train_steps >= math.log2(halvings), "max_train_steps", self.max_train_steps,
                    f"at least one step per stage ({math.log2(halvings):g} stages)")


def check_teacher_schedule(teacher: str, schedule) -> None:
    """The teacher schedules the methods cannot distil, from the teacher's scheduler config."""
    if schedule.get("rescale_betas_zero_snr") and schedule.get("prediction_type") == "epsilon":
        raise ConfigError(f"teacher {teacher!r} predicts epsilon on a zero-terminal-SNR schedule: x0 cannot "
                          "be recovered from its last timestep (alpha_cumprod 0); distil a v-prediction teacher")
