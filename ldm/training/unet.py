"""train_unet.py's work: a text-conditioned denoiser trained on the latents of a frozen VAE, exported with
its VAE and text side as a pipeline folder. The denoiser is a UNet2DConditionModel (a LatentDiffusionPipeline
folder, which StableDiffusionPipeline loads) or a PixArt-style PixArtTransformer2DModel (a
LatentTransformerPipeline folder, which PixArtAlphaPipeline loads); ldm/models/denoiser.py calls either.

`train` is the one training loop. With `cache_latents` (the default) the frozen VAE, and a frozen
text encoder, run once over the data into chunked on-disk caches (ldm/data/caches.py) that every process
helps build and memory-maps. With `--streaming` (ldm/data/streaming.py) or `--cache_latents false` the
encoders run on every batch instead, as diffusers' train_text_to_image.py does.

With `--lora_rank` the pretrained pipeline stays frozen and only LoRA adapters on its UNet (and text
encoder) train (ldm/models/lora.py); the run then ends with the adapter file instead of a pipeline folder.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler
from tqdm.auto import tqdm
from transformers import CLIPTokenizer

from ldm.config import ConfigError, require_divisible
from ldm.data.captions import caption_list, tokenize
from ldm.data.dataset import SkipCounter, load_splits
from ldm.data.streaming import open_stream
from ldm.diffusion import objective
from ldm.diffusion.timesteps import ImportanceTimesteps, mass_by_bin, timestep_sampler
from ldm.hub.files import find_model
from ldm.models.architecture import vae_scale_factor, vae_subfolder
from ldm.models.denoiser import build_denoiser, check_text_width, denoise, is_transformer, load_pretrained_denoiser
from ldm.models.lora import (
    TEXT_ENCODER_TARGETS,
    add_adapters,
    check_targets,
    is_adapted,
    keep_only_adapters_in_checkpoints,
    save_adapters,
)
from ldm.models.text import build_text_encoder, load_text_components, train_tokenizer
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.pipelines.latent_transformer import pipeline_for
from ldm.training.checkpoints import find_checkpoint, save_run_config
from ldm.training.evaluation import HeldOutImages, evaluation_due, held_out_images, log_held_out, summary
from ldm.training.latent_batches import cached_empty_prompt, encode_captions, posterior, training_data
from ldm.training.loop import (
    Throughput,
    apply_gradients,
    averaged_weights,
    batch_generator,
    check_finite,
    checkpoint_or_stop,
    finish_run,
    finish_training,
    make_accelerator,
    make_ema,
    make_optimizer,
    report_step,
    stop_on_signal,
    trainable_parameters,
)
from ldm.training.preemption import StopOnSignal
from ldm.training.unet_config import UNetConfig
from ldm.training.validation import sample_grid, save_validation_grid

logger = get_logger(__name__)
UNREADABLE_BATCHES = 100  # in a row, before the run stops instead of skipping on forever


def train(config: UNetConfig) -> dict:
    """Cache, train, validate, checkpoint, and save the pipeline (or the LoRA adapters). Returns the final numbers."""
    # 1. Everything that can be checked is checked before anything expensive.
    resuming = find_checkpoint(config.resume_from_checkpoint, config.output_dir) is not None
    if config.lora_rank:
        check_lora_base(config)
    config.adopt_base_objective(base_schedule(config))
    vae = load_frozen_vae(config)
    require_divisible(config.resolution, vae_scale_factor(vae.config), "VAE")
    unet = load_denoiser(config)  # named for the UNet it usually is; a transformer trains the same way
    if config.lora_rank:
        check_targets(unet, config.lora_target_modules)
    accelerator = make_accelerator(config, "train_unet")
    if accelerator.is_main_process:
        save_run_config(config, config.output_dir)
    train_rows, held_out_rows = (open_stream(config), None) if config.streaming else load_splits(config)
    tokenizer, text_encoder = text_side(config, train_rows, accelerator, resuming)
    check_text_width(unet, text_encoder)
    padding_eos = tokenizer.eos_token_id if is_transformer(unet) else None  # a transformer masks the padding
    noise_scheduler = objective.noise_scheduler(config.prediction_type, config.zero_terminal_snr, config.beta_schedule,
                                                config.beta_start, config.beta_end, config.num_train_timesteps,
                                                config.flow_shift)
    vae.to(accelerator.device)
    text_encoder.to(accelerator.device)

    # 2. Data: cached latents (and text embeddings), a stream, or images encoded in the step.
    data = training_data(config, accelerator, train_rows, vae, tokenizer, text_encoder, padding_eos)
    held_out = held_out_images(config, accelerator, held_out_rows, vae, resuming)
    empty_ids = tokenize(tokenizer, [""]).to(accelerator.device)
    empty = cached_empty_prompt(text_encoder, empty_ids, config.cache_dtype, padding_eos) if data.texts_cached \
        else None

    # 3. Models and optimizer: the UNet, and the text encoder when it trains jointly; for LoRA, adapters
    # on both instead, their bases frozen. Only trainable weights reach the optimizer and the EMA.
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    text_encoder.requires_grad_(config.train_text_encoder)
    if config.lora_rank:
        # Seeded here: building the caches draws from the global generator as many times as this process
        # encoded chunks, so without it the adapters' start would depend on whether the cache was warm.
        torch.manual_seed(config.seed)
        add_adapters(unet, config.lora_rank, config.lora_alpha, config.lora_target_modules)
        if config.train_text_encoder_lora:
            add_adapters(text_encoder, config.lora_rank, config.lora_alpha, TEXT_ENCODER_TARGETS)
    unet.train()
    text_encoder.train(config.trains_text_encoder)
    trained = [unet] + ([text_encoder] if config.trains_text_encoder else [])
    optimizer, lr_scheduler = make_optimizer([p for m in trained for p in trainable_parameters(m)], config,
                                             accelerator, optimizer_class=adam_class(config))
    ema = make_ema(unet, config, accelerator)
    timesteps_from = timestep_sampler(config.timestep_sampling, config.num_train_timesteps, config.logit_mean,
                                      config.logit_std, config.importance_history, accelerator.gather)
    if isinstance(timesteps_from, ImportanceTimesteps):
        accelerator.register_for_checkpointing(timesteps_from)  # its loss history: resume stays exact
    # A stream (data.loader None) stays out of Accelerate: each process reads its own shards.
    *models, optimizer, lr_scheduler, data.loader = accelerator.prepare(*trained, optimizer, lr_scheduler, data.loader)
    unet = models[0]
    if config.trains_text_encoder:
        text_encoder = models[1]
    if config.lora_rank:
        keep_only_adapters_in_checkpoints(accelerator, accelerator.unwrap_model(unet), accelerator.unwrap_model(
            text_encoder) if config.train_text_encoder_lora else None)
    parameters = [p for m in models for p in trainable_parameters(m)]

    # 4. Resume: weights, optimizer, schedule, EMA, RNG states, step, and position in the data.
    global_step, batches = data.resume(accelerator, config)

    # 5. The loop.
    skipped, meter, bins = SkipCounter(), Throughput(), {}
    progress = tqdm(total=config.max_train_steps, initial=global_step, desc="train_unet",
                    disable=not accelerator.is_local_main_process)
    running, micro_batches, seen, unreadable_batches, stopping = 0.0, 0, 0, 0, False
    # A stop signal from here on is deferred: in the loop it ends the run after the step in progress,
    # with a checkpoint; after the loop, the final save completes.
    with StopOnSignal(config.save_on_signal) as stop:
        for batch_number, batch in batches:
            if global_step >= config.max_train_steps:
                break
            if "indices" in batch:  # images decoded in the step: count the unreadable ones
                skipped.update(batch)
                unreadable_batches = 0 if batch["indices"] else unreadable_batches + 1
                if unreadable_batches == UNREADABLE_BATCHES:
                    raise ConfigError(f"{UNREADABLE_BATCHES} batches in a row had no readable image (last: rows "
                                     f"{batch['skipped'][:8]}...): check image_column and the data")
                if not batch["indices"]:
                    continue  # every image of this batch was unreadable
            generator = batch_generator(config.seed, accelerator.process_index, batch_number, accelerator.device)
            with accelerator.accumulate(*models):
                mean, std = posterior(vae, batch)
                latents = objective.normalise_latents(mean + std * torch.randn(
                    mean.shape, generator=generator, device=mean.device), vae.config)
                noise = objective.sample_noise(latents, config.noise_offset, generator)
                timesteps, importance = timesteps_from.sample(latents.shape[0], generator)
                noisy = objective.noised(noise_scheduler, latents, noise, timesteps, config.input_perturbation,
                                         generator)
                conditioning = encode_captions(batch, tokenizer, text_encoder, empty, empty_ids,
                                               config.caption_dropout, generator, padding_eos)
                prediction = denoise(unet, noisy, objective.model_timesteps(noise_scheduler, timesteps), conditioning)
                target = objective.target(noise_scheduler, latents, noise, timesteps)
                per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                weights = objective.loss_weights(noise_scheduler, timesteps, config.snr_gamma, config.weighting_scheme)
                loss = (importance * weights * per_sample).mean()
                check_finite(accelerator.reduce(loss.detach(), "mean"), global_step + 1)

                apply_gradients(accelerator, loss, parameters, optimizer, lr_scheduler, config.max_grad_norm)

            timesteps_from.update(timesteps, (weights * per_sample).detach())
            add_bins(bins, per_sample.detach(), timesteps, noise_scheduler, config.loss_bins)
            running += loss.item()
            micro_batches += 1
            seen += latents.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if ema is not None:
                ema.step(trainable_parameters(accelerator.unwrap_model(unet)))
            meter.update(seen)
            report_step(accelerator, progress, meter, running / micro_batches, lr_scheduler.get_last_lr()[0],
                        global_step)
            running, micro_batches, seen = 0.0, 0, 0

            stopping = checkpoint_or_stop(accelerator, config, global_step, stop, meter, data.add_checkpoint_files)
            if stopping:
                break
            validating = global_step % config.validation_steps == 0
            if global_step < config.max_train_steps and (validating or evaluation_due(config, global_step)):
                if validating:
                    log_bins(accelerator, bins, timesteps_from, config.loss_bins, global_step)
                    bins = {}
                validate(accelerator, config, vae, tokenizer, text_encoder, unet, ema, noise_scheduler, global_step,
                         held_out, grid=validating)
                meter.restart()
        progress.close()
        if stopping:
            stop_on_signal(accelerator, stop, global_step, config.output_dir, *models)

        # 6. The final pipeline (or LoRA adapters), with the EMA weights when there are some. The unreadable
        # images are counted first: a collective's Python tensor freed on gloo's thread while the process
        # group is torn down deadlocks both (see finish_training), so the last such collective is not the last one.
        unreadable = data.unreadable(skipped, accelerator)
        accelerator.wait_for_everyone()
        log_bins(accelerator, bins, timesteps_from, config.loss_bins, global_step)
        final = {}
        if accelerator.is_main_process:
            with exported_pipeline(accelerator, vae, tokenizer, text_encoder, unet, ema, noise_scheduler) as pipeline:
                save_model(pipeline, config)
                if config.validation_prompts:
                    save_validation_grid(sample_grid(pipeline, config, accelerator.device), config.output_dir,
                                         accelerator, global_step, "samples")
                if held_out is not None:
                    final = log_held_out(accelerator, held_out, global_step,
                                         lambda: held_out.loss(pipeline, noise_scheduler),
                                         lambda: held_out.bound(pipeline, noise_scheduler), kid_of(held_out, pipeline))
        saved = "LoRA adapters" if config.lora_rank else "pipeline"
        logger.info(f"skipped {unreadable} unreadable image(s); saved the {saved} to {config.output_dir}",
                    main_process_only=True)
        finish_training(accelerator, *models)
        result = {"global_step": global_step, "unreadable_images": unreadable, "images_per_second": meter.rate,
                  **summary(held_out, final)}
        if accelerator.is_main_process:
            finish_run(config, result)
        return result



def load_frozen_vae(config: UNetConfig) -> AutoencoderKL:
    """The VAE of a train_vae.py output, a pipeline (its vae/) or a Hub id of either, in eval mode with
    gradients off."""
    path = config.pretrained_vae_model_name_or_path
    subfolder = vae_subfolder(path, config.revision, "pretrained_vae_model_name_or_path")
    vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder, revision=config.revision)
    return vae.eval().requires_grad_(False)


def load_denoiser(config: UNetConfig) -> torch.nn.Module:
    """A pretrained denoiser (a pipeline's `unet/` or `transformer/`, or a model folder) to fine-tune, or a new one."""
    source = config.pretrained_model_name_or_path
    if source is None:
        return build_denoiser(config.architecture_file, config.seed)
    return load_pretrained_denoiser(source, config.revision)


def check_lora_base(config: UNetConfig) -> None:
    """LoRA adapters are trained for, and loaded into, a whole pipeline, whose VAE and text side the run
    also takes by default: a UNet folder alone will not do."""
    found = find_model(config.pretrained_model_name_or_path, config.revision)
    if not found.is_pipeline:
        raise ConfigError(f"pretrained_model_name_or_path {config.pretrained_model_name_or_path!r} holds a "
                          f"{found.class_name}, not a pipeline: LoRA adapts a whole pipeline (model_index.json, "
                          "unet/, text_encoder/, tokenizer/, vae/)")
    if "transformer" in dict(found.components):
        raise ConfigError(f"lora_rank {config.lora_rank}: {config.pretrained_model_name_or_path!r} is a transformer "
                          "pipeline, and PixArtTransformer2DModel has no LoRA support in diffusers (no "
                          "PeftAdapterMixin); fine-tune it whole (without --lora_rank) or adapt a UNet pipeline")


def base_schedule(config: UNetConfig) -> dict | None:
    """The scheduler config of the pipeline being fine-tuned, which says its objective; None for a new UNet or a
    UNet folder."""
    source = config.pretrained_model_name_or_path
    if source is None or not find_model(source, config.revision).is_pipeline:
        return None
    return dict(DDPMScheduler.load_config(source, subfolder="scheduler", revision=config.revision))


def text_side(config: UNetConfig, train_rows, accelerator: Accelerator, resuming: bool):
    """(tokenizer, text encoder): pretrained, or a BPE tokenizer trained on the training captions
    with a new CLIPTextModel. The new tokenizer is written once, by the main process, into
    `output_dir/tokenizer`, and a resumed run reads it back: BPE training breaks ties between
    equally frequent pairs in no fixed order, so training it again could give other token ids."""
    if config.text_encoder_name_or_path is not None:
        return load_text_components(config.text_encoder_name_or_path, config.revision)
    folder = os.path.join(config.output_dir, "tokenizer")
    reuse = resuming and os.path.isfile(os.path.join(folder, "tokenizer.json"))
    with accelerator.main_process_first():
        if accelerator.is_main_process and not reuse:
            captions = (caption for batch in train_rows.select_columns([config.caption_column]).iter(batch_size=1024)
                        for row in batch[config.caption_column] for caption in caption_list(row))
            train_tokenizer(captions, config.tokenizer_vocab_size, folder, config.tokenizer_max_length)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    torch.manual_seed(config.seed)  # every process, and every resumed run, builds the same weights
    return tokenizer, build_text_encoder(tokenizer, config.text_encoder_config)


def adam_class(config: UNetConfig):
    """8-bit Adam (bitsandbytes) keeps the optimizer state in a quarter of the memory."""
    if not config.use_8bit_adam:
        return torch.optim.AdamW
    try:
        import bitsandbytes
    except ImportError as error:
        raise ConfigError("use_8bit_adam needs the bitsandbytes package: pip install bitsandbytes") from error
    return bitsandbytes.optim.AdamW8bit


# ---------------------------------------------------------------- per batch


def add_bins(bins: dict, per_sample: torch.Tensor, timesteps: torch.Tensor, scheduler, count: int) -> None:
    for b, (total, n) in objective.loss_by_timestep_bin(per_sample, timesteps, scheduler.config.num_train_timesteps,
                                                        count).items():
        old_total, old_n = bins.get(b, (0.0, 0))
        bins[b] = (old_total + total, old_n + n)


def log_bins(accelerator: Accelerator, bins: dict, timesteps_from, count: int, step: int) -> None:
    """The mean loss per timestep bin since the last call, and the probability of drawing each bin."""
    if bins:
        accelerator.log({f"loss_by_timestep/bin_{b:02d}": total / n for b, (total, n) in sorted(bins.items())},
                        step=step)
        masses = mass_by_bin(timesteps_from.probabilities(), count)
        accelerator.log({f"timestep_probability/bin_{b:02d}": mass for b, mass in enumerate(masses)}, step=step)


# ---------------------------------------------------------------- validation and export


@contextlib.contextmanager
def exported_pipeline(accelerator, vae, tokenizer, text_encoder, unet, ema, noise_scheduler):
    """Inside, the pipeline to save or sample from, with the EMA weights when there are some.

    A UNet trained whole is copied, so the weights being trained are never touched. A LoRA-adapted
    UNet is used as it is (under mixed precision, in Accelerate's autocast, as it trains), its adapters
    holding their average inside and their own weights again after: copying its frozen base would
    cost the memory LoRA saves. Sampling uses DPM-Solver++ (2M), which needs ~20 steps, with the
    training noise schedule."""
    unet = accelerator.unwrap_model(unet)
    parts = dict(vae=vae, text_encoder=accelerator.unwrap_model(text_encoder), tokenizer=tokenizer,
                 scheduler=DPMSolverMultistepScheduler.from_config(noise_scheduler.config))
    if not is_adapted(unet):
        copy = type(unet).from_config(unet.config)
        copy.load_state_dict(unet.state_dict())
        if ema is not None:
            ema.copy_to(copy.parameters())
        yield pipeline_for(copy.to(accelerator.device).eval(), **parts)
        return
    was_training = unet.training
    with averaged_weights(ema, unet):
        try:
            yield pipeline_for(unet.eval(), **parts)
        finally:
            unet.train(was_training)


def save_model(pipeline, config: UNetConfig) -> None:
    """The pipeline folder; for a LoRA run, the adapters alone (pytorch_lora_weights.safetensors)."""
    if config.lora_rank:
        text_encoder = pipeline.text_encoder if config.train_text_encoder_lora else None
        save_adapters(config.output_dir, pipeline.unet, text_encoder)
    else:
        pipeline.save_pretrained(config.output_dir, safe_serialization=True)


def validate(accelerator, config, vae, tokenizer, text_encoder, unet, ema, noise_scheduler, step: int,
             held_out: HeldOutImages | None, grid: bool = True) -> None:
    """The validation grid and the held-out loss (with the bound, when an evaluation is due), from the
    pipeline as it would be saved now."""
    grid = grid and bool(config.validation_prompts)
    if accelerator.is_main_process and (grid or held_out is not None):
        was_training = text_encoder.training
        accelerator.unwrap_model(text_encoder).eval()
        with exported_pipeline(accelerator, vae, tokenizer, text_encoder, unet, ema, noise_scheduler) as pipeline:
            if grid:
                save_validation_grid(sample_grid(pipeline, config, accelerator.device), config.output_dir,
                                     accelerator, step, "samples")
            if held_out is not None:
                due = evaluation_due(config, step)
                log_held_out(accelerator, held_out, step, lambda: held_out.loss(pipeline, noise_scheduler),
                             (lambda: held_out.bound(pipeline, noise_scheduler)) if due else None,
                             kid_of(held_out, pipeline) if due else None)
        accelerator.unwrap_model(text_encoder).train(was_training)
    accelerator.wait_for_everyone()


def kid_of(held_out: HeldOutImages, pipeline: LatentDiffusionPipeline):
    """KID at the validation grid's steps and guidance, with --inception_weights; else None."""
    config = held_out.config
    if config.inception_weights is None:
        return None
    return lambda: held_out.kid(pipeline, config.validation_inference_steps, config.validation_guidance_scale)
