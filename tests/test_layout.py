"""What code and folders from before the move into subpackages still get: the same imports, the same
`python -m` commands, and pipeline folders that load and draw the same images."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVED_BEFORE = os.path.join(ROOT, "tests", "fixtures", "main-124ecd7")


def test_the_pipeline_imports_as_before():
    from ldm import LatentDiffusionPipeline as from_package
    from ldm.pipeline import LatentDiffusionPipeline as from_module
    from ldm.pipelines.latent_diffusion import LatentDiffusionPipeline

    assert from_package is from_module is LatentDiffusionPipeline


def test_the_package_names_what_it_lacks():
    import ldm

    with pytest.raises(AttributeError, match="module 'ldm' has no attribute 'Pipeline'"):
        ldm.Pipeline


def test_a_pipeline_folder_saved_before_the_move_loads_and_draws_the_same_images(single_thread):
    from ldm.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(os.path.join(SAVED_BEFORE, "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["red heart", "rocket"], num_inference_steps=3, guidance_scale=4.0, height=16, width=16,
                  generator=torch.Generator().manual_seed(7), output_type="np").images
    expected = np.load(os.path.join(SAVED_BEFORE, "pipeline-images.npy"))
    assert images.shape == expected.shape == (2, 16, 16, 3)
    # Float32 kernels differ a little between CPUs; a changed loader or sampler moves pixels by far more.
    np.testing.assert_allclose(images, expected, atol=1e-4)


@pytest.mark.parametrize(("module", "usage"), [
    ("ldm.openmoji", "--resolution"),
    ("ldm.watermark", "detect"),
    ("ldm.hub", "push"),
    ("ldm.export", "onnx"),
    ("ldm.demo", "--fresh"),
])
def test_every_python_m_command_still_answers(module, usage):
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert usage in result.stdout
