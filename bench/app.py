"""What the web UI (ldm/app.py) costs on top of generate.py's drawing, on one CPU thread: the same
images timed as generate.py's command (load + draw + write), as `draw()` in a process that has the
model loaded already (what the app runs per request), and as a user sees them in a headless
Chromium (click Generate → the gallery shows them). Prints a table; with --screenshot, saves the
page with the last request's images (the README's docs/app.png).

    python bench/app.py --model outputs/unet-demo --screenshot docs/app.png
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

from ldm.generation.config import parse_args  # noqa: E402
from ldm.generation.loading import prepare  # noqa: E402
from ldm.generation.output import draw, image_jobs, in_batches  # noqa: E402
from tests.browser import app_server, chromium, generate, type_into, wait_for  # noqa: E402

PROMPTS = ["red heart", "Santa Claus", "grinning face", "rocket"]


def time_command(model: str, images: int, prompt: str) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run([sys.executable, "generate.py", "--model", model, "--prompt", prompt, "--num_images_per_prompt",
                        str(images), "--output_dir", out], cwd=ROOT, check=True, capture_output=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
        return time.perf_counter() - start


def time_draw(model: str, images: int, prompt: str) -> float:
    config = parse_args(["--model", model, "--prompt", prompt, "--num_images_per_prompt", str(images)])
    pipe, prompts, _ = prepare(config)
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    for batch in in_batches(image_jobs(prompts, config), config.batch_size):
        draw(pipe, batch, config)
    return time.perf_counter() - start


def time_page(driver, images: int, prompt: str, seed: int) -> float:
    type_into(driver, "prompt", prompt)
    type_into(driver, "num_images_per_prompt", str(images))
    type_into(driver, "seed", str(seed))  # a new seed each time, so the gallery's captions change
    start = time.perf_counter()
    generate(driver, images)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/unet-demo")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--screenshot", help="save the page, with the last request's images, to this PNG")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = {}
    start = time.perf_counter()
    with app_server("--model", args.model) as url, tempfile.TemporaryDirectory() as scratch:
        serving = time.perf_counter() - start
        driver = chromium(os.path.join(scratch, "profile"), scratch)
        try:
            driver.get(url)
            wait_for(driver, lambda d: d.find_elements(By.ID, "generate"))
            for images in (1, 4):
                for repeat in range(args.repeats):  # interleaved, so the machine's load falls on all three alike
                    prompt, seed = PROMPTS[repeat % len(PROMPTS)], 100 * images + repeat
                    for path, seconds in [("generate.py command", time_command(args.model, images, prompt)),
                                          ("draw(), model loaded", time_draw(args.model, images, prompt)),
                                          ("web page", time_page(driver, images, prompt, seed))]:
                        rows.setdefault((path, images), []).append(seconds)
            if args.screenshot:
                driver.set_window_size(1280, 1100)
                driver.execute_script("window.scrollTo(0, 0)")
                driver.save_screenshot(args.screenshot)
        finally:
            driver.quit()
    print(f"{args.model}, default settings, one CPU thread, median of {args.repeats}; app start to serving: "
          f"{serving:.1f} s\n")
    print("| path | images | seconds | × draw() |")
    print("|---|---:|---:|---:|")
    for (path, images), seconds in rows.items():
        base = statistics.median(rows[("draw(), model loaded", images)])
        print(f"| {path} | {images} | {statistics.median(seconds):.2f} | {statistics.median(seconds) / base:.2f} |")


if __name__ == "__main__":
    main()
