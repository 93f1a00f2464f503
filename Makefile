# The two commands a new user runs: `make demo` and `make test`.
# Both create .venv when it is missing and install into it, offline-safe on a CPU machine.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo distill-demo lora-demo app test test-slow lint install clean

install: $(INSTALLED)

# torch goes in first, pinned: an unpinned torch would pull a CUDA build of several GB.
# invisible-watermark (imwatermark, the tests' reference watermark decoder) goes in last, without the
# opencv-python it declares, whose cv2 fails to import without libGL.so.1: the test extra brings
# opencv-python-headless and PyWavelets instead, all that imwatermark imports.
# gradio (the `ui` extra: ldm/app.py) goes in the same way, --no-deps, then its other requirements as it
# declares them: it caps pillow<13, and we pin pillow 13.0.0, on which the browser tests run it.
# torch-fidelity (the Inception network behind torchmetrics' FID/KID/IS, the `eval` extra's metrics) goes in
# --no-deps too: it declares torchvision, which has no build for our CPU torch and would pull a CUDA torch of
# several GB. The modules of it that torchmetrics imports need only torch; ldm/evaluation/torchmetrics_import.py
# keeps its package __init__, which imports torchvision, from running.
$(INSTALLED): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,onnx,lint,eval]" -c constraints.txt
	$(PY) -m pip install --quiet --no-deps invisible-watermark gradio torch-fidelity -c constraints.txt
	$(PY) -c "$$GRADIO_REQUIREMENTS" > $(VENV)/gradio-requirements.txt
	$(PY) -m pip install --quiet -r $(VENV)/gradio-requirements.txt -c constraints.txt
	touch $@

# gradio's own requirements, less pillow (see above).
define GRADIO_REQUIREMENTS
from importlib.metadata import requires
from packaging.requirements import Requirement
for requirement in map(Requirement, requires("gradio")):
    if requirement.name != "pillow" and (requirement.marker is None or requirement.marker.evaluate({"extra": ""})):
        print(requirement)
endef
export GRADIO_REQUIREMENTS

# The web UI's tests drive Debian's Chromium through its chromedriver (tests/browser.py). Installed when
# missing (CI runs as root); without recommends, which would bring systemd, CUPS and Perl with them.
CHROMEDRIVER := /usr/bin/chromedriver

$(CHROMEDRIVER):
	apt-get install -y --no-install-recommends chromium chromium-driver || \
		(apt-get update && apt-get install -y --no-install-recommends chromium chromium-driver)

test: $(INSTALLED) $(CHROMEDRIVER)
	$(PY) -m pytest -m "not slow" -q

test-slow: $(INSTALLED) $(CHROMEDRIVER)
	$(PY) -m pytest -m slow -q

# ruff (pycodestyle, pyflakes, import order), then import-linter: the stages of docs/architecture.md
# import only from the stages below them, trainers do not import each other, and no package has a cycle.
lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# The whole system on the built-in OpenMoji at 32 px: VAE, then UNet with a from-scratch text side,
# then a grid of samples (samples/demo.png) for prompts taken from the training captions. ldm/demo.py
# prints each stage's command as it runs it, and ends with a table of the minutes each took.
demo: $(INSTALLED)
	$(PY) -m ldm.demo

# The `make demo` model distilled into a 4-step student (latent consistency distillation), and the
# student's grid for the demo prompts at its own step count and guidance (samples/lcm-demo.png).
distill-demo: $(INSTALLED)
	$(PY) distill.py --config configs/distill/demo.yaml
	$(PY) generate.py --model outputs/lcm-demo --prompts_file configs/demo_prompts.txt --output_dir samples/lcm-demo
	cp samples/lcm-demo/grid.png samples/lcm-demo.png
	@echo "wrote samples/lcm-demo.png"

# A LoRA adapter that teaches the `make demo` model a new style, colour inversion under the word
# "inverted", and the demo prompts drawn without and with it, side by side (samples/lora-demo.png).
lora-demo: $(INSTALLED)
	$(PY) -m ldm.lora_demo

# The web UI (ldm/app.py) on the `make demo` model, at http://127.0.0.1:7860.
app: $(INSTALLED)
	$(PY) -m ldm.app --model outputs/unet-demo

clean:
	rm -rf $(VENV) outputs samples
