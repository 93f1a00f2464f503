# The two commands a new user runs: `make demo` and `make test`.
# Both create .venv when it is missing and install into it, offline-safe on a CPU machine.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test test-slow install clean

install: $(INSTALLED)

# torch goes in first, pinned: an unpinned torch would pull a CUDA build of several GB.
$(INSTALLED): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]" -c constraints.txt
	touch $@

test: $(INSTALLED)
	$(PY) -m pytest -m "not slow" -q

test-slow: $(INSTALLED)
	$(PY) -m pytest -m slow -q

# The whole system on the built-in OpenMoji at 32 px: VAE, then UNet with a from-scratch text
# side, then a grid of samples for prompts taken from the training captions.
demo: $(INSTALLED)
	$(PY) -m ldm.openmoji --resolution 32
	$(PY) train_vae.py --config configs/vae/demo.yaml --output_dir outputs/vae-demo
	$(PY) train_unet.py --config configs/unet/demo.yaml --pretrained_vae_model_name_or_path outputs/vae-demo \
		--output_dir outputs/unet-demo
	$(PY) generate.py --model outputs/unet-demo --prompts_file configs/demo_prompts.txt \
		--num_inference_steps 25 --guidance_scale 5 --output_dir samples/demo
	cp samples/demo/grid.png samples/demo.png
	@echo "wrote samples/demo.png"

clean:
	rm -rf $(VENV) outputs samples
