"""The web UI (ldm/app.py): its form follows the model, and in a real browser (headless Chromium
through Selenium, the app a real `python -m ldm.app` process) it draws generate.py's very PNG."""

import json
import os
import runpy
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tomllib
import torch
from diffusers import AutoencoderKL, DDIMScheduler, LCMScheduler, UNet2DConditionModel
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image
from selenium.webdriver.common.by import By
from transformers import CLIPTextModel

from ldm.app import build, caption, draw_request, in_page, parse_args, request_config, serve
from ldm.diffusion.consistency import student_from
from ldm.diffusion.flow import flow_scheduler
from ldm.diffusion.objective import noise_scheduler
from ldm.export import export_onnx
from ldm.generate import main as generate_main
from ldm.generation.config import GenerateConfig
from ldm.generation.options import ModelKind, applicable_options, left_out, model_kind, samplers_for
from ldm.models.text import text_encoder_config
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from tests.browser import (
    ROOT,
    app_server,
    captions,
    chromium,
    download_first_image,
    error_messages,
    generate,
    requested_urls,
    type_into,
    wait_for,
)
from tests.conftest import TINY_TEXT_ENCODER, TINY_UNET, TINY_VAE

pytestmark = pytest.mark.usefixtures("single_thread")


def save_tiny_pipeline(folder, tokenizer, distilled: bool = False) -> str:
    """The conftest's tiny components as a saved pipeline; `distilled`: an LCM student of it, as
    ldm/training/distill.py saves one (guidance input, LCMScheduler, distillation.json)."""
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text_encoder_config(tokenizer, **TINY_TEXT_ENCODER)).eval()
    vae, unet = AutoencoderKL.from_config(TINY_VAE), UNet2DConditionModel.from_config(TINY_UNET)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False)
    if distilled:
        unet = student_from(unet, 32)
        scheduler = LCMScheduler.from_config(scheduler.config, original_inference_steps=50)
    LatentDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=scheduler).save_pretrained(folder)
    if distilled:
        facts = {"method": "lcm", "teacher": "tiny", "num_inference_steps": 3, "guidance_scale": 4.0}
        (folder / "distillation.json").write_text(json.dumps(facts))
    return str(folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    return save_tiny_pipeline(tmp_path_factory.mktemp("app") / "pipeline", tiny_tokenizer)


# ---------------------------------------------------------------- which options a model takes


def test_each_kind_of_model_is_offered_only_its_options():
    plain = ModelKind()
    assert "negative_prompt" in applicable_options(plain) and "lora_scale" not in applicable_options(plain)
    assert {"fast", "lora_scale"} & set(applicable_options(ModelKind(lora=True, backend="onnx"))) == set()
    assert "lcm" not in samplers_for(plain) and {"ddim", "euler_a", "dpm++2m_karras"} <= set(samplers_for(plain))
    assert "lora_scale" in applicable_options(ModelKind(lora=True))
    lcm = ModelKind(distillation={"method": "lcm", "num_inference_steps": 4})
    assert samplers_for(lcm) == ("lcm", "tcd") and "negative_prompt" in left_out(lcm)
    assert "num_inference_steps" in applicable_options(lcm)
    progressive = ModelKind(distillation={"method": "progressive", "num_inference_steps": 4})
    assert samplers_for(progressive) == ("ddim",)
    assert left_out(progressive)["num_inference_steps"] == "a progressive student samples at exactly its own 4 steps"
    flow = ModelKind(flow=True)
    assert samplers_for(flow) == ("dpm++2m", "unipc", "flow_euler", "flow_heun")


def test_a_flow_model_is_offered_the_flow_samplers():
    config = GenerateConfig(model="unused")
    assert model_kind(config, {}, flow_scheduler(1000, 3.0).config).flow
    assert not model_kind(config, {}, noise_scheduler("epsilon").config).flow


def form_ids(demo) -> dict[str, dict]:
    return {block["props"]["elem_id"]: block["props"] for block in demo.config["components"]
            if block["props"].get("elem_id")}


def test_a_distilled_model_s_page_offers_its_samplers_and_draws_at_its_own_steps(tmp_path, tiny_tokenizer):
    folder = save_tiny_pipeline(tmp_path / "lcm", tiny_tokenizer, distilled=True)
    _, config = parse_args(["--model", folder])
    served = serve(config, str(tmp_path))
    fields = form_ids(build(served))
    assert "negative_prompt" not in fields and "lora_scale" not in fields
    assert [choice[0] for choice in fields["scheduler"]["choices"]] == ["lcm", "tcd"]
    assert (fields["scheduler"]["value"], fields["num_inference_steps"]["value"]) == ("lcm", 3)
    assert fields["guidance_scale"]["value"] == 4.0

    config = request_config(served, dict(prompt="red heart", seed=3, random_seed=False, scheduler="tcd"))
    (path,) = draw_request(served, config, progress=lambda *args, **kwargs: None)
    text = Image.open(path).text
    assert (text["scheduler"], text["num_inference_steps"], text["guidance_scale"]) == ("tcd", "3", "4.0")


def save_lora(folder, model_dir) -> str:
    """Random LoRA adapters on the tiny UNet's attention, in diffusers' LoRA file."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    LatentDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return str(folder)


def test_a_model_with_lora_adapters_offers_their_scale_and_draws_with_it(model_dir, tmp_path):
    _, config = parse_args(["--model", model_dir, "--lora", save_lora(tmp_path / "lora", model_dir),
                            "--num_inference_steps", "2"])
    served = serve(config, str(tmp_path))
    fields = form_ids(build(served))
    assert fields["lora_scale"]["value"] == 1.0 and "negative_prompt" in fields

    def drawn(scale):
        values = dict(prompt="red heart", seed=3, random_seed=False, lora_scale=scale)
        (path,) = draw_request(served, request_config(served, values), progress=lambda *args, **kwargs: None)
        return path

    without, half = drawn(0.0), drawn(0.5)
    assert not np.array_equal(np.asarray(Image.open(without)), np.asarray(Image.open(half)))
    assert Image.open(half).text["lora_scale"] == "0.5" and caption(half).endswith("· LoRA 0.5")


def test_an_onnx_export_s_page_offers_no_fast_mode_and_draws_generate_py_s_png(model_dir, tmp_path):
    export_onnx(model_dir, str(tmp_path / "onnx"))
    _, config = parse_args(["--model", str(tmp_path / "onnx"), "--backend", "onnx", "--num_inference_steps", "2"])
    served = serve(config, str(tmp_path))
    fields = form_ids(build(served))
    assert "fast" not in fields and "lora_scale" not in fields and "negative_prompt" in fields
    values = dict(prompt="red heart", seed=5, random_seed=False, num_images_per_prompt=2)
    ours = draw_request(served, request_config(served, values), progress=lambda *args, **kwargs: None)

    assert generate_main(["--model", str(tmp_path / "onnx"), "--backend", "onnx", "--prompt", "red heart", "--seed",
                          "5", "--num_images_per_prompt", "2", "--num_inference_steps", "2",
                          "--output_dir", str(tmp_path / "cli")]) == 0
    for path in ours:
        theirs = Image.open(tmp_path / "cli" / os.path.basename(path))
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(theirs))
        assert Image.open(path).text == theirs.text and theirs.text["backend"] == "onnx"


def test_bad_input_becomes_a_message_in_the_form_s_words(model_dir, tmp_path):
    _, config = parse_args(["--model", model_dir])
    served = serve(config, str(tmp_path))
    for values, message in [(dict(prompt="  "), "Prompt is empty: describe the image to draw"),
                            (dict(prompt="cat", height=15), "Height 15 is not divisible by the VAE factor 2 (try 14)"),
                            (dict(prompt="cat", num_inference_steps=0), "Steps must be at least 1, got 0")]:
        with pytest.raises(ValueError) as error:
            draw_request(served, request_config(served, dict(values, random_seed=True)), progress=None)
        assert in_page(str(error.value)) == message
    assert not os.listdir(tmp_path)  # refused before anything was drawn


def test_a_model_that_fails_to_load_ends_the_app_with_the_reason_and_no_traceback(model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    shutil.rmtree(broken / "unet")
    result = subprocess.run([sys.executable, "-m", "ldm.app", "--model", str(broken), "--port", "1"], cwd=ROOT,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert f"ldm.app: error: could not load a pipeline '{broken}' from the folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_space_shim_builds_the_app_for_the_model_it_is_given(model_dir, monkeypatch):
    monkeypatch.setenv("LDM_MODEL", model_dir)
    demo = runpy.run_path(os.path.join(ROOT, "space", "app.py"))["demo"]
    assert {"prompt", "seed", "generate", "gallery"} <= set(form_ids(demo))


# ---------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def page(model_dir, tmp_path_factory):
    """The app serving the tiny model at 2 steps by default, and a headless Chromium on it."""
    downloads = str(tmp_path_factory.mktemp("downloads"))
    with app_server("--model", model_dir, "--num_inference_steps", "2") as url:
        driver = chromium(str(tmp_path_factory.mktemp("chromium-profile")), downloads)
        try:
            driver.get(url)
            wait_for(driver, lambda d: d.find_elements(By.ID, "generate"))
            yield driver, url, downloads
        finally:
            driver.quit()


def test_the_page_draws_and_downloads_generate_py_s_png(page, model_dir, tmp_path):
    driver, _, downloads = page
    out = tmp_path / "cli"  # generate.py draws the same settings meanwhile, in a process of its own
    cli = subprocess.Popen([sys.executable, "generate.py", "--model", model_dir, "--prompt", "red heart", "--seed", "7",
                            "--num_images_per_prompt", "2", "--num_inference_steps", "2", "--output_dir", str(out)],
                           cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    type_into(driver, "prompt", "red heart")
    type_into(driver, "seed", "7")
    type_into(driver, "num_images_per_prompt", "2")
    assert generate(driver, images=2) == [f"seed {seed} · ddim · 2 steps · guidance 7.5 · 16×16"
                                          for seed in (7, 8)]
    downloaded = download_first_image(driver, downloads)

    assert cli.wait(timeout=300) == 0, cli.stderr.read().decode()
    assert os.path.basename(downloaded) == "0000-red-heart-seed7.png"
    ours, theirs = Image.open(downloaded), Image.open(out / "0000-red-heart-seed7.png")
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert ours.text == theirs.text and ours.text["seed"] == "7"
    with open(downloaded, "rb") as file, open(out / "0000-red-heart-seed7.png", "rb") as cli_file:
        assert file.read() == cli_file.read()  # the very file, byte for byte


def test_the_page_fetches_nothing_from_the_internet(page):
    driver, url, _ = page
    driver.refresh()
    wait_for(driver, lambda d: d.find_elements(By.ID, "generate"))
    requested = {address for address in requested_urls(driver) if address.startswith(("http", "ws"))}
    assert any(address.startswith(url) for address in requested)  # (the browser's own chrome:// pages aside)
    assert {address for address in requested if not address.startswith(url)} == set()


def test_bad_input_shows_a_message_in_that_page_only_and_the_app_carries_on(page):
    driver, url, _ = page
    first = driver.current_window_handle
    driver.switch_to.new_window("window")  # a second user, with a session of their own
    driver.get(url)
    wait_for(driver, lambda d: d.find_elements(By.ID, "generate"))
    driver.find_element(By.ID, "generate").click()  # the prompt is empty
    wait_for(driver, lambda d: any("Prompt is empty: describe the image to draw" in m for m in error_messages(d)))
    type_into(driver, "prompt", "cat face")
    type_into(driver, "height", "15")
    driver.find_element(By.ID, "generate").click()
    wait_for(driver, lambda d: any("Height 15 is not divisible by the VAE factor 2 (try 14)" in message
                                   for message in error_messages(d)))
    assert not captions(driver)

    type_into(driver, "height", "24")
    assert generate(driver, images=1) == ["seed 0 · ddim · 2 steps · guidance 7.5 · 16×24"]
    driver.switch_to.window(first)
    assert not error_messages(driver)


def open_window(driver, url) -> str:
    """A new browser window on the app (a new Gradio session, as another user's); returns its handle."""
    driver.switch_to.new_window("window")
    driver.get(url)
    wait_for(driver, lambda d: d.find_elements(By.ID, "generate"))
    return driver.current_window_handle


def status(driver, handle) -> str:
    """What the gallery's status line says in window `handle`: the queue position, or the progress bar."""
    driver.switch_to.window(handle)
    return " ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, "#gallery [data-testid='status-tracker']"))


def test_a_second_request_waits_in_the_queue_while_the_first_shows_its_progress(page):
    driver, url, _ = page
    first, second = open_window(driver, url), open_window(driver, url)
    driver.switch_to.window(first)
    for elem_id, value in [("prompt", "rocket"), ("num_images_per_prompt", "4"), ("num_inference_steps", "8"),
                           ("height", "64"), ("width", "64")]:
        type_into(driver, elem_id, value)
    driver.find_element(By.ID, "generate").click()
    driver.switch_to.window(second)
    type_into(driver, "prompt", "pizza")
    driver.find_element(By.ID, "generate").click()
    wait_for(driver, lambda d: "step " in status(d, first) and "queue: 1/1" in status(d, second))
    driver.switch_to.window(second)
    assert wait_for(driver, lambda d: captions(d)) == ["seed 0 · ddim · 2 steps · guidance 7.5 · 16×16"]
    driver.switch_to.window(first)
    assert len(captions(driver)) == 4  # drawn before the second request ran


def test_the_space_requirements_hold_what_the_app_imports_at_the_tested_versions():
    """Every dependency of ours that `import ldm.app` loads is in space/requirements.txt, pinned as in
    constraints.txt (a Space installs gradio and its pillow itself)."""
    code = ("import sys, importlib.metadata as m, ldm.app; names = m.packages_distributions(); "
            "print(' '.join({d for module in list(sys.modules) for d in names.get(module.split('.')[0], [])}))")
    loaded = set(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                                timeout=300).stdout.split())
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as file:
        ours = {Requirement(line).name for line in tomllib.load(file)["project"]["dependencies"]}
    needed = {canonicalize_name(name) for name in loaded if name in ours or canonicalize_name(name) in ours}
    pinned = pins(os.path.join(ROOT, "space", "requirements.txt"))
    assert needed - {"pillow"} <= set(pinned), needed - set(pinned)
    tested = pins(os.path.join(ROOT, "constraints.txt"))
    assert {name: version for name, version in pinned.items() if version} == {
        name: tested[name] for name, version in pinned.items() if version}


def pins(path: str) -> dict[str, str | None]:
    """A requirements file's packages and their == versions (None when unpinned)."""
    with open(path) as file:
        lines = [line.strip() for line in file]
    requirements = [Requirement(line) for line in lines if line and not line.startswith(("#", "-"))]
    return {canonicalize_name(r.name): next((s.version for s in r.specifier if s.operator == "=="), None)
            for r in requirements}
