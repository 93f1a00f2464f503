"""Full fine-tuning against LoRA (rank 4, 16 and 64) of the demo UNet, each teaching it the
`make lora-demo` concept (colour inversion under the word "inverted") for the same minutes.

    .venv/bin/python bench/lora.py [--minutes 2] [--base outputs/unet-demo] [--data outputs/lora-data] [--unet_only]

Needs `make demo` (the base) and the concept's data (`python -m ldm.lora_demo` writes it; so does
this script when it is missing): the styled images and, as the prior, the same emoji as they are.
Full fine-tuning trains the UNet (a pipeline's
text encoder stays frozen in train_unet.py); the adapters sit on the UNet and on the text encoder,
as in `make lora-demo`: the text encoder learns what the new word means, so the UNet need not change
what it draws for every other prompt (`--unet_only` leaves the text encoder's out, to show that).
Every variant trains on the same data, batch, schedule and
precision, through train_unet.py in its own process (learning rate 2e-4 for full fine-tuning, 1e-3
for the adapters, each the usual order for its kind):
a 50-step probe measures its images/s, then it trains for the steps that fit in --minutes. Per
variant:
- trainable parameters and optimizer-state bytes (the AdamW state in the probe's checkpoint: optimizer.bin);
- training images/s (train_unet.py's own meter), the run's wall minutes (start-up and the final
  export included) and the peak RssAnon of the training process (sampled every 0.1 s; resident
  anonymous memory, which counts no memory-mapped file pages; the final export and grid included,
  where full fine-tuning copies the UNet; the frozen base stays float32 in every variant);
- the file a user ships: the adapter, or the whole fine-tuned UNet's weights;
- adherence@5 on the concept: for 100 of its captions, whether the drawn image's own concept image
  is among the 5 nearest of the concept's images (chance 5/454 ≈ 1.1%);
- adherence@5 on 100 of the base's own training captions (bench/adherence.py) with the adapter
  loaded at scale 1 (or the fine-tuned UNet), against the base's.
Guidance 5, 20 DPM-Solver++ steps. Numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from adherence import Probe, adherence_at_5, draw  # noqa: E402
from memory import PeakRssAnon  # noqa: E402

from ldm.hub.files import LORA_WEIGHTS  # noqa: E402
from ldm.lora_demo import STYLE_WORD, write_concept  # noqa: E402
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj"]  # configs/unet/lora_demo.yaml's
VARIANTS = {  # name → flags beyond the common ones
    "full fine-tuning": ["--learning_rate", "2e-4"],
    **{f"LoRA rank {rank}": ["--lora_rank", str(rank), "--lora_target_modules", *TARGETS, "--train_text_encoder_lora",
                             "--learning_rate", "1e-3"] for rank in (4, 16, 64)},
}
# The probe checkpoints at step 30 (for its optimizer state) and runs 20 more steps: train_unet.py's
# images/s is over the last 20 steps, and a checkpoint restarts that count.
PROBE_STEPS, PROBE_CHECKPOINT = 50, 30
BATCH = 64
GUIDANCE = 5.0


def common_flags(base: str, data: str) -> list[str]:
    return ["--pretrained_model_name_or_path", base, "--pretrained_vae_model_name_or_path", base,
            "--text_encoder_name_or_path", base, "--train_data_dir", data, "--resolution", "32",
            "--random_flip", "false", "--train_batch_size", str(BATCH), "--lr_scheduler", "cosine",
            "--lr_warmup_steps", "20", "--timestep_sampling", "logit_normal", "--mixed_precision", "bf16",
            "--snr_gamma", "5", "--caption_dropout", "0", "--use_ema", "false", "--validation_steps", "100000",
            "--report_to", "none"]


def train(flags: list[str], output_dir: str, steps: int, checkpoint: int = 100000) -> tuple[dict, float]:
    """One train_unet.py run of `steps` steps (checkpointing at `checkpoint`): its metrics with its wall
    minutes (start-up, caches and the final export included), and its peak RssAnon (MiB)."""
    command = [sys.executable, "train_unet.py", *flags, "--output_dir", output_dir, "--max_train_steps", str(steps),
               "--checkpointing_steps", str(checkpoint)]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with PeakRssAnon(process.pid, interval=0.1) as peak:
        _, errors = process.communicate()
    if process.returncode:
        raise RuntimeError(f"train_unet.py failed:\n{errors[-3000:]}")
    metrics = json.load(open(os.path.join(output_dir, "metrics.json")))
    return dict(metrics, minutes=(time.perf_counter() - started) / 60), peak.mib


def concept(data: str, count: int = 100) -> tuple[torch.Tensor, list[int], list[str]]:
    """The concept's (styled) images in [0, 1], the indices of `count` evenly spread ones, and their captions."""
    with open(os.path.join(data, "metadata.jsonl"), encoding="utf-8") as file:
        rows = [row for row in map(json.loads, file) if row["text"].endswith(" " + STYLE_WORD)]
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(os.path.join(data, row["file_name"])).convert("RGB"),
                                                      dtype=np.float32) / 255).permute(2, 0, 1) for row in rows])
    chosen = np.linspace(0, len(rows) - 1, count).round().astype(int).tolist()
    return images, chosen, [rows[i]["text"] for i in chosen]


def trained_pipeline(base: str, run: str) -> LatentDiffusionPipeline:
    """The base with the run's adapter loaded at scale 1, or the fully fine-tuned pipeline."""
    if os.path.isfile(os.path.join(run, LORA_WEIGHTS)):
        pipeline = LatentDiffusionPipeline.from_pretrained(base)
        pipeline.load_lora_weights(run)
    else:
        pipeline = LatentDiffusionPipeline.from_pretrained(run)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def shipped_bytes(run: str) -> int:
    adapter = os.path.join(run, LORA_WEIGHTS)
    return os.path.getsize(adapter if os.path.isfile(adapter)
                           else os.path.join(run, "unet", "diffusion_pytorch_model.safetensors"))


def optimizer_state(run: str) -> tuple[int, int]:
    """(trainable parameters, bytes of optimizer state) from a checkpoint's AdamW state: one exp_avg and
    one exp_avg_sq per trainable tensor."""
    path = os.path.join(run, f"checkpoint-{PROBE_CHECKPOINT}", "optimizer.bin")
    state = torch.load(path, weights_only=True)["state"].values()
    moments = [entry[name] for entry in state for name in ("exp_avg", "exp_avg_sq")]
    return sum(entry["exp_avg"].numel() for entry in state), sum(t.numel() * t.element_size() for t in moments)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="training time of every variant")
    parser.add_argument("--base", default="outputs/unet-demo")
    parser.add_argument("--data", default="outputs/lora-data")
    parser.add_argument("--root", default="outputs/bench-lora")
    parser.add_argument("--unet_only", action="store_true", help="adapters on the UNet alone")
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.data, "metadata.jsonl")):
        write_concept(args.data)
    images, chosen, captions = concept(args.data)
    old = Probe(args.base)
    base_old = old.score(GUIDANCE)
    base_concept = adherence_at_5(draw(old.pipeline, captions, GUIDANCE, old.steps, 32), chosen, images)
    print(f"base: adherence@5 on its own captions {base_old:.0%}, on the concept {base_concept:.0%} "
          f"({len(images)} concept images)", flush=True)
    print(f"\n{args.minutes:g} minutes of training each, batch {BATCH}, bf16; guidance {GUIDANCE:g}\n")
    print("| variant | trainable parameters | optimizer state | images/s | peak RssAnon | file | steps | minutes | "
          "concept adherence@5 | own captions (base " f"{base_old:.0%}) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, flags in VARIANTS.items():
        folder = os.path.join(args.root, name.replace(" ", "-"))
        flags = [*common_flags(args.base, args.data), *(f for f in flags if not (args.unet_only and
                                                                                 f == "--train_text_encoder_lora"))]
        probe, _ = train(flags, folder + "-probe", PROBE_STEPS, PROBE_CHECKPOINT)
        steps = max(PROBE_STEPS, round(args.minutes * 60 * probe["images_per_second"] / BATCH))
        metrics, peak = train(flags, folder, steps)
        pipeline = trained_pipeline(args.base, folder)
        on_concept = adherence_at_5(draw(pipeline, captions, GUIDANCE, old.steps, 32), chosen, images)
        trainable, optimizer_bytes = optimizer_state(folder + "-probe")
        print(f"| {name} | {trainable:,} | {optimizer_bytes / 2**20:.1f} MiB | "
              f"{metrics['images_per_second']:.0f} | {peak:.0f} MiB | {shipped_bytes(folder) / 2**20:.2f} MiB | "
              f"{steps} | {metrics['minutes']:.1f} | {on_concept:.0%} | {old.score(GUIDANCE, pipeline):.0%} |",
              flush=True)


if __name__ == "__main__":
    main()
