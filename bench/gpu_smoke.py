"""GPU smoke test: every training and sampling path once, at the GPU configs' real sizes, on one GPU.

    python bench/gpu_smoke.py [--steps 3] [--out outputs/gpu-smoke]

No GPU has run this project's CI, so this is what to run when one is at hand (under 5 minutes on one
GPU; nothing is downloaded). It runs the real scripts in subprocesses and prints one line per path,
passed or failed, then a table with the seconds each took:

- train_vae.py in fp16 and in bf16: the 83.7M-parameter f = 8 VAE of configs/vae/sd_f8_256.yaml at
  256 px (batch 4, a few steps, the discriminator on from step 1; LPIPS off: its weights cannot be
  fetched offline);
- the caches built on the GPU: that VAE encodes 64 OpenMoji images at 256 px, and a text encoder of
  CLIP ViT-L/14's size (random weights, a tokenizer trained on the captions: nothing can be fetched)
  embeds their captions;
- train_unet.py in fp16 and in bf16 on those caches: the 355.7M-parameter UNet of
  configs/unet/sd_f8_256.yaml (batch 8, a few steps);
- train_unet.py --streaming: the same, the data streamed (the encoders in the step, on the GPU);
- train_unet.py --prediction_type flow_prediction in bf16 (rectified flow, shift 3, logit-normal), then
  generate.py --scheduler flow_euler in float16 from it;
- generate.py in float16 from the trained pipeline (256 px, 10 steps, guidance 7.5);
- generate.py inpainting one of those images (the VAE's encoder at sampling time), watermarked;
- train_unet.py --lora_rank in fp16 on that pipeline (adapters on the UNet's attention projections and
  convolutions and on the text encoder; float32 adapters under the gradient scaler), then
  generate.py --lora in float16.

Without CUDA it says so and exits 0 (`--rehearse` runs the same commands on the CPU, at 64 px and
in bf16 only, to check the script itself).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import yaml
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP_VIT_L_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "projection_dim": 768}


def run(name: str, command: list[str], results: list) -> bool:
    """Run one path; print and record whether it passed."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    passed = done.returncode == 0
    last = (done.stderr.strip().splitlines() or [""])[-1][:160]
    results.append((name, passed, seconds, "" if passed else last))
    print(f"{name}: {'passed' if passed else 'FAILED'} ({seconds:.0f} s){'' if passed else ': ' + last}", flush=True)
    if not passed:
        print(done.stderr[-4000:], file=sys.stderr)
    return passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="outputs/gpu-smoke")
    parser.add_argument("--rehearse", action="store_true", help="run on the CPU at 64 px, bf16 only")
    args = parser.parse_args()
    args.out = os.path.abspath(args.out)
    if not torch.cuda.is_available() and not args.rehearse:
        print("gpu_smoke: needs a CUDA GPU, and this machine has none; nothing to do")
        return 0
    resolution, precisions = (64, ["bf16"]) if args.rehearse else (256, ["fp16", "bf16"])
    if torch.cuda.is_available():
        print(f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB), "
              f"torch {torch.__version__}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    text_config = os.path.join(args.out, "text_encoder_clip_l.json")
    with open(text_config, "w") as f:
        json.dump(CLIP_VIT_L_TEXT, f)
    cache = os.path.join(args.out, "cache")
    data = ["--dataset_name", "openmoji", "--resolution", str(resolution), "--cache_dir", cache, "--report_to", "none",
            "--max_train_steps", str(args.steps), "--validation_steps", "1000",
            "--checkpointing_steps", str(args.steps)]
    results, vae_ok = [], {}
    for precision in precisions:
        vae_ok[precision] = run(f"train_vae.py {precision}", [
            "train_vae.py", "--config", "configs/vae/sd_f8_256.yaml", *data, "--max_train_samples", "64",
            "--mixed_precision", precision, "--train_batch_size", "4", "--lpips_weight", "0", "--disc_start", "1",
            "--scale_batches", "2", "--max_validation_samples", "8", "--dataloader_num_workers", "0",
            "--output_dir", os.path.join(args.out, f"vae-{precision}")], results)
    vae = next((os.path.join(args.out, f"vae-{p}") for p in precisions if vae_ok[p]), None)
    if vae is None:
        print("train_unet.py, the caches and generate.py need a trained VAE: skipped")
        return summary(results)
    unet_common = ["train_unet.py", "--config", offline_unet_config(args.out, text_config), *data,
                   "--train_batch_size", "8", "--pretrained_vae_model_name_or_path", vae,
                   "--tokenizer_vocab_size", "4096", "--validation_prompts", "grinning face",
                   "--validation_inference_steps", "5", "--dataloader_num_workers", "0"]
    pipelines = []
    for number, precision in enumerate(precisions):
        name = ("caches built on the GPU + " if number == 0 else "") + f"train_unet.py {precision}"
        output = os.path.join(args.out, f"unet-{precision}")
        command = [*unet_common, "--max_train_samples", "64", "--mixed_precision", precision, "--output_dir", output]
        if run(name, command, results):
            pipelines.append(output)
    if pipelines:  # the stream: the encoders in the step, batches moved to the GPU outside Accelerate
        run(f"train_unet.py --streaming {precisions[-1]}", [
            *unet_common, "--streaming", "--mixed_precision", precisions[-1],
            "--text_encoder_name_or_path", pipelines[0],
            "--output_dir", os.path.join(args.out, "unet-streaming")], results)
        dtype = "bfloat16" if args.rehearse else "float16"
        flow = os.path.join(args.out, "unet-flow")
        if run(f"train_unet.py --prediction_type flow_prediction {precisions[-1]}", [
                *unet_common, "--max_train_samples", "64", "--mixed_precision", precisions[-1], "--prediction_type",
                "flow_prediction", "--flow_shift", "3", "--timestep_sampling", "logit_normal", "--snr_gamma", "0",
                "--text_encoder_name_or_path", pipelines[0], "--output_dir", flow], results):
            run(f"generate.py flow_euler {dtype}", [
                "generate.py", "--model", flow, "--prompt", "grinning face", "--scheduler", "flow_euler",
                "--num_inference_steps", "10", "--device", "auto", "--dtype", dtype,
                "--output_dir", os.path.join(args.out, "flow-samples")], results)
        pixart = os.path.join(args.out, "pixart-flow")  # configs/transformer/sd_f8_256_flow.yaml's transformer
        if run(f"train_unet.py --denoiser_config pixart_256.json (flow) {precisions[-1]}", [
                *unet_common, "--max_train_samples", "64", "--mixed_precision", precisions[-1], "--denoiser_config",
                "configs/models/pixart_256.json", "--prediction_type", "flow_prediction", "--snr_gamma", "0",
                "--timestep_sampling", "logit_normal", "--text_encoder_name_or_path", pipelines[0],
                "--output_dir", pixart], results):
            run(f"generate.py transformer {dtype}", [
                "generate.py", "--model", pixart, "--prompt", "grinning face", "--num_inference_steps", "10",
                "--device", "auto", "--dtype", dtype,
                "--output_dir", os.path.join(args.out, "pixart-samples")], results)
        samples = os.path.join(args.out, "samples")
        if run(f"generate.py {dtype}", [
                "generate.py", "--model", pipelines[0], "--prompt", "grinning face", "--num_images_per_prompt", "2",
                "--num_inference_steps", "10", "--guidance_scale", "7.5", "--device", "auto", "--dtype", dtype,
                "--output_dir", samples], results):
            image = os.path.join(samples, "0000-grinning-face-seed0.png")
            run(f"generate.py inpainting + watermark {dtype}", [
                "generate.py", "--model", pipelines[0], "--prompt", "thumbs up", "--num_inference_steps", "10",
                "--init_image", image, "--mask_image", centre_mask(image), "--watermark", "--device", "auto",
                "--dtype", dtype, "--output_dir", os.path.join(args.out, "inpainted")], results)
        lora = os.path.join(args.out, "lora")
        if run(f"train_unet.py --lora_rank {precisions[0]}", [
                "train_unet.py", *data, "--pretrained_model_name_or_path", pipelines[0], "--lora_rank", "8",
                "--lora_target_modules", "to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2",
                "--train_text_encoder_lora", "--use_ema", "--max_train_samples", "64", "--train_batch_size", "8",
                "--mixed_precision", precisions[0], "--validation_prompts", "grinning face",
                "--validation_inference_steps", "5", "--output_dir", lora], results):
            run(f"generate.py --lora {dtype}", [
                "generate.py", "--model", pipelines[0], "--lora", lora, "--lora_scale", "0.8", "--prompt",
                "grinning face", "--num_inference_steps", "10", "--device", "auto", "--dtype", dtype,
                "--output_dir", os.path.join(args.out, "lora-samples")], results)
    return summary(results)


def centre_mask(image: str) -> str:
    """A mask file beside `image` that repaints the middle half of it."""
    width, height = Image.open(image).size
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    path = os.path.splitext(image)[0] + "-mask.png"
    mask.save(path)
    return path


def offline_unet_config(out: str, text_config: str) -> str:
    """configs/unet/sd_f8_256.yaml as shipped, but with a text encoder of CLIP ViT-L/14's size built
    from scratch instead of the pretrained one, which cannot be fetched offline."""
    with open(os.path.join(ROOT, "configs/unet/sd_f8_256.yaml")) as f:
        settings = yaml.safe_load(f)
    del settings["text_encoder_name_or_path"]
    settings["text_encoder_config"] = text_config
    path = os.path.join(out, "unet_sd_f8_256_offline.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(settings, f)
    return path


def summary(results: list) -> int:
    print("\n| path | result | seconds | note |\n|---|---|---:|---|")
    for name, passed, seconds, note in results:
        print(f"| {name} | {'passed' if passed else 'FAILED'} | {seconds:.0f} | {note} |")
    return 0 if all(passed for _, passed, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
