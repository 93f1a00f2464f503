# The two commands a new user runs: `make demo` and `make test`.
# Both create .venv when it is missing and install into it, offline-safe on a CPU machine.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo distill-demo lora-demo test test-slow install clean

install: $(INSTALLED)

# torch goes in first, pinned: an unpinned torch would pull a CUDA build of several GB.
# invisible-watermark (imwatermark, the tests' reference watermark decoder) goes in last, without the
# opencv-python it declares, whose cv2 fails to import without libGL.so.1: the test extra brings
# opencv-python-headless and PyWavelets instead, all that imwatermark imports.
$(INSTALLED): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,onnx]" -c constraints.txt
	$(PY) -m pip install --quiet --no-deps invisible-watermark -c constraints.txt
	touch $@

test: $(INSTALLED)
	$(PY) -m pytest -m "not slow" -q

test-slow: $(INSTALLED)
	$(PY) -m pytest -m slow -q

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

clean:
	rm -rf $(VENV) outputs samples
