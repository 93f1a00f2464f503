# The two commands a new user runs: `make demo` and `make test`.
# Both create .venv when it is missing and install into it, offline-safe on a CPU machine.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo distill-demo test test-slow install clean

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

# The `make demo` model distilled into a 4-step student (latent consistency distillation), and the
# student's grid for the demo prompts at its own step count and guidance (samples/lcm-demo.png).
distill-demo: $(INSTALLED)
	$(PY) distill.py --config configs/distill/demo.yaml
	$(PY) generate.py --model outputs/lcm-demo --prompts_file configs/demo_prompts.txt --output_dir samples/lcm-demo
	cp samples/lcm-demo/grid.png samples/lcm-demo.png
	@echo "wrote samples/lcm-demo.png"

clean:
	rm -rf $(VENV) outputs samples
