"""distill.py's work: a few-step student of a trained pipeline by latent consistency distillation
(Luo et al. 2023, arXiv 2310.04378) or progressive distillation, saved as a pipeline folder that diffusers'
own pipelines load.

`distill` is the one training loop. Three UNets take part in LCM: the frozen teacher; the student, the
teacher's weights plus a guidance input that starts at zero (ldm/diffusion/consistency.py); and the target, an
EMA of the student, which is what gets saved. Each step noises cached latents to a point t of the
teacher's noise path, lets the teacher (with classifier-free guidance at a drawn scale) take one DDIM
step to t − k, and trains the student's estimate of x₀ at t to match the target's at t − k. The path is the
teacher's (ldm/diffusion/noise_paths.py): a DDPM schedule, or a rectified flow, where a DDIM step is an Euler step.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import UNet2DConditionModel
from tqdm.auto import tqdm

from ldm.config import ConfigError, require_divisible
from ldm.data.captions import tokenize
from ldm.data.dataset import load_splits
from ldm.diffusion import objective
from ldm.diffusion.consistency import guidance_embedding, student_from
from ldm.diffusion.noise_paths import clean_and_noise, ddim_step, path_of
from ldm.hub.files import DISTILLATION, HubError, find_model
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.training.checkpoints import find_checkpoint, save_run_config
from ldm.training.distill_config import DistillConfig, check_teacher_schedule
from ldm.training.evaluation import held_out_images, log_distillation_loss, summary
from ldm.training.latent_batches import cached_empty_prompt, posterior, training_data
from ldm.training.loop import (
    Throughput,
    apply_gradients,
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
)
from ldm.training.preemption import StopOnSignal
from ldm.training.validation import sample_grid, save_validation_grid

logger = get_logger(__name__)


def distill(config: DistillConfig) -> dict:
    """Cache, distill, validate, checkpoint, and save the student's pipeline. Returns the final numbers."""
    # 1. Everything that can be checked is checked before anything expensive.
    teacher = load_teacher(config)
    require_divisible(config.resolution, teacher.vae_scale_factor, "VAE")
    accelerator = make_accelerator(config, "distill")
    if accelerator.is_main_process:
        save_run_config(config, config.output_dir)
    teacher.to(accelerator.device)

    # 2. Data: the latent and text caches train_unet.py builds, with the teacher's frozen encoders.
    train_rows, held_out_rows = load_splits(config)
    data = training_data(config, accelerator, train_rows, teacher.vae, teacher.tokenizer, teacher.text_encoder)
    resuming = find_checkpoint(config.resume_from_checkpoint, config.output_dir) is not None
    held_out = held_out_images(config, accelerator, held_out_rows, teacher.vae, resuming)
    empty = cached_empty_prompt(teacher.text_encoder, tokenize(teacher.tokenizer, [""]).to(accelerator.device),
                                config.cache_dtype)

    # 3. The student (the teacher plus a guidance input), its optimizer, and the method's own state.
    student = student_from(teacher.unet, config.guidance_embedding_dim).train()
    optimizer, lr_scheduler = make_optimizer(student.parameters(), config, accelerator)
    method = METHODS[config.method](teacher, student, config, accelerator)
    student, optimizer, lr_scheduler, data.loader = accelerator.prepare(student, optimizer, lr_scheduler, data.loader)

    # 4. Resume: weights, optimizer, schedule, the method's state, RNG states, step, position in the data.
    global_step, batches = data.resume(accelerator, config)
    method.resumed(global_step)

    # 5. The loop.
    meter = Throughput()
    progress = tqdm(total=config.max_train_steps, initial=global_step, desc=f"distill ({config.method})",
                    disable=not accelerator.is_local_main_process)
    running, micro_batches, seen, stopping = 0.0, 0, 0, False
    # A stop signal from here on is deferred: in the loop it ends the run after the step in progress,
    # with a checkpoint; after the loop, the final save completes.
    with StopOnSignal(config.save_on_signal) as stop:
        for batch_number, batch in batches:
            if global_step >= config.max_train_steps:
                break
            generator = batch_generator(config.seed, accelerator.process_index, batch_number, accelerator.device)
            with accelerator.accumulate(student):
                mean, std = posterior(teacher.vae, batch)
                latents = objective.normalise_latents(mean + std * torch.randn(
                    mean.shape, generator=generator, device=mean.device), teacher.vae.config)
                loss = method.losses(student, latents, batch["embeddings"].float(), empty, generator,
                                     global_step)[0].mean()
                check_finite(accelerator.reduce(loss.detach(), "mean"), global_step + 1)
                apply_gradients(accelerator, loss, list(student.parameters()), optimizer, lr_scheduler,
                                config.max_grad_norm)
            running += loss.item()
            micro_batches += 1
            seen += latents.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            method.stepped(accelerator.unwrap_model(student), global_step)
            meter.update(seen)
            report_step(accelerator, progress, meter, running / micro_batches, lr_scheduler.get_last_lr()[0],
                        global_step)
            running, micro_batches, seen = 0.0, 0, 0

            stopping = checkpoint_or_stop(accelerator, config, global_step, stop, meter)
            if stopping:
                break
            if global_step % config.validation_steps == 0 and global_step < config.max_train_steps:
                validate(accelerator, config, method.pipeline(accelerator.unwrap_model(student)),
                         method.steps_now(global_step), global_step,
                         lambda: measure_held_out(accelerator, held_out, method, student, teacher, empty, global_step))
                meter.restart()
        progress.close()
        if stopping:
            stop_on_signal(accelerator, stop, global_step, config.output_dir, student)

        # 6. The student's pipeline, with the facts generate.py and the model card read.
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            pipeline = method.pipeline(accelerator.unwrap_model(student))
            pipeline.save_pretrained(config.output_dir, safe_serialization=True)
            write_distillation(config)
            save_validation_grid(step_grid(pipeline, config, method.steps_now(global_step), accelerator.device),
                                 config.output_dir, accelerator, global_step, "samples")
        final = measure_held_out(accelerator, held_out, method, student, teacher, empty, global_step)
        logger.info(f"saved the {config.num_inference_steps}-step student to {config.output_dir}",
                    main_process_only=True)
        finish_training(accelerator, student)
        result = {"global_step": global_step, "images_per_second": meter.rate, **summary(held_out, final)}
        if accelerator.is_main_process:
            finish_run(config, result)
        return result


class ConsistencyDistillation:
    """Latent consistency distillation: the student's estimate of x₀ at a point t must match the
    target network's at t − k, after one guided DDIM step of the teacher. The target is the student's
    EMA, kept in an EMAModel (checkpointed) and copied into a UNet to run; it is what gets saved."""

    def __init__(self, teacher: LatentDiffusionPipeline, student: UNet2DConditionModel, config: DistillConfig,
                 accelerator: Accelerator):
        self.teacher, self.teacher_pipeline, self.config = teacher.unet, teacher, config
        self.path = path_of(teacher.scheduler.config)  # the teacher's training schedule
        self.path.check_solver_steps(config.num_ddim_timesteps)
        self.target = copy.deepcopy(student).eval().requires_grad_(False).to(accelerator.device)
        self.ema = make_ema(student, config, accelerator, constant=True)
        self.autocast = accelerator.autocast  # the frozen UNets run at the trained one's precision

    def losses(self, student, latents: torch.Tensor, text: torch.Tensor, empty: torch.Tensor,
               generator: torch.Generator, global_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's loss, and the point it was noised to."""
        count, device, path = latents.shape[0], latents.device, self.path
        start, end = path.consistency_pairs(count, self.config.num_ddim_timesteps, generator, device)
        noise = torch.randn(latents.shape, generator=generator, device=device)
        noisy = ddim_step(latents, noise, *path.coefficients(start))
        scales = draw_guidance(self.config, count, generator, device)
        condition = guidance_embedding(scales, self.config.guidance_embedding_dim)

        prediction = student(noisy, path.model_timesteps(start), text, timestep_cond=condition).sample
        estimate = self.consistency_output(prediction, noisy, start)
        with torch.no_grad():
            previous = self.teacher_step(noisy, start, end, text, empty.expand_as(text), scales)
            with self.autocast():
                target_prediction = self.target(previous, path.model_timesteps(end), text,
                                                timestep_cond=condition).sample
            goal = self.consistency_output(target_prediction.float(), previous, end)
        squared = (estimate.float() - goal) ** 2
        if self.config.loss_type == "huber":
            squared = (squared + self.config.huber_c ** 2).sqrt() - self.config.huber_c
        return squared.mean(dim=(1, 2, 3)), start

    def consistency_output(self, prediction: torch.Tensor, sample: torch.Tensor, points: torch.Tensor):
        """f(x, t), which is the identity at the path's clean end."""
        clean, _ = clean_and_noise(prediction.float(), sample, *self.path.coefficients(points),
                                   self.path.prediction_type)
        return self.path.consistency_output(clean, sample, points, self.config.timestep_scaling)

    def teacher_step(self, noisy, start, end, text, empty, scales) -> torch.Tensor:
        """One DDIM step of the teacher from `start` to `end`, guided at `scales` (both passes batched)."""
        clean, noise = guided_teacher(self.teacher, self.path, noisy, start, text, empty, scales, self.autocast)
        return ddim_step(clean, noise, *self.path.coefficients(end))

    def resumed(self, global_step: int) -> None:
        self.ema.copy_to(self.target.parameters())

    def stepped(self, student: UNet2DConditionModel, global_step: int) -> None:
        self.ema.step(student.parameters())
        self.ema.copy_to(self.target.parameters())

    def steps_now(self, global_step: int) -> list[int]:
        return sorted(self.config.validation_inference_steps)

    def pipeline(self, student: UNet2DConditionModel) -> LatentDiffusionPipeline:
        """The target UNet with the path's few-step sampler: an LCMScheduler on a DDPM teacher's schedule, its
        grid the solver's; first-order DPM-Solver++ on a flow teacher's sigmas."""
        scheduler = self.path.consistency_sampler(self.config.num_ddim_timesteps, self.config.timestep_scaling)
        return with_unet(self.teacher_pipeline, self.target, scheduler)


class ProgressiveDistillation:
    """Progressive distillation (Salimans & Ho 2022, arXiv 2202.00512): in each stage the student
    learns to take in one DDIM step the two its teacher takes, then becomes the next stage's teacher;
    the step count halves from `teacher_steps` down to `num_inference_steps`. The student of a DDPM teacher
    predicts v (ε-prediction breaks at few steps), of a flow teacher the velocity; it takes the guidance scale
    as an input as the LCM student does; the first teacher is the original one with classifier-free guidance
    at that scale."""

    def __init__(self, teacher: LatentDiffusionPipeline, student: UNet2DConditionModel, config: DistillConfig,
                 accelerator: Accelerator):
        self.teacher, self.teacher_pipeline, self.config = teacher.unet, teacher, config
        self.path = path_of(teacher.scheduler.config)
        self.stages = int(math.log2(config.teacher_steps // config.num_inference_steps))
        self.stage_length = math.ceil(config.max_train_steps / self.stages)
        # The previous stage's student, teacher of the current stage: checkpointed, so a resumed run
        # in a later stage has it.
        self.stage_teacher = copy.deepcopy(student).eval().requires_grad_(False).to(accelerator.device)
        accelerator.register_for_checkpointing(self.stage_teacher)
        self.autocast = accelerator.autocast

    def stage(self, global_step: int) -> int:
        return min(global_step // self.stage_length, self.stages - 1)

    def steps_now(self, global_step: int) -> list[int]:
        """The student's step count in the stage of `global_step`."""
        return [self.config.teacher_steps // 2 ** (self.stage(global_step) + 1)]

    def losses(self, student, latents: torch.Tensor, text: torch.Tensor, empty: torch.Tensor,
               generator: torch.Generator, global_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's loss, and the point it was noised to."""
        count, device, path = latents.shape[0], latents.device, self.path
        (steps,) = self.steps_now(global_step)
        start, middle, end = path.progressive_points(steps, count, generator, device)
        noise = torch.randn(latents.shape, generator=generator, device=device)
        coefficients = path.coefficients(start)
        noisy = ddim_step(latents, noise, *coefficients)
        scales = draw_guidance(self.config, count, generator, device)
        condition = guidance_embedding(scales, self.config.guidance_embedding_dim)

        with torch.no_grad():
            halfway = self.teacher_step(noisy, start, middle, text, empty, scales, condition, global_step)
            twice = self.teacher_step(halfway, middle, end, text, empty, scales, condition, global_step)
            goal = two_step_target(noisy, twice, coefficients, path.coefficients(end))
        prediction = student(noisy, path.model_timesteps(start), text, timestep_cond=condition).sample
        estimate, _ = clean_and_noise(prediction.float(), noisy, *coefficients, path.progressive_prediction_type)
        alpha, sigma = coefficients
        weights = (alpha / sigma).square().clamp(min=1.0)  # "truncated SNR" weighting of the x loss
        return weights * ((estimate - goal) ** 2).mean(dim=(1, 2, 3)), start

    def teacher_step(self, noisy, start, end, text, empty, scales, condition, global_step) -> torch.Tensor:
        """One DDIM step from `start` to `end` of this stage's teacher: the original one guided at
        `scales` in the first stage, the previous student (guidance as input) after it."""
        if self.stage(global_step) == 0:
            clean, noise = guided_teacher(self.teacher, self.path, noisy, start, text, empty.expand_as(text),
                                          scales, self.autocast)
        else:
            with self.autocast():
                prediction = self.stage_teacher(noisy, self.path.model_timesteps(start), text,
                                                timestep_cond=condition).sample
            clean, noise = clean_and_noise(prediction.float(), noisy, *self.path.coefficients(start),
                                           self.path.progressive_prediction_type)
        return ddim_step(clean, noise, *self.path.coefficients(end))

    def resumed(self, global_step: int) -> None:
        """Nothing to do: the stage teacher came back with the checkpoint."""

    def stepped(self, student: UNet2DConditionModel, global_step: int) -> None:
        if global_step % self.stage_length == 0 and global_step // self.stage_length < self.stages:
            self.stage_teacher.load_state_dict(student.state_dict())  # the next stage's teacher
            logger.info(f"step {global_step}: the {self.steps_now(global_step - 1)[0]}-step student is the "
                        f"teacher of the {self.steps_now(global_step)[0]}-step one", main_process_only=True)

    def pipeline(self, student: UNet2DConditionModel) -> LatentDiffusionPipeline:
        """The student with the path's sampler on the points it learnt: DDIM with trailing timesteps (v, last
        step to x₀) on a DDPM teacher's schedule, first-order DPM-Solver++ on a flow teacher's sigmas."""
        return with_unet(self.teacher_pipeline, student, self.path.progressive_sampler())


METHODS = {"lcm": ConsistencyDistillation, "progressive": ProgressiveDistillation}


def guided_teacher(unet, path, noisy, points, text, empty, scales, autocast):
    """The original teacher's x̂₀ and ε̂ with classifier-free guidance u + g (c − u) at per-sample
    scales g, both passes as one batch."""
    timesteps = path.model_timesteps(points)
    with autocast():
        both = unet(torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]), torch.cat([empty, text])).sample
    unconditional, conditional = both.float().chunk(2)
    coefficients = path.coefficients(points)
    clean_u, noise_u = clean_and_noise(unconditional, noisy, *coefficients, path.prediction_type)
    clean_c, noise_c = clean_and_noise(conditional, noisy, *coefficients, path.prediction_type)
    g = scales.view(-1, 1, 1, 1)
    return clean_u + g * (clean_c - clean_u), noise_u + g * (noise_c - noise_u)


def two_step_target(start: torch.Tensor, end: torch.Tensor, start_coefficients, end_coefficients) -> torch.Tensor:
    """The x̃ from which one DDIM step takes `start` (at t) to `end` (at t″, where the teacher's two
    steps landed): x̃ = (z_t″ − (σ_t″/σ_t) z_t) / (α_t″ − (σ_t″/σ_t) α_t)."""
    (alpha_t, sigma_t), (alpha_e, sigma_e) = start_coefficients, end_coefficients
    ratio = (sigma_e / sigma_t).view(-1, 1, 1, 1)
    return (end - ratio * start) / (alpha_e.view(-1, 1, 1, 1) - ratio * alpha_t.view(-1, 1, 1, 1))


def draw_guidance(config: DistillConfig, count: int, generator: torch.Generator, device) -> torch.Tensor:
    """A guidance scale per sample, uniform in [min_guidance, max_guidance]."""
    span = config.max_guidance - config.min_guidance
    return config.min_guidance + span * torch.rand(count, generator=generator, device=device)


# ---------------------------------------------------------------- components


def load_teacher(config: DistillConfig) -> LatentDiffusionPipeline:
    """The teacher pipeline, frozen, after checking that it is one."""
    try:
        found = find_model(config.teacher, config.revision)
    except HubError as error:
        raise ConfigError(f"teacher {config.teacher!r}: {error}") from None
    if not found.is_pipeline:
        raise ConfigError(f"teacher {config.teacher!r} is not a pipeline folder (no model_index.json): give a "
                          "train_unet.py output_dir or a pipeline's Hub id, which generate.py loads")
    if "transformer" in dict(found.components):
        raise ConfigError(f"teacher {config.teacher!r} is a transformer pipeline; distillation takes a UNet teacher")
    teacher = LatentDiffusionPipeline.from_pretrained(config.teacher, revision=config.revision)
    check_teacher_schedule(config.teacher, teacher.scheduler.config)
    for model in (teacher.unet, teacher.vae, teacher.text_encoder):
        model.eval().requires_grad_(False)
    return teacher


def with_unet(teacher: LatentDiffusionPipeline, unet: UNet2DConditionModel, scheduler) -> LatentDiffusionPipeline:
    """The teacher's VAE and text side with a copy of `unet` and `scheduler`: a pipeline to save or sample."""
    copied = UNet2DConditionModel.from_config(unet.config)
    copied.load_state_dict(unet.state_dict())
    return LatentDiffusionPipeline(vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer,
                                   unet=copied.to(unet.device).eval(), scheduler=scheduler)


def write_distillation(config: DistillConfig) -> None:
    """What generate.py and the model card read: the method, the teacher, and the sampling defaults."""
    facts = {"method": config.method, "teacher": config.teacher, "num_inference_steps": config.num_inference_steps,
             "guidance_scale": config.validation_guidance_scale}
    with open(os.path.join(config.output_dir, DISTILLATION), "w") as file:
        json.dump(facts, file, indent=2)


@torch.no_grad()
def step_grid(pipeline: LatentDiffusionPipeline, config: DistillConfig, steps: list[int], device) -> np.ndarray:
    """A row of validation images for each step count, fewest steps on top."""
    return np.concatenate([sample_grid(pipeline, config, device, steps=n) for n in steps], axis=0)


def validate(accelerator, config: DistillConfig, pipeline: LatentDiffusionPipeline, steps: list[int],
             step: int, measure: Callable[[], dict]) -> None:  # the grid of each step count, the held-out loss
    if accelerator.is_main_process and config.validation_prompts:
        save_validation_grid(step_grid(pipeline, config, steps, accelerator.device), config.output_dir,
                             accelerator, step, "samples")
    measure()
    accelerator.wait_for_everyone()


def measure_held_out(accelerator, held_out, method, student, teacher, empty, step: int) -> dict:
    plain = accelerator.unwrap_model(student)  # the DDP wrapper's forward would sync buffers with the other processes
    return log_distillation_loss(accelerator, held_out, teacher, plain, lambda latents, text, generator: (
        method.losses(plain, latents, text, empty, generator, step)), step)
