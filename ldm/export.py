"""`python -m ldm.export onnx PIPELINE OUT_DIR [--opset 17] [--quantize int8]`: a saved pipeline (a
folder or a Hub id) as ONNX files for ONNX Runtime, in the folder layout diffusers' ONNX pipelines read:

    model_index.json           names OnnxStableDiffusionPipeline and OnnxRuntimeModel components
    text_encoder/model.onnx    input_ids (int32, batch × context) → last_hidden_state, pooler_output
    unet/model.onnx            sample, timestep (float32, one per row), encoder_hidden_states
                               [, timestep_cond for a distilled UNet] → out_sample; weights in weights.pb
    vae_encoder/model.onnx     sample (images in [-1, 1]) → latent_sample (the posterior's mean, unscaled)
    vae_decoder/model.onnx     latent_sample (unscaled) → sample
    tokenizer/, scheduler/     as saved by the PyTorch pipeline

Each model folder also keeps the PyTorch model's `config.json`, which ldm/pipelines/onnx_pipeline.py reads for
what the graphs do not say (the latent scaling factor, the VAE factor, the UNet's channels and native
size), and `onnx_export.json` records what made the export. Batch and spatial sizes are dynamic;
tracing fixes the text context at the tokenizer's length and the UNet's upsampling branch, so latent
sides must be multiples of 2^(number of upsamplers) (ldm/pipelines/onnx_pipeline.py checks this).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import warnings

import diffusers
import torch

from ldm.generation.loading import is_transformer_pipeline, load_pipeline
from ldm.hub.files import DISTILLATION, read_distillation
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm.pipelines.onnx_pipeline import MANIFEST

OPSETS = range(14, 21)  # 14: the first with the attention ops traced here; 20: the TorchScript exporter's last
QUANTIZATIONS = ("int8",)
UNET_WEIGHTS = "weights.pb"  # diffusers' name for the UNet's external data (ONNX files stop at 2 GB)


class TextEncoderGraph(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        hidden, pooled = self.text_encoder(input_ids=input_ids, return_dict=False)[:2]
        return hidden, pooled


class UNetGraph(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond,
                         return_dict=False)[0]


class VaeEncoderGraph(torch.nn.Module):
    """The posterior's mean rather than a sample: a graph that draws its own noise could not take
    the caller's generator, and diffusers' ONNX img2img pipeline reads one tensor here either way."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample, return_dict=False)[0].mode()


class VaeDecoderGraph(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


def export_graph(module: torch.nn.Module, inputs: tuple, path: str, input_names: list[str],
                 output_names: list[str], dynamic_axes: dict, opset: int) -> None:
    """The one place that picks the exporter: TorchScript tracing (`dynamo=False`). torch 2.13's
    default, the dynamo exporter, needs onnxscript and rewrites the graph's input names; tracing
    runs the model once and records it, which fixes Python-level branches at the traced shapes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about those branches, and the deprecation notice
        torch.onnx.export(module.eval(), inputs, path, input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False)


def export_text_encoder(pipe: LatentDiffusionPipeline, folder: str, opset: int) -> None:
    ids = torch.zeros(2, pipe.tokenizer.model_max_length, dtype=torch.int32)
    export_graph(TextEncoderGraph(pipe.text_encoder), (ids,), os.path.join(folder, "model.onnx"), ["input_ids"],
                 ["last_hidden_state", "pooler_output"],
                 {"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}, "pooler_output": {0: "batch"}},
                 opset)
    pipe.text_encoder.config.to_json_file(os.path.join(folder, "config.json"))


def export_unet(pipe: LatentDiffusionPipeline, folder: str, opset: int) -> None:
    """The UNet traced at its native latent size and a batch of two (a guided step's), its weights
    moved to `weights.pb` as diffusers lays it out."""
    config = pipe.unet.config
    size = config.sample_size
    sample = torch.randn(2, config.in_channels, size, size)
    embeddings = torch.randn(2, pipe.tokenizer.model_max_length, config.cross_attention_dim)
    inputs, names = (sample, torch.tensor([999.0, 999.0]), embeddings), ["sample", "timestep", "encoder_hidden_states"]
    if config.time_cond_proj_dim is not None:  # a distilled UNet takes the guidance weight's embedding
        inputs, names = (*inputs, torch.randn(2, config.time_cond_proj_dim)), [*names, "timestep_cond"]
    axes = {name: {0: "batch"} for name in names}
    axes.update(sample={0: "batch", 2: "height", 3: "width"}, encoder_hidden_states={0: "batch", 1: "sequence"},
                out_sample={0: "batch", 2: "height", 3: "width"})
    traced = os.path.join(folder, "traced")  # its own folder: over 2 GB, the exporter writes a file per tensor
    os.makedirs(traced)
    export_graph(UNetGraph(pipe.unet), inputs, os.path.join(traced, "model.onnx"), names, ["out_sample"], axes, opset)
    move_weights_out(os.path.join(traced, "model.onnx"), os.path.join(folder, "model.onnx"))
    shutil.rmtree(traced)
    pipe.unet.save_config(folder)


def move_weights_out(source: str, path: str) -> None:
    """The graph at `path` with all its weights in one external file beside it, UNET_WEIGHTS."""
    import onnx

    onnx.save_model(onnx.load(source), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=UNET_WEIGHTS, size_threshold=0)


def export_vae(pipe: LatentDiffusionPipeline, encoder_folder: str, decoder_folder: str, opset: int) -> None:
    size = pipe.unet.config.sample_size
    latents = torch.randn(1, pipe.vae.config.latent_channels, size, size)
    pixels = torch.randn(1, pipe.vae.config.in_channels, size * pipe.vae_scale_factor, size * pipe.vae_scale_factor)
    spatial = {0: "batch", 2: "height", 3: "width"}
    export_graph(VaeEncoderGraph(pipe.vae), (pixels,), os.path.join(encoder_folder, "model.onnx"), ["sample"],
                 ["latent_sample"], {"sample": spatial, "latent_sample": spatial}, opset)
    export_graph(VaeDecoderGraph(pipe.vae), (latents,), os.path.join(decoder_folder, "model.onnx"), ["latent_sample"],
                 ["sample"], {"latent_sample": spatial, "sample": spatial}, opset)
    for folder in (encoder_folder, decoder_folder):
        pipe.vae.save_config(folder)


def quantize_unet(folder: str) -> None:
    """The UNet's MatMul and Gemm weights to INT8 with ONNX Runtime's dynamic quantization
    (activations are quantized per call). Only products with a constant weight: attention's
    activation × activation products stay float. Convolutions stay float: dynamic Conv
    quantization makes ConvInteger nodes, which the CPU provider does not run."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    unet = os.path.join(folder, "unet")
    fp32 = os.path.join(unet, "fp32.onnx")
    os.replace(os.path.join(unet, "model.onnx"), fp32)
    quantize_dynamic(fp32, os.path.join(unet, "model.onnx"), op_types_to_quantize=["MatMul", "Gemm"],
                     weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
    os.remove(fp32)
    os.remove(os.path.join(unet, UNET_WEIGHTS))  # the quantized graph holds its weights itself


def model_index(pipe: LatentDiffusionPipeline) -> dict:
    """diffusers' layout for OnnxStableDiffusionPipeline (deprecated in diffusers 0.42, gone in 0.43)."""
    onnx_model = ["diffusers", "OnnxRuntimeModel"]
    return {"_class_name": "OnnxStableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
            "text_encoder": onnx_model, "unet": onnx_model, "vae_encoder": onnx_model, "vae_decoder": onnx_model,
            "tokenizer": ["transformers", type(pipe.tokenizer).__name__],
            "scheduler": ["diffusers", type(pipe.scheduler).__name__],
            "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}


def write_export(pipe: LatentDiffusionPipeline, folder: str, opset: int, quantize: str | None) -> None:
    """Every file of the export into `folder`, an empty folder."""
    for name in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        os.makedirs(os.path.join(folder, name))
    export_text_encoder(pipe, os.path.join(folder, "text_encoder"), opset)
    export_unet(pipe, os.path.join(folder, "unet"), opset)
    export_vae(pipe, os.path.join(folder, "vae_encoder"), os.path.join(folder, "vae_decoder"), opset)
    if quantize == "int8":
        quantize_unet(folder)
    pipe.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    pipe.scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    write_json(os.path.join(folder, "model_index.json"), model_index(pipe))


def write_json(path: str, content: dict) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(content, file, indent=2)
        file.write("\n")


def check_output(out_dir: str) -> None:
    """An output folder that can be written, and holds nothing but (maybe) an earlier export to replace."""
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ValueError(f"output {out_dir} exists and is not a folder")
        if os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, MANIFEST)):
            raise ValueError(f"output {out_dir} is a folder that holds other files; give an empty or new folder, or "
                             "an earlier ONNX export to replace")
    parent = os.path.dirname(os.path.abspath(out_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"output {out_dir} cannot be written: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"output {out_dir} cannot be written: no write permission in {parent}")


def check_arguments(opset: int, quantize: str | None, out_dir: str) -> None:
    for package in ("onnx", "onnxruntime"):
        if importlib.util.find_spec(package) is None:
            raise ValueError(f"the ONNX export needs the {package} package: pip install -e \".[onnx]\"")
    if opset not in OPSETS:
        raise ValueError(f"--opset {opset} is not supported: choose {OPSETS.start}-{OPSETS.stop - 1} (the TorchScript "
                         "exporter's range for these models)")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"--quantize {quantize!r} is not one of {', '.join(QUANTIZATIONS)}")
    check_output(out_dir)


def export_onnx(source: str, out_dir: str, opset: int = 17, quantize: str | None = None,
                revision: str | None = None) -> dict:
    """Export the pipeline `source` (folder or Hub id) to `out_dir`; returns the manifest written there.

    Everything is checked, and the pipeline loaded, before the first export; the files are written
    to a folder beside `out_dir` that replaces it only once the export is whole.
    """
    check_arguments(opset, quantize, out_dir)
    if is_transformer_pipeline(source, revision):
        raise ValueError(f"{source} is a transformer pipeline: the ONNX export and OnnxLatentDiffusionPipeline "
                         "trace a UNet (its inputs and the UNet's folder layout); export a UNet pipeline")
    pipe = load_pipeline(source, revision, torch.float32)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        started = time.perf_counter()
        with torch.no_grad():
            write_export(pipe, staging, opset, quantize)
        manifest = dict(source=source, revision=revision, opset=opset, quantize=quantize, exporter="torchscript",
                        torch=torch.__version__, seconds=round(time.perf_counter() - started, 2))
        write_json(os.path.join(staging, MANIFEST), manifest)
        distillation = read_distillation(source, revision)
        if distillation:  # generate.py's default steps and guidance for a distilled model
            write_json(os.path.join(staging, DISTILLATION), distillation)
        make_readable(staging)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def make_readable(folder: str) -> None:
    """The permissions a plain `mkdir` and `open` would have given: mkdtemp makes the folder private,
    and onnx writes external data files private too."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for root, _, names in os.walk(folder):
        for name in names:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm.export", description="Export a pipeline for other runtimes.")
    formats = parser.add_subparsers(dest="format", required=True)
    onnx = formats.add_parser("onnx", help="ONNX files for ONNX Runtime, in diffusers' ONNX pipeline layout")
    onnx.add_argument("source", help="a saved pipeline folder or a Hugging Face Hub model id")
    onnx.add_argument("out_dir", help="the folder to write (new, empty, or an earlier export, which is replaced)")
    onnx.add_argument("--opset", type=int, default=17, help=f"ONNX opset, {OPSETS.start}-{OPSETS.stop - 1}")
    onnx.add_argument("--quantize", default=None, help="int8: the UNet's MatMul/Gemm weights in INT8 (opt-in)")
    onnx.add_argument("--revision", default=None, help="Hub branch, tag or commit of the source")
    args = parser.parse_args(argv)
    try:
        manifest = export_onnx(args.source, args.out_dir, args.opset, args.quantize, args.revision)
    except ValueError as error:
        print(f"python -m ldm.export: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir} in {manifest['seconds']:.1f} s ({folder_megabytes(args.out_dir):.1f} MB)")
    return 0


def folder_megabytes(folder: str) -> float:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names) / 1e6


if __name__ == "__main__":
    sys.exit(main())
