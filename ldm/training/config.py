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

