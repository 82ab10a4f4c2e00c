# Two commands: `make setup` (creates .venv/ and installs everything, pinned) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test collect-env gpu-wheels

setup:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) projects/setup/install_detectron2.py --timeout 20
	$(PY) -m pip install -q --no-deps panopticapi-lite==0.2.0
	$(PY) -m pip install -q --no-deps imagecorruptions-imaug==1.1.5
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m panoptic_segformer.collect_env

test:
	$(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS) tests

collect-env:
	$(PY) -m panoptic_segformer.collect_env

# Wheelhouse for an offline GPU machine (Python 3.12, torch/Triton preinstalled): .gpu-wheels/, which
# projects/benchmarks/gpu_suite.sh installs there (see docs/INSTALL.md, "GPU machines").
gpu-wheels:
	$(PY) -m projects.setup.gpu_wheels --output .gpu-wheels
