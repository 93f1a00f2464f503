"""The trainers: what they share (the loop's pieces, checkpoints, preemption, the latent batches,
validation grids), then one module per trainer (vae, unet, distill), each with its settings."""
