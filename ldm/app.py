"""`python -m ldm.app --model FOLDER_OR_HUB_ID`: a web page (Gradio) that draws with a saved pipeline.

Each request is settled, checked and drawn by generate.py's own functions (settle, check_config,
draw), batched as generate.py batches, so a seed gives the same PNG, pixels and text chunk, in the
page as on the command line. The form shows the options ldm/generation/options.py says the model takes.
Requests wait in Gradio's queue and run one at a time: on a CPU two at once would only share
the cores and both finish later.
"""

from __future__ import annotations

import os

# Gradio reads this when it is imported: no usage reports. (Its default theme's fonts are served by the
# app itself; tests/test_app.py checks that the page asks nothing of any other host.)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import copy  # noqa: E402
import dataclasses  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import gradio as gr  # noqa: E402
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402

from ldm.diffusion.schedulers import scheduler_name  # noqa: E402
from ldm.generate import _log_to_stderr  # noqa: E402
from ldm.generation.config import GenerateConfig, check_config, read_prompts  # noqa: E402
from ldm.generation.loading import configure, load_model, settle  # noqa: E402
from ldm.generation.options import ModelKind, applicable_options, left_out, model_kind, option_help, samplers_for  # noqa: E402
from ldm.generation.output import draw, image_jobs, in_batches  # noqa: E402
from ldm.hub.files import read_distillation  # noqa: E402
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline  # noqa: E402

# What generate.py does that a page of prompts does not: edits and files of prompts.
NOT_SERVED = ("prompts_file", "init_image", "mask_image", "strength", "padding_mask_crop", "output_dir")

# The form's name for each request option; generate.py's messages name the flag, the page names the field.
LABELS = {"prompt": "Prompt", "negative_prompt": "Negative prompt", "scheduler": "Sampler",
          "num_inference_steps": "Steps", "guidance_scale": "Guidance", "seed": "Seed",
          "num_images_per_prompt": "Images", "width": "Width", "height": "Height", "fast": "Fast mode",
          "lora_scale": "LoRA scale"}
RANDOM_SEED = "random_seed"
MAX_IMAGES = 8


@dataclass
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "Address to serve on; 0.0.0.0 for every interface."})
    port: int = field(default=7860, metadata={"help": "Port to serve on."})
    share: bool = field(default=False, metadata={
        "help": "Also serve through a temporary public gradio.live link (traffic goes through Gradio's servers)."})


def parse_args(argv: list[str] | None = None) -> tuple[ServerConfig, GenerateConfig]:
    """The server's flags, and generate.py's: --model, --lora, --dtype, --device, ... and the form's
    starting values (--scheduler, --num_inference_steps, --seed, ...)."""
    parser = HfArgumentParser((ServerConfig, GenerateConfig), prog="python -m ldm.app",
                              description="Serve a text-to-image pipeline as a web page (Gradio).")
    server, config = parser.parse_args_into_dataclasses(args=argv)
    return server, config


@dataclass
class Served:
    """The loaded model and what every request starts from."""
    pipe: LatentDiffusionPipeline
    defaults: GenerateConfig  # the command line's, settled for this model: native size, its own steps, ...
    distillation: dict
    saved_scheduler: SchedulerMixin  # the model's own: each request's sampler is built from its config
    folder: str  # where the requests' PNGs are written

    @property
    def kind(self) -> ModelKind:
        return model_kind(self.defaults, self.distillation, self.saved_scheduler.config)


def serve(config: GenerateConfig, folder: str) -> Served:
    """Check the command line and load the model; raises ValueError with the reason."""
    check_config(config)
    for name in NOT_SERVED:
        if getattr(config, name) != GenerateConfig.__dataclass_fields__[name].default:
            raise ValueError(f"--{name} is not served by the web UI, which draws from typed prompts: use generate.py")
    pipe = load_model(config)
    distillation = read_distillation(config.model, config.revision)
    defaults = copy.deepcopy(config)
    settle(pipe, defaults, distillation)
    defaults.scheduler = defaults.scheduler or scheduler_name(pipe.scheduler)
    return Served(pipe, defaults, distillation, pipe.scheduler, folder)


def request_config(served: Served, values: dict) -> GenerateConfig:
    """generate.py's config for one request: the command line's, with what the form set."""
    values = dict(values)
    if values.pop(RANDOM_SEED) or values.get("seed") is None:
        values["seed"] = secrets.randbelow(2**31)
    values["prompt"] = [values["prompt"]]
    return dataclasses.replace(served.defaults, **values)


def draw_request(served: Served, config: GenerateConfig, progress: gr.Progress) -> list[str]:
    """Check, then draw the request's images as generate.py would, and write their PNGs; returns the paths."""
    check_config(config)
    prompts = read_prompts(config)
    settle(served.pipe, config, served.distillation)
    served.pipe.scheduler = served.saved_scheduler
    served.pipe.disable_fast_mode()
    configure(served.pipe, config)
    batches = in_batches(image_jobs(prompts, config), config.batch_size)
    folder = tempfile.mkdtemp(prefix="request-", dir=served.folder)
    paths = []
    for number, batch in enumerate(batches):
        def on_step(i: int, number: int = number) -> None:
            steps = len(served.pipe.scheduler.timesteps)
            progress((number + (i + 1) / steps) / len(batches), desc=f"step {i + 1}/{steps}")
        for job, (image, metadata) in zip(batch, draw(served.pipe, batch, config, on_step=on_step)):
            paths.append(os.path.join(folder, job.file_name))
            image.save(paths[-1], pnginfo=metadata)
    return paths


def caption(path: str) -> str:
    """The parameters an image was drawn with, read back from its PNG's text chunk."""
    text = Image.open(path).text
    parts = [f"seed {text['seed']}", text["scheduler"], f"{text['num_inference_steps']} steps",
             f"guidance {text['guidance_scale']}", f"{text['width']}×{text['height']}"]
    if text.get("lora_scale"):
        parts.append(f"LoRA {text['lora_scale']}")
    return " · ".join(parts)


def in_page(message: str) -> str:
    """generate.py's message with each --flag it names replaced by the form's label for it."""
    return re.sub(r"--(\w+)", lambda flag: LABELS.get(flag[1], flag[0]), message)


def build(served: Served) -> gr.Blocks:
    """The page: the options that apply to the model, a Generate button, and a gallery of PNGs."""
    kind, defaults = served.kind, served.defaults
    with gr.Blocks(title=f"ldm · {defaults.model}", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"### {defaults.model}\n" + "".join(
            f"- *{LABELS[name]}* is not offered: {reason}.\n" for name, reason in left_out(kind).items()))
        with gr.Row():
            with gr.Column():
                widgets = form(served, applicable_options(kind))
                run = gr.Button("Generate", variant="primary", elem_id="generate")  # left: messages show top right
            with gr.Column():
                gallery = gr.Gallery(label="Images", elem_id="gallery", columns=2, height=580,
                                     object_fit="contain", buttons=["download"], interactive=False)
                files = gr.File(label="PNG files", file_count="multiple", elem_id="files", interactive=False)

        def on_click(data: dict, progress=gr.Progress()):
            values = {name: data[component] for name, component in widgets.items()}
            try:
                config = request_config(served, values)
                paths = draw_request(served, config, progress)
            except ValueError as error:  # bad input: a message in this user's page, the server carries on
                raise gr.Error(in_page(str(error)), duration=None) from None
            return [(path, caption(path)) for path in paths], paths, config.seed

        run.click(on_click, inputs=set(widgets.values()), outputs=[gallery, files, widgets["seed"]])
    return demo


def form(served: Served, names: list[str]) -> dict[str, gr.Component]:
    """A field for each option in `names`, in their order, pairs of short ones side by side."""
    widgets = {}
    pairs = {"seed": RANDOM_SEED, "width": "height", "num_inference_steps": "guidance_scale",
             "num_images_per_prompt": "fast"}
    for name in names:
        if name in widgets:
            continue
        partner = pairs.get(name)
        if partner is None:
            widgets[name] = widget(name, served)
            continue
        with gr.Row():
            widgets[name] = widget(name, served)
            if partner == RANDOM_SEED:
                widgets[RANDOM_SEED] = gr.Checkbox(label="Random seed", value=False, elem_id=RANDOM_SEED)
            elif partner in names:
                widgets[partner] = widget(partner, served)
    return widgets


def widget(name: str, served: Served) -> gr.Component:
    """The form field for request option `name`, starting at the command line's (settled) value."""
    value, factor = getattr(served.defaults, name), served.pipe.vae_scale_factor
    common = dict(label=LABELS[name], elem_id=name)
    if name == "prompt":
        return gr.Textbox(value=value[0] if value else "", placeholder="what to draw", lines=2, **common)
    if name == "negative_prompt":
        return gr.Textbox(value=value or "", placeholder="what the images should not show", lines=1, **common)
    if name == "scheduler":
        return gr.Dropdown(choices=list(samplers_for(served.kind)), value=value, **common)
    if name in ("width", "height"):
        return gr.Number(value=value, precision=0, step=factor, info=f"pixels, a multiple of {factor}", **common)
    if name == "seed":
        return gr.Number(value=value, precision=0, info=option_help(name), **common)
    if name == "fast":
        return gr.Checkbox(value=value, info="the UNet in bfloat16: faster on CPUs with bf16 units", **common)
    # (lowest, usual highest, step, decimals: 0 gives an int, as GenerateConfig's field is)
    ranges = {"num_inference_steps": (1, 100, 1, 0), "guidance_scale": (0.0, 20.0, 0.5, None),
              "num_images_per_prompt": (1, MAX_IMAGES, 1, 0), "lora_scale": (0.0, 2.0, 0.05, None)}
    low, high, step, precision = ranges[name]
    return gr.Slider(low, max(high, value), value=value, step=step, precision=precision,  # a flag may go beyond
                     info=in_page(option_help(name)), **common)


def launch(demo: gr.Blocks, server: ServerConfig, folder: str) -> None:
    demo.queue(default_concurrency_limit=1)  # one request at a time, the others wait their turn
    # ssr_mode=False: server-side rendering would need Node.js, which the app does not need otherwise
    demo.launch(server_name=server.host, server_port=server.port, share=server.share, ssr_mode=False,
                allowed_paths=[folder])


def main(argv: list[str] | None = None) -> int:
    _log_to_stderr()
    server, config = parse_args(argv)
    # Stopped with SIGTERM (kill PID), it still removes its PNGs' folder on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with tempfile.TemporaryDirectory(prefix="ldm-app-") as folder:
        try:
            served = serve(config, folder)
        except ValueError as error:
            print(f"ldm.app: error: {error}", file=sys.stderr)
            return 2
        launch(build(served), server, folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
