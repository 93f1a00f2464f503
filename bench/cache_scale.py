"""How the chunked caches scale: memory, start-up and disk as the rows grow, the build with 1 and 2
processes, and the demo's training speed against the in-RAM cache they replaced.

    python bench/cache_scale.py [--sizes 4000 40000 200000] [--parts scale build speed]
                                [--vae outputs/vae-demo] [--baseline 5af0d0c]

scale: for each size, a latent cache and a text cache of that many rows with the demo's shapes
    (1x4x8x8 latents, mean and std; 24x128 text states of a frozen text encoder; float16; random
    values, OpenMoji-like captions), written through the cache writer. A fresh process then opens
    them, prepares the training DataLoader as train_unet.py does, takes one optimizer step of the
    demo UNet, then 200 loader steps (3 processes per size, medians). Printed: RssAnon (resident
    anonymous memory: plain RSS also counts the memory-mapped file pages, which the kernel can
    drop) after opening and after the 200 steps, seconds from process start to the first optimizer
    step, and bytes per row on disk against the payload (the tensors and the caption text).
build: the latent cache of the OpenMoji training set (3,625 images at 32 px) through the demo VAE,
    built by 1 process and by 2 (accelerate launch, OMP_NUM_THREADS=1 each): rows per second.
speed: train_unet.py with configs/unet/demo.yaml, this tree against `--baseline` (a git revision
    with the one-file in-RAM cache), alternating, 2 rounds of --steps steps: images per second.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

START = time.time()  # the child's clock starts before its imports, like a training run's

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from ldm.data.caches import latent_layout, text_layout  # noqa: E402
from ldm.data.chunks import CacheLayout, ChunkedCache, chunk_file, write_chunk, write_manifest  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "bench"))
from memory import rss_anon_mib  # noqa: E402

LATENT = (1, 4, 8, 8)  # the demo's: 32 px through an f = 4 VAE
TEXT = (24, 128)  # the demo's tokenizer context and text encoder width
CHUNK_ROWS = 1024


# ---------------------------------------------------------------- scale


def write_synthetic(root: str, rows: int) -> tuple[str, str]:
    """A latent and a text cache of `rows` rows, written chunk by chunk through the cache writer."""
    rng = np.random.default_rng(0)
    latents, texts = latent_layout(LATENT, "float16"), text_layout(*TEXT, "float16")
    folders = []
    for name, layout in (("latents", latents), ("texts", texts)):
        folder = os.path.join(root, f"{name}-{rows}")
        os.makedirs(folder)
        ranges = [range(start, min(start + CHUNK_ROWS, rows)) for start in range(0, rows, CHUNK_ROWS)]
        for k, part in enumerate(ranges):
            write_chunk(os.path.join(folder, chunk_file(k)), layout, iter([synthetic_table(layout, part, rng)]))
        write_manifest(folder, layout, ranges, CHUNK_ROWS, {"synthetic": rows})
        folders.append(folder)
    return folders[0], folders[1]


def synthetic_table(layout: CacheLayout, rows: range, rng) -> pa.Table:
    n = len(rows)
    schema = layout.features().arrow_schema
    if "embeddings" in layout.tensors:
        values = rng.standard_normal((n, int(np.prod(TEXT))), dtype=np.float32).astype(np.float16)
        states = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])
        offsets = pa.array(np.arange(n + 1), pa.int32())
        return pa.table({"embeddings": pa.ListArray.from_arrays(offsets, states)}, schema=schema)
    size = int(np.prod(LATENT))
    columns = {name: pa.FixedSizeListArray.from_arrays(pa.array(
        rng.standard_normal(n * size, dtype=np.float32).astype(np.float16)), size) for name in ("mean", "std")}
    columns["row"] = pa.array(list(rows), pa.int64())
    columns["captions"] = pa.array([[f"emoji number {row} medium-dark skin tone"] for row in rows],
                                   pa.list_(pa.string()))
    return pa.table(columns, schema=schema)


def open_and_train(latent_folder: str, text_folder: str, steps: int) -> dict:
    """In this (fresh) process: open, one optimizer step of the demo UNet, then `steps` loader steps."""
    import torch
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel

    from ldm.data.caches import CachedRows
    from ldm.data.chunks import ChunkShuffle, as_batch
    from ldm.models.architecture import read_architecture

    torch.set_num_threads(1)
    latents, texts = ChunkedCache(latent_folder), ChunkedCache(text_folder)
    opened = rss_anon_mib()
    accelerator = Accelerator(cpu=True)
    rows = CachedRows(latents, texts, seed=0)
    loader = torch.utils.data.DataLoader(rows, batch_size=64, sampler=ChunkShuffle(latents.chunk_rows, seed=0),
                                         collate_fn=as_batch)
    unet = UNet2DConditionModel.from_config(read_architecture("configs/models/unet_demo.json", UNet2DConditionModel))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    taken, epoch = 0, 0
    while taken <= steps:
        loader.set_epoch(epoch)
        rows.set_epoch(epoch)
        for batch in loader:
            if taken == 0:
                noise = torch.randn_like(batch["mean"].float())
                loss = unet(batch["mean"].float() + noise, torch.full((len(noise),), 500),
                            batch["embeddings"].float()).sample.square().mean()
                accelerator.backward(loss)
                optimizer.step()
                first_step = time.time() - START
            taken += 1
            if taken > steps:
                break
        epoch += 1
    manifest = latents.manifest, texts.manifest
    disk = sum(c["bytes"] for m in manifest for c in m["chunks"])
    payload = sum(c["payload_bytes"] for m in manifest for c in m["chunks"])
    return {"rows": len(latents), "rss_open": opened, "rss_after": rss_anon_mib(), "first_step": first_step,
            "disk_per_row": disk / len(latents), "payload_per_row": payload / len(latents)}


def scale(sizes: list[int], steps: int, repeats: int = 3) -> None:
    """The table of the scale part; each size is opened and read by `repeats` fresh processes (medians)."""
    results = []
    with tempfile.TemporaryDirectory(dir=os.path.join(ROOT, "outputs")) as root:
        for rows in sizes:
            started = time.perf_counter()
            latents, texts = write_synthetic(root, rows)
            written = time.perf_counter() - started
            os.sync()  # the kernel's writeback of these files would otherwise slow the children's start
            runs = []
            for _ in range(repeats):
                child = subprocess.run([sys.executable, __file__, "--child", latents, texts, "--steps", str(steps)],
                                       cwd=ROOT, capture_output=True, text=True,
                                       env={**os.environ, "OMP_NUM_THREADS": "1"})
                if child.returncode:
                    sys.exit(child.stderr[-3000:])
                runs.append(json.loads(child.stdout.splitlines()[-1]))
            median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            results.append({**median, "written": written})
    print("\n### Memory, start-up and disk as the cache grows (latents + text states, float16; "
          f"median of {repeats} fresh processes)\n")
    print(f"| rows | RssAnon after opening (MiB) | after {steps} loader steps (MiB) "
          "| start to first optimizer step (s) "
          "| disk per row (B) | payload per row (B) | disk ÷ payload | written in (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['rows']:,} | {r['rss_open']:.1f} | {r['rss_after']:.1f} | {r['first_step']:.2f} | "
              f"{r['disk_per_row']:.0f} | {r['payload_per_row']:.0f} | {r['disk_per_row'] / r['payload_per_row']:.3f} "
              f"| {r['written']:.1f} |")
    first, last = results[0], results[-1]
    growth = last["rss_after"] - first["rss_after"]
    slower = last["first_step"] - first["first_step"]
    worst = max(r["disk_per_row"] / r["payload_per_row"] for r in results)
    print(f"\nRssAnon growth {first['rows']:,} -> {last['rows']:,} rows: {growth:+.1f} MiB (target <= 32); "
          f"time to first step: {slower:+.2f} s, {slower / first['first_step']:+.1%} (target <= 10% or 1 s); "
          f"disk <= {worst:.3f}x payload (target <= 1.1)")


# ---------------------------------------------------------------- build


BUILD = """
import json, os, sys, time
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from ldm.data.caches import load_or_build_latents
from ldm.data.config import DataConfig
from ldm.data.dataset import ImageCaptionDataset, load_splits
from ldm.models.architecture import read_architecture

accelerator = Accelerator()
vae_path, root = sys.argv[1], sys.argv[2]
vae = (AutoencoderKL.from_pretrained(vae_path) if os.path.isdir(vae_path)
       else AutoencoderKL.from_config(read_architecture("configs/models/vae_demo.json", AutoencoderKL))).eval()
config = DataConfig(resolution=32)
train, _ = load_splits(config)
dataset = ImageCaptionDataset.from_config(train, config, train=False)
accelerator.wait_for_everyone()
start = time.perf_counter()
cache = load_or_build_latents(vae, dataset, False, root, processes=accelerator)
seconds = time.perf_counter() - start
if accelerator.is_main_process:
    print(json.dumps({"rows": len(dataset), "seconds": seconds}))
"""


def build(vae: str, rounds: int) -> None:
    script = os.path.join(ROOT, "outputs", "bench_cache_build.py")
    with open(script, "w") as f:
        f.write(BUILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "PYTHONPATH": ROOT,
           "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "ldm.openmoji", "--resolution", "32"], cwd=ROOT, check=True,
                   capture_output=True, env=env)
    launchers = {1: [sys.executable],
                 2: [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]}
    rates = {1: [], 2: []}
    for _ in range(rounds):
        for processes, launcher in launchers.items():  # alternate, so drift in machine load hits both alike
            with tempfile.TemporaryDirectory(dir=os.path.join(ROOT, "outputs")) as root:
                done = subprocess.run([*launcher, script, vae, root], cwd=ROOT, capture_output=True, text=True,
                                      env=env)
                if done.returncode:
                    sys.exit(done.stderr[-3000:])
                result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
                rates[processes].append(result["rows"] / result["seconds"])
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    which = "the demo VAE" if os.path.isdir(vae) else "the demo VAE's architecture, random weights"
    print(f"\n### Building the OpenMoji latent cache (3,625 images, 32 px, {which}; median of {rounds})\n")
    print("| processes (1 thread each) | rows/s |\n|---:|---:|")
    print(f"| 1 | {one:.0f} |\n| 2 | {two:.0f} |")
    print(f"\n2 processes build {two / one:.2f}x as fast as 1 (target >= 1.4)")


# ---------------------------------------------------------------- speed


def speed(vae: str, baseline: str, steps: int, rounds: int) -> None:
    """images/s of the demo's UNet training in this tree and in `baseline`'s, side by side."""
    trees = {"this tree (chunked, memory-mapped cache)": ROOT}
    old = os.path.join(ROOT, "outputs", f"baseline-{baseline}")
    if not os.path.isdir(old):
        subprocess.run(["git", "worktree", "add", "--detach", old, baseline], cwd=ROOT, check=True, capture_output=True)
    trees[f"{baseline} (one safetensors file, in RAM)"] = old
    rates = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(dir=os.path.join(ROOT, "outputs")) as work:
        for round_number in range(rounds):
            for name, tree in trees.items():
                output = os.path.join(work, f"{round_number}-{len(rates[name])}-{os.path.basename(tree)}")
                done = subprocess.run(
                    [sys.executable, "train_unet.py", "--config", "configs/unet/demo.yaml",
                     "--pretrained_vae_model_name_or_path", os.path.abspath(vae), "--output_dir", output,
                     "--max_train_steps", str(steps), "--validation_steps", str(steps + 1), "--checkpointing_steps",
                     str(steps + 1), "--report_to", "none", "--validation_prompts", "red heart"],
                    cwd=tree, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if done.returncode:
                    sys.exit(done.stderr[-3000:])
                with open(os.path.join(output, "metrics.json")) as f:
                    rates[name].append(json.load(f)["images_per_second"])
    print(f"\n### Demo UNet training speed, side by side ({rounds} alternating rounds of {steps} steps, median)\n")
    print("| cache | images/s | rounds |\n|---|---:|---|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
    new, old_rate = (statistics.median(values) for values in rates.values())
    print(f"\nchunked ÷ in-RAM: {new / old_rate:.3f} (target >= 0.95)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=2, metavar=("LATENTS", "TEXTS"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000, 40000, 200000])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--parts", nargs="+", choices=["scale", "build", "speed"], default=["scale", "build", "speed"])
    parser.add_argument("--vae", default="outputs/vae-demo", help="the demo VAE (train_vae.py's output)")
    parser.add_argument("--baseline", default="5af0d0c", help="a revision with the in-RAM cache")
    parser.add_argument("--speed_steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(open_and_train(*args.child, args.steps)))
        return
    os.makedirs(os.path.join(ROOT, "outputs"), exist_ok=True)
    if "scale" in args.parts:
        scale(args.sizes, args.steps)
    if "build" in args.parts:
        build(args.vae, args.rounds)
    if "speed" in args.parts:
        if not os.path.isdir(args.vae):
            sys.exit(f"speed needs the demo VAE in {args.vae}: run `make demo` (or train_vae.py) first")
        speed(args.vae, args.baseline, args.speed_steps, args.rounds)


if __name__ == "__main__":
    main()
