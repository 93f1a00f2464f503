"""distill.py's work: a few-step student of a trained pipeline by latent consistency distillation
(Luo et al. 2023, arXiv 2310.04378), saved as a pipeline folder that diffusers' own pipelines load.

`distill` is the one training loop. Three UNets take part: the frozen teacher; the student, the
teacher's weights plus a guidance input that starts at zero (ldm/consistency.py); and the target, an
EMA of the student, which is what gets saved. Each step noises cached latents to a point t of the
teacher's DDIM grid, lets the teacher (with classifier-free guidance at a drawn scale) take one DDIM
step to t − k, and trains the student's estimate of x₀ at t to match the target's at t − k.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import DDPMScheduler, LCMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm

from ldm import diffusion
from ldm.config import ConfigError, DistillConfig, require_divisible
from ldm.consistency import DDIMSolver, boundary_scalings, clean_and_noise, guidance_embedding, student_from
from ldm.data import load_splits
from ldm.hub import DISTILLATION, HubError, find_model, finish_run
from ldm.pipeline import LatentDiffusionPipeline
from ldm.text import tokenize
from ldm.training import (Throughput, apply_gradients, batch_generator, check_finite, finish_training, make_accelerator,
                          make_ema, make_optimizer, save_checkpoint, save_run_config, save_validation_grid)
from ldm.unet_training import cached_empty_prompt, posterior, sample_grid, training_data

logger = get_logger(__name__)


def distill(config: DistillConfig) -> dict:
    """Cache, distill, validate, checkpoint, and save the student's pipeline. Returns the final numbers."""
    # 1. Everything that can be checked is checked before anything expensive.
    teacher = load_teacher(config)
    noise_schedule = DDPMScheduler.from_config(teacher.scheduler.config)  # the teacher's training schedule
    solver = DDIMSolver(noise_schedule.alphas_cumprod, config.num_ddim_timesteps)
    require_divisible(config.resolution, teacher.vae_scale_factor, "VAE")
    accelerator = make_accelerator(config, "distill")
    if accelerator.is_main_process:
        save_run_config(config, config.output_dir)
    teacher.to(accelerator.device)

    # 2. Data: the latent and text caches train_unet.py builds, with the teacher's frozen encoders.
    data = training_data(config, accelerator, load_splits(config)[0], teacher.vae, teacher.tokenizer,
                         teacher.text_encoder)
    empty = cached_empty_prompt(teacher.text_encoder, tokenize(teacher.tokenizer, [""]).to(accelerator.device),
                                config.cache_dtype)

    # 3. The student and its optimizer; the target is the student's EMA, copied into a UNet to run.
    student = student_from(teacher.unet, config.guidance_embedding_dim).train()
    target = student_from(teacher.unet, config.guidance_embedding_dim).eval().requires_grad_(False)
    target.to(accelerator.device)
    optimizer, lr_scheduler = make_optimizer(student.parameters(), config, accelerator)
    ema = make_ema(student, config, accelerator, constant=True)
    distillation = ConsistencyDistillation(teacher, target, noise_schedule, solver, config, accelerator)
    student, optimizer, lr_scheduler, data.loader = accelerator.prepare(student, optimizer, lr_scheduler, data.loader)

    # 4. Resume: weights, optimizer, schedule, target, RNG states, step, and position in the data.
    global_step, batches = data.resume(accelerator, config)
    ema.copy_to(target.parameters())

    # 5. The loop.
    meter = Throughput()
    progress = tqdm(total=config.max_train_steps, initial=global_step, desc="distill",
                    disable=not accelerator.is_local_main_process)
    running, micro_batches, seen = 0.0, 0, 0
    for batch_number, batch in batches:
        if global_step >= config.max_train_steps:
            break
        generator = batch_generator(config.seed, accelerator.process_index, batch_number, accelerator.device)
        with accelerator.accumulate(student):
            mean, std = posterior(teacher.vae, batch)
            latents = diffusion.normalise_latents(mean + std * torch.randn(
                mean.shape, generator=generator, device=mean.device), teacher.vae.config)
            loss = distillation.loss(student, latents, batch["embeddings"].float(), empty, generator)
            check_finite(accelerator.reduce(loss.detach(), "mean"), global_step + 1)
            apply_gradients(accelerator, loss, list(student.parameters()), optimizer, lr_scheduler,
                            config.max_grad_norm)
        running += loss.item()
        micro_batches += 1
        seen += latents.shape[0] * accelerator.num_processes
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        ema.step(accelerator.unwrap_model(student).parameters())
        ema.copy_to(target.parameters())
        meter.update(seen)
        logs = {"train/loss": running / micro_batches, "train/learning_rate": lr_scheduler.get_last_lr()[0],
                "train/images_per_second": meter.rate}
        accelerator.log(logs, step=global_step)
        progress.update(1)
        progress.set_postfix(loss=f"{logs['train/loss']:.5f}", img_s=f"{meter.rate:.0f}")
        running, micro_batches, seen = 0.0, 0, 0

        if global_step % config.checkpointing_steps == 0:
            save_checkpoint(accelerator, config.output_dir, global_step, config.checkpoints_total_limit, config)
            meter.restart()
        if global_step % config.validation_steps == 0 and global_step < config.max_train_steps:
            validate(accelerator, config, teacher, target, global_step)
            meter.restart()
    progress.close()

    # 6. The student's pipeline: the target UNet with an LCMScheduler on the teacher's noise schedule.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        pipeline = student_pipeline(teacher, target, config)
        pipeline.save_pretrained(config.output_dir, safe_serialization=True)
        write_distillation(config)
        save_validation_grid(step_grid(pipeline, config, accelerator.device), config.output_dir, accelerator,
                             global_step, "samples")
    logger.info(f"saved the {max(config.validation_inference_steps)}-step student to {config.output_dir}",
                main_process_only=True)
    finish_training(accelerator)
    result = {"global_step": global_step, "images_per_second": meter.rate}
    if accelerator.is_main_process:
        finish_run(config, result)
    return result


class ConsistencyDistillation:
    """The consistency distillation loss of one batch, with the teacher, target and solver it needs."""

    def __init__(self, teacher: LatentDiffusionPipeline, target: UNet2DConditionModel, noise_schedule: DDPMScheduler,
                 solver: DDIMSolver, config: DistillConfig, accelerator: Accelerator):
        self.teacher, self.target, self.solver, self.config = teacher.unet, target, solver, config
        self.noise_schedule, self.prediction_type = noise_schedule, noise_schedule.config.prediction_type
        self.autocast = accelerator.autocast  # the frozen UNets run at the trained one's precision

    def loss(self, student, latents: torch.Tensor, text: torch.Tensor, empty: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
        count, device = latents.shape[0], latents.device
        start, end = self.solver.draw(count, generator, device)
        noise = torch.randn(latents.shape, generator=generator, device=device)
        noisy = self.noise_schedule.add_noise(latents, noise, start)
        scales = self.config.min_guidance + (self.config.max_guidance - self.config.min_guidance) * torch.rand(
            count, generator=generator, device=device)
        condition = guidance_embedding(scales, self.config.guidance_embedding_dim).to(device)

        prediction = student(noisy, start, text, timestep_cond=condition).sample
        estimate = self.consistency_output(prediction, noisy, start)
        with torch.no_grad():
            previous = self.teacher_step(noisy, start, end, text, empty.expand_as(text), scales)
            with self.autocast():
                target_prediction = self.target(previous, end, text, timestep_cond=condition).sample
            goal = self.consistency_output(target_prediction.float(), previous, end)
        if self.config.loss_type == "l2":
            return F.mse_loss(estimate.float(), goal)
        return (((estimate.float() - goal) ** 2 + self.config.huber_c ** 2).sqrt() - self.config.huber_c).mean()

    def consistency_output(self, prediction: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor):
        """f(x, t) = c_skip(t)·x + c_out(t)·x̂₀, the same arithmetic as LCMScheduler.step."""
        clean, _ = clean_and_noise(prediction.float(), sample, self.solver.alpha_cumprod(timesteps),
                                   self.prediction_type)
        c_skip, c_out = boundary_scalings(timesteps, self.config.timestep_scaling)
        return c_skip.view(-1, 1, 1, 1) * sample + c_out.view(-1, 1, 1, 1) * clean

    def teacher_step(self, noisy, start, end, text, empty, scales) -> torch.Tensor:
        """One DDIM step of the teacher from `start` to `end`, guided at `scales` (both passes batched)."""
        with self.autocast():
            both = self.teacher(torch.cat([noisy, noisy]), torch.cat([start, start]), torch.cat([empty, text])).sample
        unconditional, conditional = both.float().chunk(2)
        alpha_cumprod = self.solver.alpha_cumprod(start)
        clean_u, noise_u = clean_and_noise(unconditional, noisy, alpha_cumprod, self.prediction_type)
        clean_c, noise_c = clean_and_noise(conditional, noisy, alpha_cumprod, self.prediction_type)
        g = scales.view(-1, 1, 1, 1)
        return self.solver.step(clean_u + g * (clean_c - clean_u), noise_u + g * (noise_c - noise_u), end)


# ---------------------------------------------------------------- components


def load_teacher(config: DistillConfig) -> LatentDiffusionPipeline:
    """The teacher pipeline, frozen, after checking that it is one."""
    try:
        is_pipeline = find_model(config.teacher, config.revision).is_pipeline
    except HubError as error:
        raise ConfigError(f"teacher {config.teacher!r}: {error}") from None
    if not is_pipeline:
        raise ConfigError(f"teacher {config.teacher!r} is not a pipeline folder (no model_index.json): give a "
                          "train_unet.py output_dir or a pipeline's Hub id, which generate.py loads")
    teacher = LatentDiffusionPipeline.from_pretrained(config.teacher, revision=config.revision)
    for model in (teacher.unet, teacher.vae, teacher.text_encoder):
        model.eval().requires_grad_(False)
    return teacher


def student_pipeline(teacher: LatentDiffusionPipeline, target: UNet2DConditionModel,
                     config: DistillConfig) -> LatentDiffusionPipeline:
    """The target UNet (a copy) with the teacher's VAE and text side, and an LCMScheduler on the
    teacher's noise schedule whose grid is the one the student was distilled on."""
    unet = UNet2DConditionModel.from_config(target.config)
    unet.load_state_dict(target.state_dict())
    scheduler = LCMScheduler.from_config(teacher.scheduler.config, original_inference_steps=config.num_ddim_timesteps,
                                         timestep_scaling=config.timestep_scaling)
    return LatentDiffusionPipeline(vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer,
                                   unet=unet.to(target.device).eval(), scheduler=scheduler)


def write_distillation(config: DistillConfig) -> None:
    """What generate.py and the model card read: the method, the teacher, and the sampling defaults."""
    facts = {"method": config.method, "teacher": config.teacher, "num_inference_steps":
             max(config.validation_inference_steps), "guidance_scale": config.validation_guidance_scale}
    with open(os.path.join(config.output_dir, DISTILLATION), "w") as file:
        json.dump(facts, file, indent=2)


@torch.no_grad()
def step_grid(pipeline: LatentDiffusionPipeline, config: DistillConfig, device) -> np.ndarray:
    """A row of validation images for each step count, fewest steps on top."""
    return np.concatenate([sample_grid(pipeline, config, device, steps=steps)
                           for steps in sorted(config.validation_inference_steps)], axis=0)


def validate(accelerator, config: DistillConfig, teacher, target, step: int) -> None:
    if accelerator.is_main_process and config.validation_prompts:
        save_validation_grid(step_grid(student_pipeline(teacher, target, config), config, accelerator.device),
                             config.output_dir, accelerator, step, "samples")
    accelerator.wait_for_everyone()
