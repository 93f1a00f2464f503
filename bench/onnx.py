"""Sampling with PyTorch (fp32 and fast mode) against ONNX Runtime (fp32 and the INT8 UNet), side by
side in one run on a trained model at its native size: speed, export time, size on disk, how far each
variant's images are from PyTorch fp32's, and prompt adherence (bench/adherence.py's adherence@5).

    .venv/bin/python bench/onnx.py [--run outputs/unet-demo] [--batch 4] [--steps 20] [--guidance 5]
                                   [--repeats 5] [--threads N] [--clock wall|cpu] [--count 100]

The timed calls are interleaved, the order rotated each round, so a load spike on a shared machine
hits every variant; the table reports medians. PyTorch and ONNX Runtime get the same number of
threads. The exports go to a temporary folder. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
# This file's name would shadow the onnx package for everything imported below: bench/ stays off the path.
sys.path[:] = [ROOT] + [path for path in sys.path if os.path.abspath(path or ".") != BENCH]
import onnxruntime  # noqa: E402
import torch  # noqa: E402

from bench.adherence import Probe  # noqa: E402
from bench.pipeline import timed_call  # noqa: E402
from ldm.export import UNET_WEIGHTS, export_onnx, folder_megabytes  # noqa: E402
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline  # noqa: E402
from ldm.pipelines.onnx_pipeline import OnnxLatentDiffusionPipeline  # noqa: E402


def model_megabytes(run: str) -> float:
    """The PyTorch pipeline's files: the folders model_index.json names, not checkpoints or logs."""
    with open(os.path.join(run, "model_index.json"), encoding="utf-8") as file:
        components = [name for name in json.load(file) if not name.startswith("_")]
    return sum(folder_megabytes(os.path.join(run, name)) for name in components)


def timed_export(run: str, folder: str, quantize: str | None) -> float:
    start = time.perf_counter()
    export_onnx(run, folder, quantize=quantize)
    return time.perf_counter() - start


def build_variants(run: str, scratch: str, threads: int) -> dict[str, tuple[object, float | None, str]]:
    """name → (pipeline, export seconds or None, size on disk)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    torch_pipe = LatentDiffusionPipeline.from_pretrained(run)
    fast = LatentDiffusionPipeline.from_pretrained(run)
    fast.enable_fast_mode()
    torch_size = f"{model_megabytes(run):.1f} MB"
    variants = {"PyTorch fp32": (torch_pipe, None, torch_size),
                "PyTorch fast mode (bf16)": (fast, None, f"{torch_size} (bf16 UNet copied in memory)")}
    for name, quantize in (("ONNX Runtime fp32", None), ("ONNX Runtime INT8", "int8")):
        folder = os.path.join(scratch, quantize or "fp32")
        seconds = timed_export(run, folder, quantize)
        pipe = OnnxLatentDiffusionPipeline.from_pretrained(folder, session_options=options)
        variants[name] = (pipe, seconds, f"{folder_megabytes(folder):.1f} MB")
    for pipe, _, _ in variants.values():
        pipe.set_progress_bar_config(disable=True)
    return variants


def unet_forward_variants(fp32_unet: str, scratch: str) -> dict[str, str]:
    """label → ONNX UNet file: fp32, the shipped INT8 (MatMul/Gemm), and MatMul/Gemm + Conv dynamically
    quantized with int8 and uint8 weights (ConvInteger nodes), to see whether convolutions would pay."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    variants = {"fp32": fp32_unet, "INT8 MatMul/Gemm (--quantize int8)": os.path.join(scratch, "int8", "unet",
                                                                                       "model.onnx")}
    for label, weight_type in (("int8", QuantType.QInt8), ("uint8", QuantType.QUInt8)):
        path = os.path.join(scratch, f"conv-{label}.onnx")
        quantize_dynamic(fp32_unet, path, op_types_to_quantize=["MatMul", "Gemm", "Conv"], weight_type=weight_type,
                         extra_options={"MatMulConstBOnly": True})
        variants[f"{label.upper()} MatMul/Gemm + Conv"] = path
    return variants


def onnx_megabytes(path: str) -> float:
    """An ONNX file's size with its external weights, if it keeps them beside it."""
    external = os.path.join(os.path.dirname(path), UNET_WEIGHTS)
    return (os.path.getsize(path) + (os.path.getsize(external) if os.path.isfile(external) else 0)) / 1e6


def time_unet_forwards(variants: dict[str, str], batch: int, size: int, context: int, width: int, threads: int,
                       repeats: int, clock) -> dict[str, float]:
    """Median seconds of one guided UNet forward (2 × batch rows) per variant, interleaved."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    sessions = {label: onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
                for label, path in variants.items()}
    feeds = dict(sample=torch.randn(2 * batch, 4, size, size).numpy(), timestep=torch.full((2 * batch,), 500.0).numpy(),
                 encoder_hidden_states=torch.randn(2 * batch, context, width).numpy())
    times = {label: [] for label in sessions}
    for session in sessions.values():
        session.run(None, feeds)
    for _ in range(repeats):
        for label, session in sessions.items():
            start = clock()
            session.run(None, feeds)
            times[label].append(clock() - start)
    return {label: statistics.median(values) for label, values in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="outputs/unet-demo", help="a train_unet.py output_dir")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--count", type=int, default=100, help="captions for adherence@5 (0: skip it)")
    args = parser.parse_args(argv)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)

    probe = Probe(args.run, max(args.count, 5), args.steps)
    prompts = (probe.prompts * args.batch)[:args.batch]
    call = dict(prompt=prompts, num_inference_steps=args.steps, guidance_scale=args.guidance,
                height=probe.config.resolution, width=probe.config.resolution)
    with tempfile.TemporaryDirectory() as scratch:
        variants = build_variants(args.run, scratch, args.threads)
        for pipe, _, _ in variants.values():  # warm-up: first calls allocate and pick kernels
            timed_call(pipe, dict(call, num_inference_steps=2), clock)
        runs = {name: [] for name in variants}
        names = list(variants)
        for round_ in range(args.repeats):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:  # rotate who goes first
                runs[name].append(timed_call(variants[name][0], call, clock))
        scores = {name: probe.score(args.guidance, pipe) if args.count else None
                  for name, (pipe, _, _) in variants.items()}
        unet = variants["PyTorch fp32"][0].unet
        unet_files = unet_forward_variants(os.path.join(scratch, "fp32", "unet", "model.onnx"), scratch)
        unet_sizes = {label: onnx_megabytes(path) for label, path in unet_files.items()}
        unet_times = time_unet_forwards(unet_files, args.batch, unet.config.sample_size,
                                        probe.pipeline.tokenizer.model_max_length, unet.config.cross_attention_dim,
                                        args.threads, args.repeats * 4, clock)

    print(f"{args.run}: {args.batch} images at {probe.config.resolution}x{probe.config.resolution} px, {args.steps} "
          f"{type(variants['PyTorch fp32'][0].scheduler).__name__} steps, guidance {args.guidance:g}, "
          f"{args.threads} threads (torch {torch.__version__}, onnxruntime {onnxruntime.__version__}); median of "
          f"{args.repeats} interleaved runs, {args.clock} clock. Adherence@5 over {args.count} training captions.\n")
    print("| backend | ms / step | s / image | time ÷ PyTorch fp32 | export s | size on disk | "
          "pixel diff vs PyTorch fp32 (mean / max) | adherence@5 |")
    print("|---|---:|---:|---:|---:|---|---|---:|")
    reference = runs["PyTorch fp32"]
    for name, results in runs.items():
        total = statistics.median(r[0] for r in results)
        step = statistics.median(r[1] for r in results)
        ratio = total / statistics.median(r[0] for r in reference)
        difference = (results[0][2] - reference[0][2]).abs()
        _, export_seconds, size = variants[name]
        exported = "-" if export_seconds is None else f"{export_seconds:.1f}"
        adherence = "-" if scores[name] is None else f"{scores[name]:.0%}"
        print(f"| {name} | {step * 1e3:.1f} | {total / args.batch:.3f} | {ratio:.2f} | {exported} | {size} | "
              f"{difference.mean():.4f} / {difference.max():.4f} | {adherence} |")
    int8_vs_fp32 = (runs["ONNX Runtime INT8"][0][2] - runs["ONNX Runtime fp32"][0][2]).abs()
    print(f"\nINT8 against ONNX Runtime fp32: mean abs pixel difference {int8_vs_fp32.mean():.4f} (pixels in [0, 1])"
          + ("" if not args.count
             else f"; adherence@5 {scores['ONNX Runtime INT8'] - scores['ONNX Runtime fp32']:+.0%}"))
    print(f"\n| ONNX UNet, one guided forward (batch {2 * args.batch}) | ms | time ÷ fp32 | MB |")
    print("|---|---:|---:|---:|")
    for label, seconds in unet_times.items():
        print(f"| {label} | {seconds * 1e3:.1f} | {seconds / unet_times['fp32']:.2f} | {unet_sizes[label]:.1f} |")


if __name__ == "__main__":
    main()
