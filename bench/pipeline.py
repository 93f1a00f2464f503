"""Sampling speed: LatentDiffusionPipeline (default and fast mode) against diffusers'
StableDiffusionPipeline built from the same components, measured side by side in one run.

    python bench/pipeline.py [--steps 20] [--batch 4] [--resolution 64] [--repeats 5]
                             [--threads N] [--clock wall|cpu]

Random weights: speed does not depend on what the weights learnt. The runs are interleaved,
with the order rotated each round, so that a load spike on the machine hits every mode, and the
table reports medians (and the ratio of best times). On a machine shared with other jobs, use
`--threads 1 --clock cpu`: time is then this process's CPU time, which other processes barely
move, instead of wall-clock time. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextModel

from ldm.diffusion.schedulers import make_scheduler
from ldm.models.text import text_encoder_config, train_tokenizer
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline

UNET = dict(  # 5.9M parameters, cross-attention at the two higher resolutions
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 128),
    cross_attention_dim=128, norm_num_groups=32,
    attention_head_dim=(2, 4, 4),  # diffusers' legacy name for heads per block: 32 channels per head
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
VAE = dict(  # f = 4
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=32,
)
TEXT_ENCODER = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                    projection_dim=128)
CAPTIONS = ["grinning face", "red heart", "blue circle", "thumbs up", "cat face", "green apple", "rocket"]
PROMPTS = ["red heart", "cat face", "rocket", "green apple"]
SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                set_alpha_to_one=False, steps_offset=1)  # Stable Diffusion v1's


def build_models() -> dict:
    """VAE, text encoder, tokenizer and UNet with random weights."""
    torch.manual_seed(0)
    tokenizer = train_tokenizer(CAPTIONS * 8, vocab_size=300, save_dir=tempfile.mkdtemp())
    return dict(vae=AutoencoderKL(**VAE).eval(), unet=UNet2DConditionModel(**UNET).eval(), tokenizer=tokenizer,
                text_encoder=CLIPTextModel(text_encoder_config(tokenizer, **TEXT_ENCODER)).eval())


def timed_call(pipe, args, clock) -> tuple[float, float, torch.Tensor]:
    """(seconds for the whole call, median seconds per denoising step, images)."""
    step_ends = []

    def record(pipe, step, timestep, tensors):
        step_ends.append(clock())
        return {}

    start = clock()
    images = pipe(**args, generator=torch.Generator().manual_seed(0), output_type="pt",
                  callback_on_step_end=record).images
    total = clock() - start
    step_times = [b - a for a, b in zip([start] + step_ends, step_ends)][1:]  # the first includes encoding
    return total, statistics.median(step_times), images


def unet_throughput(unet, sample, t, embeddings, repeats: int, clock) -> tuple[float, float]:
    """(GFLOP per forward, median seconds per forward) at the batch the guided loop uses."""
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            unet(sample, t, encoder_hidden_states=embeddings)
        unet(sample, t, encoder_hidden_states=embeddings)  # warm-up
        times = [_time(lambda: unet(sample, t, encoder_hidden_states=embeddings), clock) for _ in range(repeats)]
    return counter.get_total_flops() / 1e9, statistics.median(times)


def matmul_gflops(dtype: torch.dtype, clock, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` throughput of an n×n matmul: what this machine can do at best."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_time(lambda: a @ b, clock) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _time(fn, clock) -> float:
    start = clock()
    fn()
    return clock() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--scheduler", default="dpm++2m_karras")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args(argv)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)

    models = build_models()

    def scheduler():  # one per pipeline: multistep schedulers keep state between steps
        return make_scheduler(args.scheduler, SCHEDULE)

    ours = LatentDiffusionPipeline(**models, scheduler=scheduler())
    diffusers_pipe = StableDiffusionPipeline(**models, scheduler=scheduler(), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    fast = LatentDiffusionPipeline(**models, scheduler=scheduler())
    fast.enable_fast_mode()
    modes = {"ours (default)": ours, "diffusers StableDiffusionPipeline": diffusers_pipe, "ours (fast mode)": fast}
    for pipe in modes.values():
        pipe.set_progress_bar_config(disable=True)

    call = dict(prompt=(PROMPTS * args.batch)[:args.batch], num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale, height=args.resolution, width=args.resolution)
    for pipe in modes.values():  # warm-up: first calls allocate and pick kernels
        timed_call(pipe, dict(call, num_inference_steps=2), clock)
    runs = {name: [] for name in modes}
    for round_ in range(args.repeats):
        names = list(modes)
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:  # rotate who goes first
            runs[name].append(timed_call(modes[name], call, clock))

    unet = models["unet"]
    latent = args.resolution // ours.vae_scale_factor
    guided_batch = 2 * args.batch if args.guidance_scale > 1 else args.batch
    sample = torch.randn(guided_batch, unet.config.in_channels, latent, latent)
    embeddings = torch.randn(guided_batch, models["tokenizer"].model_max_length, unet.config.cross_attention_dim)
    t = torch.tensor(500)
    gflop, unet_s = unet_throughput(unet, sample, t, embeddings, args.repeats * 2, clock)
    _, unet_fast_s = unet_throughput(fast.denoising_unet(), sample.bfloat16(), t, embeddings.bfloat16(),
                                     args.repeats * 2, clock)
    fp32_peak, bf16_peak = matmul_gflops(torch.float32, clock), matmul_gflops(torch.bfloat16, clock)

    print(f"{args.batch} images, {args.resolution}x{args.resolution} px ({latent}x{latent} latents), "
          f"{args.steps} {args.scheduler} steps, guidance {args.guidance_scale}, "
          f"{torch.get_num_threads()} threads; UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M "
          f"parameters, {gflop:.2f} GFLOP per guided forward; median of {args.repeats} interleaved runs; "
          f"{args.clock} clock\n")
    reference = runs["diffusers StableDiffusionPipeline"]
    print("| pipeline | ms / step | s / image | time ÷ diffusers (median) | (best) | max abs diff |")
    print("|---|---:|---:|---:|---:|---|")
    for name, results in runs.items():
        total = statistics.median(r[0] for r in results)
        step = statistics.median(r[1] for r in results)
        median_ratio = total / statistics.median(r[0] for r in reference)
        best_ratio = min(r[0] for r in results) / min(r[0] for r in reference)
        against = "ours (default)" if name == "ours (fast mode)" else "diffusers"
        other = runs["ours (default)"] if name == "ours (fast mode)" else reference
        diff = (results[0][2] - other[0][2]).abs().max()
        print(f"| {name} | {step * 1e3:.1f} | {total / args.batch:.3f} | {median_ratio:.3f} | {best_ratio:.3f} "
              f"| {diff:.1e} vs {against} |")
    print("\n| UNet forward (batch %d) | ms | achieved GFLOP/s | machine matmul GFLOP/s | fraction |" % guided_batch)
    print("|---|---:|---:|---:|---:|")
    for label, seconds, peak in (("float32", unet_s, fp32_peak), ("bfloat16 (fast mode)", unet_fast_s, bf16_peak)):
        print(f"| {label} | {seconds * 1e3:.1f} | {gflop / seconds:.0f} | {peak:.0f} | {gflop / seconds / peak:.0%} |")


if __name__ == "__main__":
    main()
