"""Typed settings: dataclasses whose defaults come from a YAML file and whose values any
`--flag value` overrides. Flag names follow diffusers' example scripts.

Everything is checked here, before any model, data or process is touched: unknown keys, wrong
types and invalid values fail with a message that names the key and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Optional

import yaml
from huggingface_hub import constants, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import HfArgumentParser


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type, or out of range."""


@dataclass
class DataConfig:
    """Where image-caption pairs come from and how images are prepared."""

    dataset_name: str = field(default="openmoji", metadata={
        "help": "'openmoji' (built in), a Hub dataset id, or a local dataset folder or repository"})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "the Hub dataset's configuration"})
    train_data_dir: Optional[str] = field(default=None, metadata={
        "help": "an imagefolder with metadata.jsonl or metadata.csv; overrides dataset_name"})
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int = field(default=32, metadata={"help": "images are resized and cropped to this square size"})
    center_crop: bool = field(default=True, metadata={"help": "center crop; --center_crop false crops at random"})
    random_flip: bool = field(default=False, metadata={"help": "flip images horizontally at random"})
    validation_fraction: float = field(default=0.05, metadata={
        "help": "held-out share when the dataset has no validation split"})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "truncate the training set (debugging)"})
    dataloader_num_workers: int = 0
    cache_dir: Optional[str] = field(default=None, metadata={
        "help": "where built datasets and caches live; default $LDM_CACHE or ~/.cache/ldm"})

    def validate(self) -> None:
        require(self.resolution > 0, "resolution", self.resolution, "a positive number of pixels")
        require(0 <= self.validation_fraction < 1, "validation_fraction", self.validation_fraction,
                "a fraction in [0, 1)")
        require(self.max_train_samples is None or self.max_train_samples > 0, "max_train_samples",
                self.max_train_samples, "a positive count or null")
        require(self.dataloader_num_workers >= 0, "dataloader_num_workers", self.dataloader_num_workers,
                "0 or more")
        if self.train_data_dir is not None and not os.path.isdir(self.train_data_dir):
            raise ConfigError(f"train_data_dir {self.train_data_dir!r} is not a folder")


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
        "help": "upload the final output_dir to the Hugging Face Hub, with a model card (see ldm/hub.py)"})
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


def hub_token(explicit: str | None) -> str:
    """The token to push with: `explicit`, else HF_TOKEN or the one `hf auth login` saved."""
    token = explicit or get_token()
    if not token:
        raise ConfigError("pushing to the Hugging Face Hub needs a token with write access: log in with "
                          "`hf auth login` (formerly `huggingface-cli login`), set HF_TOKEN, or pass --hub_token")
    return token


def require_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ConfigError(f"{repo_id!r} is not a Hub repository id ('user/name' or 'name'): {error}") from None


def require(ok: bool, key: str, value, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} is invalid; expected {valid}")


def require_divisible(resolution: int, factor: int, what: str) -> None:
    """Images must tile exactly into latents: a VAE with factor f needs sizes divisible by f."""
    if resolution % factor:
        raise ConfigError(f"resolution {resolution} is not divisible by the {what} factor {factor}; "
                          f"use a multiple of {factor} such as {max(factor, resolution // factor * factor)}")


ConfigT = typing.TypeVar("ConfigT")


def parse_config(config_class: type[ConfigT], argv: list[str] | None = None) -> ConfigT:
    """`--config file.yaml` sets the defaults; any `--flag value` after it overrides them."""
    parser = HfArgumentParser(config_class)
    parser.add_argument("--config", default=None, help="YAML file of defaults (flags override it)")
    config_path = parser.parse_known_args(argv)[0].config
    if config_path:
        parser.set_defaults(**read_yaml(config_path, config_class))
    config, _namespace, unknown = parser.parse_args_into_dataclasses(
        argv, return_remaining_strings=True, look_for_args_file=False)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    config.validate()
    return config


def read_yaml(path: str, config_class: type) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of key: value, not {type(values).__name__}")
    known = [f.name for f in dataclasses.fields(config_class)]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(known)}"
            raise ConfigError(f"unknown key {key!r} in {path}{hint}")
    check_types(values, typing.get_type_hints(config_class), path)
    return values


def check_types(values: dict, hints: dict, path: str) -> None:
    """YAML values bypass argparse's conversion, so check each against its annotation."""
    for key, value in values.items():
        if not matches(value, hints[key]):
            raise ConfigError(f"{key} = {value!r} in {path} has the wrong type; expected {describe(hints[key])}")


def matches(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in args)
    if origin is Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(matches(item, args[0]) for item in value)
    if hint is type(None):
        return value is None
    if hint is float:  # YAML reads 1e-4 (no dot) as a string; argparse converts it like a flag value
        return isinstance(value, (int, float)) and not isinstance(value, bool) or is_float_text(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def is_float_text(value) -> bool:
    try:
        return isinstance(value, str) and float(value) == float(value)
    except ValueError:
        return False


def describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {describe(args[0])}"
    return "null" if hint is type(None) else hint.__name__


def run_script(main: Callable[[], object]) -> None:
    """Run a script's `main`; a ConfigError ends it as argparse's own errors do, with the message and
    exit code 2, not a traceback."""
    try:
        main()
    except ConfigError as error:
        print(f"{os.path.basename(sys.argv[0])}: error: {error}", file=sys.stderr)
        sys.exit(2)


RUN_CONFIG = "training_config.yaml"  # the resolved settings, beside every output


def save_config(config, path: str) -> None:
    """The resolved settings, as YAML that `--config` reads back."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(dataclasses.asdict(config), f, sort_keys=False)


@dataclass
class VAEConfig(TrainConfig):
    """train_vae.py: an AutoencoderKL trained with the LDM recipe (Rombach et al. 2022, appendix G)."""

    vae_config: str = field(default="configs/models/vae_demo.json", metadata={
        "help": "a diffusers AutoencoderKL config.json: the architecture to train from scratch"})
    pretrained_vae_model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "fine-tune this VAE (local folder or Hub id); its own architecture is used, not vae_config"})
    output_dir: str = "outputs/vae"
    adam_beta1: float = 0.5  # LDM's autoencoder betas (0.5, 0.9), as for GANs
    adam_beta2: float = 0.9
    reconstruction_loss: Literal["l1", "l2"] = "l1"
    kl_weight: float = field(default=1e-6, metadata={"help": "weight of the KL term on the latent posterior"})
    lpips_weight: float = field(default=0.0, metadata={
        "help": "weight of the LPIPS perceptual loss (LDM: 1.0); needs the lpips package and its weights locally"})
    use_discriminator: bool = field(default=False, metadata={"help": "add a PatchGAN discriminator (hinge loss)"})
    disc_start: int = field(default=0, metadata={"help": "optimizer step at which the discriminator switches on"})
    disc_weight: float = field(default=0.5, metadata={"help": "multiplies the adaptive GAN weight"})
    disc_learning_rate: Optional[float] = field(default=None, metadata={"help": "default: learning_rate"})
    disc_channels: int = field(default=64, metadata={"help": "width of the discriminator's first layer"})
    disc_layers: int = field(default=3, metadata={"help": "strided conv layers of the discriminator"})
    scale_batches: Optional[int] = field(default=None, metadata={
        "help": "batches (of train_batch_size, all processes together) to measure the latent scale on; "
                "default: the whole training set"})
    latent_channel_stats: bool = field(default=False, metadata={
        "help": "also write per-channel latents_mean and latents_std into the VAE's config.json"})
    max_validation_samples: Optional[int] = field(default=None, metadata={
        "help": "held-out images to compute PSNR and SSIM on; default: all of them"})
    num_validation_images: int = field(default=8, metadata={"help": "originals/reconstructions in the image grid"})

    def validate(self) -> None:
        super().validate()
        if self.pretrained_vae_model_name_or_path is None and not os.path.isfile(self.vae_config):
            raise ConfigError(f"vae_config {self.vae_config!r} is not a file; give a diffusers config.json "
                              "(see configs/models/) or --pretrained_vae_model_name_or_path")
        for name in ("kl_weight", "lpips_weight", "disc_weight", "disc_start"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "0 or more")
        for name in ("disc_channels", "disc_layers"):
            require(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        for name in ("disc_learning_rate", "scale_batches", "max_validation_samples"):
            value = getattr(self, name)
            require(value is None or value > 0, name, value, "a positive number or null")
        require(self.num_validation_images >= 0, "num_validation_images", self.num_validation_images, "0 or more")
        # The PatchGAN halves the image disc_layers times, then two 4x4 convolutions trim a pixel each.
        require(not self.use_discriminator or self.resolution // 2 ** self.disc_layers >= 3, "disc_layers",
                self.disc_layers, f"fewer layers: {self.resolution} px images shrink to nothing in the discriminator")
        require(not self.use_discriminator or self.disc_start < self.max_train_steps, "disc_start", self.disc_start,
                f"a step before max_train_steps = {self.max_train_steps}, or the discriminator never trains")


@dataclass
class CacheConfig:
    """The on-disk latent and text caches (ldm/caches.py) that train_unet.py and distill.py read."""

    cache_dtype: Literal["float16", "float32"] = field(default="float16", metadata={
        "help": "storage dtype of the caches; float16 halves disk and reads"})
    cache_chunk_rows: int = field(default=1024, metadata={
        "help": "source rows per cache file; a killed build re-encodes at most one per process"})
    cache_batch_size: int = field(default=64, metadata={
        "help": "images per VAE call while building the latent cache (lower it if the encoder runs out of memory)"})

    def validate_cache(self) -> None:
        for name in ("cache_chunk_rows", "cache_batch_size"):
            require(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' LoRA scripts' default: the attention projections


@dataclass
class UNetConfig(TrainConfig, CacheConfig):
    """train_unet.py: a text-conditioned UNet2DConditionModel on the latents of a frozen VAE."""

    unet_config: str = field(default="configs/models/unet_demo.json", metadata={
        "help": "a diffusers UNet2DConditionModel config.json: the architecture to train from scratch"})
    pretrained_model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "fine-tune this pipeline folder/Hub id (its unet/) or UNet folder, instead of unet_config"})
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
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    snr_gamma: Optional[float] = field(default=5.0, metadata={"help": "min-SNR-gamma weighting; null turns it off"})
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
    loss_bins: int = field(default=10, metadata={"help": "timestep bins the loss is logged in"})

    def __post_init__(self):
        super().__post_init__()
        # A LoRA adapts a whole pipeline: its VAE and text side are the pipeline's unless told otherwise.
        adapted = self.pretrained_model_name_or_path if self.lora_rank is not None else None
        if self.pretrained_vae_model_name_or_path is None:
            self.pretrained_vae_model_name_or_path = adapted or "outputs/vae"
        if adapted:
            self.text_encoder_name_or_path = self.text_encoder_name_or_path or adapted
            self.lora_target_modules = self.lora_target_modules or list(LORA_TARGETS)

    @property
    def trains_text_encoder(self) -> bool:
        """Whether the text encoder changes during training (so its states cannot be cached)."""
        return self.train_text_encoder or self.train_text_encoder_lora

    def validate(self) -> None:
        super().validate()
        self.validate_lora()
        if self.pretrained_model_name_or_path is None and not os.path.isfile(self.unet_config):
            raise ConfigError(f"unet_config {self.unet_config!r} is not a file; give a diffusers config.json "
                              "(see configs/models/) or --pretrained_model_name_or_path")
        if self.text_encoder_name_or_path is None and not os.path.isfile(self.text_encoder_config):
            raise ConfigError(f"text_encoder_config {self.text_encoder_config!r} is not a file")
        require(0 <= self.caption_dropout < 1, "caption_dropout", self.caption_dropout, "a fraction in [0, 1)")
        require(self.snr_gamma is None or self.snr_gamma > 0, "snr_gamma", self.snr_gamma, "a positive number or null")
        for name in ("noise_offset", "input_perturbation"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "0 or more")
        for name in ("tokenizer_vocab_size", "tokenizer_max_length", "validation_inference_steps", "loss_bins"):
            require(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        require(self.tokenizer_vocab_size > 258, "tokenizer_vocab_size", self.tokenizer_vocab_size,
                "more than 258 (256 byte tokens and 2 special tokens come first)")
        require(not (self.uses_caches and not self.center_crop), "center_crop", self.center_crop,
                "true while cache_latents is on: a random crop differs every epoch and cannot be cached")
        require(not (self.train_text_encoder and self.text_encoder_name_or_path), "train_text_encoder",
                self.train_text_encoder, "false with a pretrained text encoder, which stays frozen")
        self.validate_cache()
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

    def validate_lora(self) -> None:
        """The LoRA settings, and the others they rule out. The target modules are checked against the
        UNet itself when it is loaded (ldm/lora.py)."""
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


@dataclass
class DistillConfig(TrainConfig, CacheConfig):
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
        "help": "lcm: the teacher's DDIM solver grid; also the most steps the student samples with"})
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
        "help": "the boundary scalings' timestep scale (LCMScheduler's timestep_scaling)"})
    learning_rate: float = 1e-5
    use_ema: bool = field(default=True, metadata={"help": "the target network is the student's EMA: always on"})
    ema_decay: float = field(default=0.95, metadata={"help": "decay of the target network, the student's EMA"})
    validation_prompts: list[str] = field(default_factory=lambda: ["grinning face", "red heart"])
    validation_guidance_scale: float = 5.0
    validation_inference_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8], metadata={
        "help": "lcm: a validation grid row per step count (progressive: the current stage's count)"})
    output_dir: str = "outputs/lcm"

    # What the shared data setup (ldm/unet_training.training_data) reads: the teacher's encoders are
    # frozen, so a distillation always reads both caches.
    streaming = False
    uses_caches = True
    cache_text_embeddings = True
    trains_text_encoder = False

    def validate(self) -> None:
        super().validate()
        self.validate_cache()
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
