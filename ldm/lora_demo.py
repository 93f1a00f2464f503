"""`make lora-demo`: teach the `make demo` model a style it has never seen, with a LoRA adapter.

    python -m ldm.lora_demo

The style is colour inversion, asked for by a word no caption has: "inverted". One in eight OpenMoji
training emoji (454), inverted and captioned "<caption> inverted", and the same emoji as they are,
under their own captions, make an imagefolder (outputs/lora-data). The plain half is the prior
(DreamBooth's prior preservation, arXiv 2208.12242): every caption without the word shows the emoji
unchanged, so that the adapter ties the inversion to the word. train_unet.py trains a rank-16 adapter on
the `make demo` model's UNet and
text encoder (configs/unet/lora_demo.yaml); then the demo prompts, each with "inverted", are drawn
by the model without the adapter and with it, side by side in samples/lora-demo.png. Most of those
prompts name emoji outside the eighth, so the grid shows the style carried over to emoji it was not
shown in.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from PIL import Image, ImageOps

from ldm.data.openmoji import load_openmoji
from ldm.demo import UNET_DIR, run_timed

DATA_DIR = "outputs/lora-data"
LORA_DIR = "outputs/lora-demo"
PROMPTS = "configs/lora_demo_prompts.txt"
STYLE_WORD = "inverted"
EVERY = 8  # one training emoji in EVERY gets the style


def styled(image: Image.Image) -> Image.Image:
    return ImageOps.invert(image.convert("RGB"))


def write_concept(folder: str = DATA_DIR, resolution: int = 32) -> int:
    """The concept's imagefolder: the styled images and the plain ones, and a metadata.jsonl of their
    captions. Returns the number of styled images."""
    train = load_openmoji(resolution)["train"]
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as metadata:
        for index in range(0, len(train), EVERY):
            row = train[index]
            for name, image, caption in ((f"{index:05d}-{STYLE_WORD}.png", styled(row["image"]),
                                          f"{row['text']} {STYLE_WORD}"),
                                         (f"{index:05d}.png", row["image"], row["text"])):
                image.save(os.path.join(folder, name))
                metadata.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return len(range(0, len(train), EVERY))


def side_by_side(before: str, after: str, path: str) -> None:
    """The two grids with a white gutter between them."""
    left, right = Image.open(before), Image.open(after)
    sheet = Image.new("RGB", (left.width + 8 + right.width, max(left.height, right.height)), "white")
    sheet.paste(left, (0, 0))
    sheet.paste(right, (left.width + 8, 0))
    sheet.save(path)


def main() -> None:
    if not os.path.isfile(os.path.join(UNET_DIR, "model_index.json")):
        sys.exit(f"lora-demo adapts the `make demo` model, and {UNET_DIR} holds none: run `make demo` first")
    print(f"wrote {write_concept()} styled images, the same as they are, and their captions to {DATA_DIR}")
    shutil.rmtree(LORA_DIR, ignore_errors=True)
    python = sys.executable
    draw = [python, "generate.py", "--model", UNET_DIR, "--prompts_file", PROMPTS, "--num_inference_steps", "25",
            "--guidance_scale", "5"]
    minutes = {
        "LoRA": run_timed("LoRA", [python, "train_unet.py", "--config", "configs/unet/lora_demo.yaml"]),
        "before": run_timed("before", [*draw, "--output_dir", "samples/lora-before"]),
        "after": run_timed("after", [*draw, "--lora", LORA_DIR, "--output_dir", "samples/lora-after"]),
    }
    side_by_side("samples/lora-before/grid.png", "samples/lora-after/grid.png", "samples/lora-demo.png")
    print("\nwrote samples/lora-demo.png (left: without the adapter, right: with it)\n")
    print("| make lora-demo | minutes |\n|---|---:|")
    for name, value in minutes.items():
        print(f"| {name} | {value:.1f} |")


if __name__ == "__main__":
    main()
