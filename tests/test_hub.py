"""Sharing on the Hub against real servers on 127.0.0.1, offline (tests/hub_server.py): olah serves git
repositories to huggingface_hub's download client, and a small upload service takes the commits of
huggingface_hub's upload client into those same repositories.

Every Hub client runs in a subprocess (tests/hub_client.py): huggingface_hub reads HF_ENDPOINT, HF_HOME and
HF_HUB_OFFLINE when it is imported, and this process runs with HF_HUB_OFFLINE=1 (conftest.py). The live
variant of the push test talks to huggingface.co and runs only with HF_TOKEN and LDM_TEST_LIVE_HUB=1.
"""

import json
import os
import re
import subprocess
import sys
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from huggingface_hub import ModelCard, constants
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextModel

import generate
import train_unet
import train_vae
from ldm.config import ConfigError
from ldm.hub.files import HubError
from ldm.hub.push import files_to_push, push
from ldm.models.text import text_encoder_config
from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline
from tests.conftest import TINY_TEXT_ENCODER, TINY_UNET, TINY_VAE
from tests.hub_client import draw
from tests.hub_server import Olah, UploadService, commit, free_port, git, publish_folder, repo_folder
from tests.test_train_unet import argv as unet_argv
from tests.test_train_unet import fresh_accelerator_state  # noqa: F401 (a fixture)
from tests.test_train_vae import squares, tiny_run, tiny_vae_json  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "hf_ldm_tests_write_token"
GENERATE = ["--prompt", "red heart", "--num_inference_steps", "2"]
# The user's own Hub settings stay out of the subprocesses: each gets its endpoint, cache and token from the test.
USER_SETTINGS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                 "HF_ENDPOINT")


# ---------------------------------------------------------------- servers, repositories, clients


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """olah and the upload service over one folder of git repositories, for this module; olah is stopped by its PID."""
    workdir = tmp_path_factory.mktemp("hub")
    mirrors = str(workdir / "mirrors")
    os.makedirs(mirrors)
    olah = Olah(mirrors, str(workdir))
    upload = UploadService(mirrors, TOKEN)
    upload.start()
    try:
        olah.wait_until_ready()
        yield SimpleNamespace(mirrors=mirrors, olah=olah.endpoint, upload=upload.endpoint)
    finally:
        olah.stop()
        upload.stop()


def client_env(endpoint: str, hf_home, offline: bool = False, **extra) -> dict:
    """A Hub client's environment: its endpoint, its own cache, uploads over plain LFS (no Xet), no telemetry."""
    env = {key: value for key, value in os.environ.items() if key not in USER_SETTINGS}
    return {**env, "HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1" if offline else "0",
            "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1", **extra}


def run_clients(jobs: dict, env: dict) -> dict:
    """Run tests/hub_client.py's jobs (name → job) in one subprocess; returns name → result."""
    done = subprocess.run([sys.executable, "-m", "tests.hub_client", json.dumps(list(jobs.values()))], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(zip(jobs, json.loads(done.stdout.splitlines()[-1])))


def save_tiny_pipeline(folder, tokenizer, seed: int) -> str:
    torch.manual_seed(seed)
    LatentDiffusionPipeline(
        vae=AutoencoderKL.from_config(TINY_VAE), unet=UNet2DConditionModel.from_config(TINY_UNET),
        text_encoder=CLIPTextModel(text_encoder_config(tokenizer, **TINY_TEXT_ENCODER)), tokenizer=tokenizer,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory, tiny_tokenizer):
    """Two tiny pipelines with different weights: v1 and v2."""
    folder = tmp_path_factory.mktemp("pipelines")
    return SimpleNamespace(v1=save_tiny_pipeline(folder / "v1", tiny_tokenizer, 0),
                           v2=save_tiny_pipeline(folder / "v2", tiny_tokenizer, 1))


@pytest.fixture(scope="module")
def published(servers, pipelines, tmp_path_factory):
    """tester/tiny: pipeline v1 tagged v1, then v2 on main; tester/vae: v1's VAE alone; tester/notes: no model."""
    publish_folder(servers.mirrors, "tester/tiny", pipelines.v1, tag="v1")
    publish_folder(servers.mirrors, "tester/tiny", pipelines.v2)
    # transformers' tokenizer loader lists additional_chat_templates/ of a Hub repository and treats only a 404
    # as "none". The Hub answers 404 for a missing folder, olah 401 ("repository not found"), so the folder exists.
    commit(repo_folder(servers.mirrors, "tester/tiny"), {"additional_chat_templates/README.md": b"No templates.\n"},
           "an empty template folder, for olah")
    publish_folder(servers.mirrors, "tester/vae", os.path.join(pipelines.v1, "vae"))
    notes = tmp_path_factory.mktemp("notes")
    (notes / "README.md").write_text("# Notes\n\nNo model here.\n")
    publish_folder(servers.mirrors, "tester/notes", str(notes))


ERROR_CASES = {  # generate.py --model/--revision → what its one-line error says
    "missing_repository": (["--model", "tester/no-such-model"], "repository tester/no-such-model does not exist on"),
    "missing_revision": (["--model", "tester/tiny", "--revision", "no-such-branch"],
                         "revision 'no-such-branch' does not exist in tester/tiny; its branches and tags are main, v1"),
    "not_a_model": (["--model", "tester/notes"], "tester/notes (revision main) is not a pipeline or a model: it has "
                                                 "neither model_index.json"),
    "a_vae": (["--model", "tester/vae"], "tester/vae holds a single AutoencoderKL, not a pipeline"),
}


@pytest.fixture(scope="module")
def online(servers, published, tmp_path_factory):
    """One client process against olah, with a fresh cache (warmed here, read offline later): from_pretrained
    of main, generate.py of the v1 tag, the error cases, and the training scripts' loaders by id."""
    folder = tmp_path_factory.mktemp("online")
    jobs = {"draw": ["draw", "tester/tiny", "main", str(folder / "main.npy")],
            "generate": ["generate", "--model", "tester/tiny", "--revision", "v1", *GENERATE, "--output_dir",
                         str(folder / "by_id")],
            "load_for_training": ["load_for_training", "tester/vae", "tester/tiny", str(folder / "loaded")]}
    for case, (flags, _) in ERROR_CASES.items():
        jobs[case] = ["generate", *flags, *GENERATE, "--output_dir", str(folder / case)]
    results = run_clients(jobs, client_env(servers.olah, folder / "hf_home"))
    return SimpleNamespace(folder=folder, results=results)


def pixels(folder):
    return {name: np.asarray(Image.open(os.path.join(folder, name))) for name in sorted(os.listdir(folder))}


def same_images(folder_a, folder_b) -> bool:
    a, b = pixels(folder_a), pixels(folder_b)
    return a.keys() == b.keys() and all(np.array_equal(a[name], b[name]) for name in a)


def same_weights(path_a, path_b) -> bool:
    a, b = load_file(path_a), load_file(path_b)
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def same_files(folder_a, folder_b, names) -> bool:
    def read(folder, name):
        with open(os.path.join(folder, name), "rb") as file:
            return file.read()
    return all(read(folder_a, name) == read(folder_b, name) for name in names)


# ---------------------------------------------------------------- pull


def test_a_pipeline_pulled_by_id_draws_what_its_folder_draws(online, pipelines, tmp_path):
    for version in ("v1", "v2"):
        draw(getattr(pipelines, version), None, str(tmp_path / f"{version}.npy"))
    pulled = np.load(online.folder / "main.npy")
    assert np.array_equal(pulled, np.load(tmp_path / "v2.npy"))
    assert not np.allclose(pulled, np.load(tmp_path / "v1.npy"))


def test_generate_by_id_and_tag_writes_what_generate_from_the_folder_writes(online, pipelines, tmp_path):
    code, errors = online.results["generate"]
    assert code == 0, errors
    for version in ("v1", "v2"):
        assert generate.main(["--model", getattr(pipelines, version), *GENERATE, "--output_dir",
                              str(tmp_path / version)]) == 0
    assert same_images(online.folder / "by_id", tmp_path / "v1")
    assert not same_images(online.folder / "by_id", tmp_path / "v2")  # the tag, not main, was loaded


@pytest.mark.parametrize("case", ERROR_CASES)
def test_hub_errors_are_one_clear_line_and_write_nothing(online, case):
    code, errors = online.results[case]
    assert code == 2
    assert ERROR_CASES[case][1] in errors
    assert "Traceback" not in errors
    assert not os.path.exists(online.folder / case)


def test_the_training_options_load_models_by_hub_id(online, pipelines):
    """--pretrained_vae_model_name_or_path of both trainers, and train_unet.py's
    --pretrained_model_name_or_path and --text_encoder_name_or_path, given Hub ids."""
    loaded = online.folder / "loaded"
    for part in ("train_vae", "vae"):
        assert same_weights(loaded / part / "diffusion_pytorch_model.safetensors",
                            os.path.join(pipelines.v1, "vae", "diffusion_pytorch_model.safetensors"))
    for part, weights in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        assert same_weights(loaded / part / weights, os.path.join(pipelines.v2, part, weights))


def test_offline_a_warm_cache_serves_and_a_cold_one_says_so(online, tmp_path):
    """HF_HUB_OFFLINE=1 and an endpoint where nothing listens: only the cache can answer."""
    nowhere = f"http://127.0.0.1:{free_port()}"
    env = client_env(nowhere, online.folder / "hf_home", offline=True)
    results = run_clients({
        "warm": ["generate", "--model", "tester/tiny", "--revision", "v1", *GENERATE, "--output_dir",
                 str(tmp_path / "warm")],
        "cold": ["generate", "--model", "tester/notes", *GENERATE, "--output_dir", str(tmp_path / "cold")]}, env)
    assert results["warm"][0] == 0, results["warm"][1]
    assert same_images(tmp_path / "warm", online.folder / "by_id")
    code, errors = results["cold"]
    assert code == 2 and "Traceback" not in errors
    assert "tester/notes (revision main) is not in the Hugging Face cache" in errors
    assert "HF_HUB_OFFLINE is set" in errors
    assert not os.path.exists(tmp_path / "cold")


# ---------------------------------------------------------------- push


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory, squares, tiny_vae_json):  # noqa: F811 (fixtures)
    output_dir = str(tmp_path_factory.mktemp("vae") / "squares-vae")
    train_vae.main(tiny_run(output_dir, squares, tiny_vae_json, max_train_steps=2))
    return output_dir


@pytest.fixture(params=["local", "live"])
def hub(request, tmp_path):
    """Where a push goes and where it is pulled back from: the upload service and olah, or huggingface.co
    (opt-in: HF_TOKEN and LDM_TEST_LIVE_HUB=1; the repositories it creates are deleted after)."""
    if request.param == "local":
        servers = request.getfixturevalue("servers")
        yield SimpleNamespace(push=client_env(servers.upload, tmp_path / "push", HF_TOKEN=TOKEN),
                              pull=client_env(servers.olah, tmp_path / "pull"), created=[],
                              commit_titles=lambda repo_id: git(repo_folder(servers.mirrors, repo_id), "log",
                                                                "--format=%s").splitlines())
        return
    if not (os.environ.get("HF_TOKEN") and os.environ.get("LDM_TEST_LIVE_HUB") == "1"):
        pytest.skip("talks to huggingface.co: set HF_TOKEN (with write access) and LDM_TEST_LIVE_HUB=1")
    live = client_env("https://huggingface.co", tmp_path / "hf_home", HF_TOKEN=os.environ["HF_TOKEN"])
    created = []
    yield SimpleNamespace(push=live, pull=live, created=created,
                          commit_titles=lambda repo_id: run_clients({"log": ["commits", repo_id]}, live)["log"])
    if created:
        run_clients({repo_id: ["delete", repo_id] for repo_id in created}, live)


def push_command(folder, repo_id, env, *flags):
    return subprocess.run([sys.executable, "-m", "ldm.hub", "push", str(folder), repo_id, *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def listing(folder) -> dict:
    """Every file under `folder` with its size and modification time."""
    return {os.path.join(root, name): (os.stat(os.path.join(root, name)).st_size,
                                       os.stat(os.path.join(root, name)).st_mtime_ns)
            for root, _, names in os.walk(folder) for name in names}


def test_push_uploads_a_vae_with_its_model_card_in_one_commit(hub, trained_vae, squares):  # noqa: F811
    before = listing(trained_vae)
    name = f"ldm-test-vae-{uuid.uuid4().hex[:8]}"  # a bare name goes under the token's user
    pushed = push_command(trained_vae, name, hub.push, "--hub_private", "--hub_license", "mit")
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    repo_id = re.search(r"/([^/]+/[^/]+)/commit/[0-9a-f]{40}$", pushed.stdout.strip()).group(1)
    hub.created.append(repo_id)
    assert repo_id.endswith("/" + name)
    assert listing(trained_vae) == before  # the card went up from memory

    assert hub.commit_titles(repo_id) == ["Upload the VAE trained with ldm", "initial commit"]
    pulled = run_clients({"pull": ["snapshot", repo_id]}, hub.pull)["pull"]
    expected = files_to_push(trained_vae, {})
    assert "diffusion_pytorch_model.safetensors" in expected and "training_config.yaml" in expected
    assert same_files(trained_vae, pulled, expected)
    card = ModelCard.load(os.path.join(pulled, "README.md"))
    assert (card.data.library_name, card.data.license) == ("diffusers", "mit")
    assert card.data.datasets == [os.path.basename(squares)]
    assert card.data.pipeline_tag is None  # an autoencoder draws nothing from text
    assert "| psnr |" in card.text and "| ssim |" in card.text and "| scaling_factor |" in card.text
    assert "## Training config" in card.text and "train_data_dir:" in card.text
    image = re.search(r"!\[samples\]\((validation/step-\d+\.png)\)", card.text).group(1)
    assert os.path.isfile(os.path.join(pulled, image))


def test_push_without_a_token_fails_before_anything_is_sent(servers, trained_vae, tmp_path, monkeypatch, squares,
                                                            tiny_vae_json, parts):  # noqa: F811 (fixtures)
    refused = push_command(trained_vae, "tester/no-token", client_env(servers.upload, tmp_path / "hf_home"))
    assert refused.returncode == 2
    assert "pushing to the Hugging Face Hub needs a token with write access" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not os.path.exists(repo_folder(servers.mirrors, "tester/no-token"))
    # The trainers refuse at start, before any work. This process must not find the developer's own token.
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(ConfigError, match="needs a token"):
        train_vae.main(tiny_run(str(tmp_path / "vae"), squares, tiny_vae_json, push_to_hub="true"))
    with pytest.raises(ConfigError, match="needs a token"):
        train_unet.main(unet_argv(parts, tmp_path / "unet", "--push_to_hub"))
    assert not os.path.exists(tmp_path / "vae") and not os.path.exists(tmp_path / "unet")


def test_only_a_pipeline_or_a_vae_is_pushed(tmp_path, pipelines):
    with pytest.raises(HubError, match="is not a pipeline or a model"):
        push(str(tmp_path), "tester/empty", token=TOKEN)
    with pytest.raises(HubError, match="holds a UNet2DConditionModel; push a pipeline"):
        push(os.path.join(pipelines.v1, "unet"), "tester/unet", token=TOKEN)


def test_a_pipeline_trained_with_push_to_hub_is_pulled_by_id_and_drawn(servers, parts, openmoji_32, tmp_path):
    """train_unet.py --push_to_hub against the upload service, then generate.py --model <id> through olah."""
    out = tmp_path / "emoji"
    trained = subprocess.run(
        [sys.executable, "train_unet.py", *unet_argv(parts, out, "--max_train_steps", "2", "--checkpointing_steps", "1",
                                                     "--report_to", "tensorboard", "--push_to_hub",
                                                     "--hub_model_id", "tester/emoji", "--hub_token", TOKEN)],
        cwd=ROOT, env=client_env(servers.upload, tmp_path / "hf_push"), capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    for path in listing(out):  # the token reached neither the saved configs nor the TensorBoard logs
        with open(path, "rb") as file:
            assert TOKEN.encode() not in file.read(), path

    pull = client_env(servers.olah, tmp_path / "hf_pull")
    drawn = subprocess.run([sys.executable, "generate.py", "--model", "tester/emoji", *GENERATE, "--output_dir",
                            str(tmp_path / "by_id")], cwd=ROOT, env=pull, capture_output=True, text=True, timeout=300)
    assert drawn.returncode == 0, drawn.stderr[-3000:]
    assert generate.main(["--model", str(out), *GENERATE, "--output_dir", str(tmp_path / "local")]) == 0
    assert same_images(tmp_path / "by_id", tmp_path / "local")

    pulled = run_clients({"pull": ["snapshot", "tester/emoji"]}, pull)["pull"]
    assert not [name for name in os.listdir(pulled) if name.startswith("checkpoint-") or name == "logs"]
    card = ModelCard.load(os.path.join(pulled, "README.md"))
    assert (card.data.library_name, card.data.pipeline_tag) == ("diffusers", "text-to-image")
    assert (card.data.license, card.data.datasets) == ("cc-by-sa-4.0", ["openmoji"])
    assert "| global_step | 2 |" in card.text and "[OpenMoji](https://openmoji.org)" in card.text
    assert "push_to_hub: true" in card.text and "hub_token: null" in card.text
    assert "![samples](validation/step-000002.png)" in card.text
    assert os.path.isfile(os.path.join(pulled, "validation", "step-000002.png"))


def test_a_lora_trained_on_a_pipeline_by_id_is_pushed_with_its_card_and_drawn_by_id(servers, published, pipelines,
                                                                                     openmoji_32, tmp_path):
    """train_unet.py --lora_rank on tester/tiny through olah, `python -m ldm.hub push` to the upload service,
    then generate.py --model tester/tiny --lora <its id> through olah: the images of the local files."""
    out, pull = tmp_path / "lora", client_env(servers.olah, tmp_path / "hf_pull")
    trained = subprocess.run(
        [sys.executable, "train_unet.py", "--pretrained_model_name_or_path", "tester/tiny", "--revision", "main",
         "--lora_rank", "4", "--lora_concept", "emoji style", "--output_dir", str(out), "--resolution", "16",
         "--max_train_samples", "8", "--train_batch_size", "8", "--max_train_steps", "2", "--learning_rate", "1e-2",
         "--validation_prompts", "red heart", "--validation_inference_steps", "2", "--report_to", "none"],
        cwd=ROOT, env=pull, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    pushed = push_command(out, "tester/tiny-lora", client_env(servers.upload, tmp_path / "push", HF_TOKEN=TOKEN))
    assert pushed.returncode == 0, pushed.stderr[-3000:]

    results = run_clients({"generate": ["generate", "--model", "tester/tiny", "--lora", "tester/tiny-lora", *GENERATE,
                                        "--output_dir", str(tmp_path / "by_id")],
                           "pull": ["snapshot", "tester/tiny-lora"]}, pull)
    assert results["generate"][0] == 0, results["generate"][1]
    for name, flags in (("local", ["--lora", str(out)]), ("base", [])):
        assert generate.main(["--model", pipelines.v2, *flags, *GENERATE, "--output_dir", str(tmp_path / name)]) == 0
    assert same_images(tmp_path / "by_id", tmp_path / "local")
    assert not same_images(tmp_path / "local", tmp_path / "base")

    pulled = results["pull"]
    assert {"README.md", "pytorch_lora_weights.safetensors", "training_config.yaml", "metrics.json"} <= set(
        os.listdir(pulled))
    assert not [name for name in os.listdir(pulled) if name.startswith("checkpoint-") or name == "logs"]
    card = ModelCard.load(os.path.join(pulled, "README.md"))
    metadata = card.data.to_dict()
    assert (metadata["base_model"], metadata["library_name"], metadata["instance_prompt"]) == (
        "tester/tiny", "diffusers", "emoji style")
    assert {"lora", "text-to-image"} <= set(metadata["tags"])
    assert 'pipe.load_lora_weights("tester/tiny-lora")' in card.text
