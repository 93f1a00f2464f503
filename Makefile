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

demo: $(INSTALLED)
	$(PY) -m ldm.openmoji --resolution 32

clean:
	rm -rf $(VENV) outputs samples
