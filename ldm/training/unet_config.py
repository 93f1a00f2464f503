"""train_unet.py's settings: from scratch, fine-tuning, or LoRA."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from ldm.config import ConfigError, require
from ldm.data.config import CacheConfig
from ldm.diffusion.objective import objective_of
from ldm.models.denoiser import read_denoiser_architecture
from ldm.training.config import HeldOutConfig, TrainConfig

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' LoRA scripts' default: the attention projections


@dataclass
class UNetConfig(TrainConfig, CacheConfig, HeldOutConfig):
    """train_unet.py: a text-conditioned denoiser (a UNet2DConditionModel or a PixArtTransformer2DModel) on
    the latents of a frozen VAE."""

    denoiser_config: Optional[str] = field(default=None, metadata={
        "help": "the denoiser to train from scratch: a diffusers config.json of a UNet2DConditionModel or a "
                "PixArtTransformer2DModel (configs/models/pixart_demo.json); default: unet_config"})
    unet_config: str = field(default="configs/models/unet_demo.json", metadata={
        "help": "the UNet2DConditionModel config.json to train from scratch when denoiser_config is unset"})
    pretrained_model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "fine-tune this pipeline folder/Hub id (its unet/ or transformer/) or model folder, instead of "
                "building denoiser_config"})
    pretrained_vae_model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "the frozen VAE: a train_vae.py output folder or a Hub id; default: outputs/vae, or with "
                "--lora_rank the pipeline's own"})
    text_encoder_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "a pretrained CLIP (Hub id or folder) to use frozen; default: train a tokenizer on the "
                "captions and build a text encoder from text_encoder_config, or with --lora_rank the pipeline's own"})
    text_encoder_config: str = field(default="configs/models/text_encoder_demo.json", metadata={
        "help": "CLIPTextConfig architecture of the from-scratch text encoder"})
    tokenizer_vocab_size: int = field(default=2048, metadata={"help": "BPE vocabulary of the from-scratch tokenizer"})
    tokenizer_max_length: int = field(default=77, metadata={"help": "context of the from-scratch tokenizer"})
    train_text_encoder: bool = field(default=False, metadata={
        "help": "train the from-scratch text encoder jointly (pretrained encoders stay frozen)"})
    revision: Optional[str] = field(default=None, metadata={"help": "Hub revision of the pretrained models"})
    lora_rank: Optional[int] = field(default=None, metadata={
        "help": "train LoRA adapters of this rank (arXiv 2106.09685) on the frozen pipeline of "
                "--pretrained_model_name_or_path instead of the whole UNet; writes pytorch_lora_weights.safetensors"})
    lora_alpha: Optional[float] = field(default=None, metadata={
        "help": "the adapters' output is scaled by lora_alpha / lora_rank; default: the rank (a scale of 1)"})
    lora_target_modules: Optional[list[str]] = field(default=None, metadata={
        "help": "the UNet's modules that get adapters, by name or name ending (peft's rule); default: the attention "
                f"projections {' '.join(LORA_TARGETS)}; add e.g. conv1 conv2 for the ResNet convolutions"})
    train_text_encoder_lora: bool = field(default=False, metadata={
        "help": "also train adapters on the text encoder's attention projections (its text cache is then off)"})
    lora_concept: Optional[str] = field(default=None, metadata={
        "help": "the words in the captions that call up what the adapter learnt, for the model card's instance_prompt"})
    output_dir: str = "outputs/unet"
    prediction_type: Optional[Literal["epsilon", "v_prediction", "sample", "flow_prediction"]] = field(
        default=None, metadata={"help": "what the UNet predicts: the noise, v, x0, or (flow_prediction) the velocity "
                                        "noise - x0 on x_t = (1 - sigma) x0 + sigma noise; default: the pipeline's "
                                        "of --pretrained_model_name_or_path (a LoRA must keep it), else epsilon"})
    flow_shift: Optional[float] = field(default=None, metadata={
        "help": "flow_prediction: sigma' = s sigma / (1 + (s - 1) sigma) for training and the saved sampler; "
                "above 1 trains and samples noisier (SD3 uses 3 at 1024 px); default: the pipeline's of "
                "--pretrained_model_name_or_path (a LoRA must keep it), else 1"})
    weighting_scheme: Literal["none", "sigma_sqrt", "cosmap", "logit_normal"] = field(default="none", metadata={
        "help": "flow_prediction: diffusers' SD3 loss weighting (sigma_sqrt, cosmap; with --snr_gamma 0); "
                "logit_normal is --timestep_sampling logit_normal"})
    snr_gamma: Optional[float] = field(default=5.0, metadata={"help": "min-SNR-gamma weighting; 0 or null: off"})
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    zero_terminal_snr: bool = False
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"] = field(
        default="scaled_linear", metadata={"help": "the noise schedule (diffusers' names: scaled_linear is Stable "
                                                   "Diffusion's, squaredcos_cap_v2 the cosine one); the saved "
                                                   "pipeline samples with it"})
    beta_start: float = field(default=0.00085, metadata={"help": "first beta of linear, scaled_linear and sigmoid"})
    beta_end: float = field(default=0.012, metadata={"help": "last beta of linear, scaled_linear and sigmoid"})
    num_train_timesteps: int = 1000
    timestep_sampling: Literal["uniform", "logit_normal", "importance"] = field(default="uniform", metadata={
        "help": "how training timesteps are drawn: uniform; logit_normal (SD3, --logit_mean, --logit_std); "
                "importance (p(t) from the loss history, losses reweighted to stay unbiased)"})
    logit_mean: float = 0.0
    logit_std: float = 1.0
    importance_history: int = field(default=10, metadata={
        "help": "losses kept per timestep for importance sampling; uniform until every timestep has them"})
    caption_dropout: float = field(default=0.1, metadata={"help": "share of captions replaced by '' (for CFG)"})
    cache_latents: bool = field(default=True, metadata={
        "help": "encode images (and, with a frozen text encoder, captions) once into on-disk caches; "
                "false encodes every step"})
    cache_text_embeddings: bool = field(default=True, metadata={
        "help": "with a frozen text encoder, cache its states too; false runs it in the step (token ids are "
                "~750x smaller than CLIP-L states: the choice for millions of distinct captions)"})
    streaming: bool = field(default=False, metadata={
        "help": "read the dataset as a stream (🤗 datasets streaming, split across processes by shard), "
                "for data bigger than the disk; the encoders run in the step and nothing is cached"})
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    validation_prompts: list[str] = field(default_factory=lambda: ["grinning face", "red heart"])
    validation_guidance_scale: float = 5.0
    validation_inference_steps: int = 25

    def __post_init__(self):
        super().__post_init__()
        if self.weighting_scheme == "logit_normal" and self.timestep_sampling == "uniform":
            self.timestep_sampling = "logit_normal"  # diffusers' name for the density our sampler draws
        # A LoRA adapts a whole pipeline: its VAE and text side are the pipeline's unless told otherwise.
        adapted = self.pretrained_model_name_or_path if self.lora_rank is not None else None
        if self.pretrained_vae_model_name_or_path is None:
            self.pretrained_vae_model_name_or_path = adapted or "outputs/vae"
        if adapted:
            self.text_encoder_name_or_path = self.text_encoder_name_or_path or adapted
            self.lora_target_modules = self.lora_target_modules or list(LORA_TARGETS)
        if self.pretrained_model_name_or_path is None:
            self.adopt_base_objective(None)  # a new UNet: nothing to inherit; a pipeline's is read by train()

    @property
    def architecture_file(self) -> str:
        """The config.json a from-scratch run builds its denoiser from."""
        return self.denoiser_config or self.unet_config

    @property
    def trains_text_encoder(self) -> bool:
        """Whether the text encoder changes during training (so its states cannot be cached)."""
        return self.train_text_encoder or self.train_text_encoder_lora

    def validate(self) -> None:
        super().validate()
        self.validate_lora()
        self.validate_objective()
        if self.pretrained_model_name_or_path is None:
            name = "denoiser_config" if self.denoiser_config else "unet_config"
            if not os.path.isfile(self.architecture_file):
                raise ConfigError(f"{name} {self.architecture_file!r} is not a file; give a diffusers config.json "
                                  "(see configs/models/) or --pretrained_model_name_or_path")
            read_denoiser_architecture(self.architecture_file)  # an unknown key or class fails here, not later
        if self.text_encoder_name_or_path is None and not os.path.isfile(self.text_encoder_config):
            raise ConfigError(f"text_encoder_config {self.text_encoder_config!r} is not a file")
        require(0 <= self.caption_dropout < 1, "caption_dropout", self.caption_dropout, "a fraction in [0, 1)")
        require(self.snr_gamma is None or self.snr_gamma >= 0, "snr_gamma", self.snr_gamma,
                "a positive number, or 0 or null (off)")
        for name in ("noise_offset", "input_perturbation"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "0 or more")
        for name in ("tokenizer_vocab_size", "tokenizer_max_length", "validation_inference_steps"):
            require(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        require(self.tokenizer_vocab_size > 258, "tokenizer_vocab_size", self.tokenizer_vocab_size,
                "more than 258 (256 byte tokens and 2 special tokens come first)")
        require(not (self.uses_caches and not self.center_crop), "center_crop", self.center_crop,
                "true while cache_latents is on: a random crop differs every epoch and cannot be cached")
        require(not (self.train_text_encoder and self.text_encoder_name_or_path), "train_text_encoder",
                self.train_text_encoder, "false with a pretrained text encoder, which stays frozen")
        self.validate_cache()
        self.validate_held_out()
        require(self.importance_history > 0, "importance_history", self.importance_history, "a positive integer")
        require(0 < self.beta_start < self.beta_end < 1, "beta_start, beta_end", (self.beta_start, self.beta_end),
                "0 < beta_start < beta_end < 1")
        require(self.num_train_timesteps > 1, "num_train_timesteps", self.num_train_timesteps, "2 or more")
        require(self.logit_std > 0, "logit_std", self.logit_std, "a positive number")
        require(not (self.streaming and self.max_train_samples), "max_train_samples", self.max_train_samples,
                "null with --streaming (datasets' take() does not split across processes)")
        require(not (self.streaming and self.dataloader_num_workers), "dataloader_num_workers",
                self.dataloader_num_workers, "0 with --streaming: the stream's position is saved in checkpoints "
                "for exact resume, and worker processes would hold it out of reach")
        require(not (self.streaming and self.text_encoder_name_or_path is None), "text_encoder_name_or_path",
                self.text_encoder_name_or_path, "a pretrained text encoder with --streaming: training a tokenizer "
                "on the captions would have one process read the whole stream first")

    @property
    def uses_caches(self) -> bool:
        """A stream is read once, as it comes: nothing is cached."""
        return self.cache_latents and not self.streaming

    @property
    def is_flow(self) -> bool:
        return self.prediction_type == "flow_prediction"

    def adopt_base_objective(self, base_schedule: dict | None) -> None:
        """Fill in the objective the flags leave unset from `base_schedule`, the scheduler config of the
        pipeline being fine-tuned (None for a new UNet or a UNet folder: epsilon), and check it.

        A LoRA keeps its base's objective and shift: its adapters are loaded into the base pipeline and sampled
        with the base's sampler, so a flag that says otherwise is refused. Fine-tuning the whole UNet may
        change them (the saved pipeline's scheduler then says the new ones), but only when told to."""
        kind, shift = objective_of(base_schedule)
        if self.lora_rank is not None:
            for name, base_value in (("prediction_type", kind), ("flow_shift", shift)):
                value = getattr(self, name)
                require(value is None or value == base_value, name, value, f"unset or {base_value!r}, the base "
                        f"pipeline's, with --lora_rank: adapters train for, and are sampled with, its objective")
        self.prediction_type = self.prediction_type or kind
        if self.flow_shift is None:
            self.flow_shift = shift if self.prediction_type == kind else 1.0
        self.validate_objective()

    def validate_objective(self) -> None:
        """The flow options, and the DDPM ones that mean nothing for flow. An objective left to the base
        pipeline is checked once it is known (adopt_base_objective)."""
        require(self.flow_shift is None or math.isfinite(self.flow_shift) and self.flow_shift > 0, "flow_shift",
                self.flow_shift, "a positive number (1: no shift)")
        if self.prediction_type is None:
            return
        if not self.is_flow:
            require(self.flow_shift in (None, 1.0), "flow_shift", self.flow_shift, "1 unless --prediction_type is "
                    "flow_prediction")
            require(self.weighting_scheme == "none", "weighting_scheme", self.weighting_scheme, "none unless "
                    "--prediction_type is flow_prediction (use --timestep_sampling and --snr_gamma)")
            return
        require(not self.zero_terminal_snr, "zero_terminal_snr", True, "false with flow_prediction, whose last "
                "sigma is already 1 (pure noise)")
        for name in ("beta_schedule", "beta_start", "beta_end"):
            default = type(self).__dataclass_fields__[name].default
            require(getattr(self, name) == default, name, getattr(self, name), f"unset ({default!r}) with "
                    "flow_prediction, which has no betas: --flow_shift shapes its schedule")
        require(not (self.weighting_scheme == "logit_normal" and self.timestep_sampling != "logit_normal"),
                "timestep_sampling", self.timestep_sampling, "logit_normal (or unset) with --weighting_scheme "
                "logit_normal, which draws the timesteps from that density")
        require(not (self.snr_gamma and self.weighting_scheme in ("sigma_sqrt", "cosmap")), "snr_gamma",
                self.snr_gamma, f"0 with --weighting_scheme {self.weighting_scheme}: both weight the loss")

    def validate_lora(self) -> None:
        """The LoRA settings, and the others they rule out. The target modules are checked against the
        UNet itself when it is loaded (ldm/models/lora.py)."""
        if self.lora_rank is None:
            for name in ("lora_alpha", "lora_target_modules", "lora_concept"):
                require(getattr(self, name) is None, name, getattr(self, name), "unset without --lora_rank, which "
                        "turns LoRA training on")
            require(not self.train_text_encoder_lora, "train_text_encoder_lora", True, "false without --lora_rank, "
                    "which turns LoRA training on")
            return
        require(self.lora_rank >= 1, "lora_rank", self.lora_rank, "a positive integer (the adapters' rank, such as 4)")
        if self.pretrained_model_name_or_path is None:
            raise ConfigError(f"lora_rank = {self.lora_rank} trains adapters on a pretrained pipeline: pass "
                              "--pretrained_model_name_or_path (a pipeline folder or Hub id)")
        require(self.lora_alpha is None or self.lora_alpha > 0, "lora_alpha", self.lora_alpha,
                "a positive number or null (the rank)")
        require(bool(self.lora_target_modules), "lora_target_modules", self.lora_target_modules,
                "one or more module names")
        require(not (self.train_text_encoder and self.train_text_encoder_lora), "train_text_encoder",
                self.train_text_encoder, "false with --train_text_encoder_lora: the text encoder trains either whole "
                "or through adapters, not both")
        require(not self.train_text_encoder, "train_text_encoder", self.train_text_encoder,
                "false with --lora_rank: the pipeline's text encoder stays frozen (--train_text_encoder_lora trains "
                "adapters on it)")
        require(self.text_encoder_name_or_path == self.pretrained_model_name_or_path, "text_encoder_name_or_path",
                self.text_encoder_name_or_path, f"unset or {self.pretrained_model_name_or_path!r} with --lora_rank: "
                "the adapters are loaded into that pipeline, whose text encoder must be the one they trained with")

