"""What every training script shares: output, optimisation, precision, checkpoints, logging, the Hub."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from huggingface_hub import constants

from ldm.config import ConfigError, require
from ldm.data.config import DataConfig
from ldm.hub.push import hub_token, require_repo_id


@dataclass
class TrainConfig(DataConfig):
    """What every training script shares: output, optimisation, precision, checkpoints, logging."""

    output_dir: str = "outputs/run"
    seed: int = 0
    train_batch_size: int = 16
    max_train_steps: int = 1000
    learning_rate: float = 1e-4
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial"] = "constant_with_warmup"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping; 0 turns it off"})
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    use_ema: bool = False
    ema_decay: float = 0.999
    checkpointing_steps: int = 500
    checkpoints_total_limit: Optional[int] = None
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "'latest' or a checkpoint folder"})
    save_on_signal: bool = field(default=True, metadata={
        "help": "on SIGTERM, SIGINT (Ctrl-C) or SIGUSR1, finish the step, save a checkpoint and exit with 128 + "
                "the signal's number (143, 130, 138); a second signal stops at once"})
    validation_steps: int = 500
    logging_dir: str = field(default="logs", metadata={"help": "TensorBoard folder, relative to output_dir"})
    report_to: Literal["tensorboard", "none"] = "tensorboard"
    push_to_hub: bool = field(default=False, metadata={
        "help": "upload the final output_dir to the Hugging Face Hub, with a model card (see ldm/hub/)"})
    hub_model_id: Optional[str] = field(default=None, metadata={
        "help": "the repository to push to: 'user/name', or 'name' under your account; default: output_dir's name"})
    hub_private: bool = field(default=False, metadata={"help": "create the repository private"})
    hub_token: Optional[str] = field(default=None, repr=False, metadata={
        "help": "default: HF_TOKEN or the token `hf auth login` saved; never written to configs or logs"})
    hub_license: Optional[str] = field(default=None, metadata={
        "help": "the model card's license id; default: cc-by-sa-4.0 for openmoji (the data's), else 'other'"})

    def __post_init__(self):
        # The token leaves the settings at once, so nothing that writes or logs them (training_config.yaml,
        # checkpoints, TensorBoard's hparams) can leak it; `hub_credentials()` hands it to the push.
        self._hub_token, self.hub_token = self.hub_token, None

    def hub_credentials(self) -> str:
        return hub_token(self._hub_token)

    def hub_repo_id(self) -> str:
        return self.hub_model_id or os.path.basename(os.path.normpath(self.output_dir))

    def validate(self) -> None:
        super().validate()
        if self.push_to_hub:  # checked now: the push comes at the end of the run
            self.hub_credentials()
            if constants.is_offline_mode():
                raise ConfigError("push_to_hub needs the Hub, but HF_HUB_OFFLINE is set")
            require_repo_id(self.hub_repo_id())
        for name in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps",
                     "checkpointing_steps", "validation_steps"):
            require(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        require(self.learning_rate > 0, "learning_rate", self.learning_rate, "a positive number")
        require(self.lr_warmup_steps >= 0, "lr_warmup_steps", self.lr_warmup_steps, "0 or more")
        require(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, "0 (off) or more")
        require(0 < self.ema_decay < 1, "ema_decay", self.ema_decay, "a number in (0, 1)")
        require(self.checkpoints_total_limit is None or self.checkpoints_total_limit > 0,
                "checkpoints_total_limit", self.checkpoints_total_limit, "a positive count or null")



@dataclass
class HeldOutConfig:
    """What the denoiser trainers (train_unet.py, distill.py) measure on held-out data, on draws fixed
    once so that every evaluation and every checkpoint sees the same ones (ldm/training/evaluation.py)."""

    validation_loss_samples: int = field(default=256, metadata={
        "help": "held-out images (of the validation split, through the latent cache) whose loss, at fixed noise "
                "and timesteps, is logged every validation_steps and at the end, overall and per timestep bin; "
                "0 turns it off"})
    evaluation_steps: Optional[int] = field(default=None, metadata={
        "help": "every this many steps also the latent bits/dim bound (and KID with --inception_weights); the "
                "bound is computed at the end of every run that has held-out images"})
    bound_samples: int = field(default=64, metadata={"help": "held-out images the likelihood bound is taken over"})
    bound_strata: int = field(default=32, metadata={
        "help": "timestep strata of the bound's estimate: one UNet call each per image, plus one"})
    inception_weights: Optional[str] = field(default=None, metadata={
        "help": "a local Inception file (torch-fidelity's weights-inception-2015-12-05-6726825d.pth): with "
                "--evaluation_steps, KID of kid_samples generated images against as many held-out ones"})
    kid_samples: int = field(default=64, metadata={"help": "images generated for KID during training"})
    loss_bins: int = field(default=10, metadata={
        "help": "timestep bins the training and held-out losses are logged in"})

    def validate_held_out(self) -> None:
        require(self.validation_loss_samples >= 0, "validation_loss_samples", self.validation_loss_samples,
                "0 (off) or a positive count")
        require(self.evaluation_steps is None or self.evaluation_steps > 0, "evaluation_steps",
                self.evaluation_steps, "a positive number of steps or null")
        for name in ("bound_samples", "bound_strata", "loss_bins"):
            require(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        require(self.kid_samples >= 2, "kid_samples", self.kid_samples, "2 or more (KID compares pairs)")
        if self.inception_weights is not None and not os.path.isfile(self.inception_weights):
            raise ConfigError(f"inception_weights {self.inception_weights!r} is not a file; give torch-fidelity's "
                              "weights-inception-2015-12-05-6726825d.pth, or leave it unset")
        require(self.inception_weights is None or self.evaluation_steps is not None, "inception_weights",
                self.inception_weights, "set together with --evaluation_steps, which says when KID is computed")
