"""The arithmetic of diffusion, as plain functions: the training objective, noise schedules, timestep
sampling, scheduler names, and the consistency-distillation steps."""
