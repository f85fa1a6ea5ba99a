# Quick start: `make demo` (set up, build the tiny model and demo data, train the tiny example) and `make test`.
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1

.PHONY: setup setup-ray setup-trackers demo-assets demo demo-qwen test bench clean-demo

$(VENV)/.installed: requirements.txt
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -r requirements.txt
	touch $@

setup: $(VENV)/.installed

# Ray's optional launcher: installed for the tests too, so `make test` runs tests/test_ray.py instead of skipping it
# (exactly what CI runs: .ci/run is `make test` on a clean clone).
$(VENV)/.installed-ray: $(VENV)/.installed requirements-ray.txt
	$(PYTHON) -m pip install -q -r requirements-ray.txt
	touch $@

setup-ray: $(VENV)/.installed-ray

# W&B and MLflow trackers (optional): installed for the tests too, so tests/test_trackers.py runs in CI.
$(VENV)/.installed-trackers: $(VENV)/.installed requirements-trackers.txt
	$(PYTHON) -m pip install -q -r requirements-trackers.txt
	touch $@

setup-trackers: $(VENV)/.installed-trackers

demo-assets: setup
	$(PYTHON) -m tools.tiny_model --out models/tiny-flux-kontext
	$(PYTHON) -m tools.demo_data --out data/demo

demo: demo-assets
	$(PYTHON) run.py config/examples/train_lora_flux_kontext_tiny.yaml

# Qwen-Image-Edit-Plus: a tiny random 2509 model, two control images per target, trained on the CPU.
demo-qwen: setup
	$(PYTHON) -m tools.tiny_model --arch qwen_image_edit_plus --out models/tiny-qwen-image-edit-plus
	$(PYTHON) -m tools.demo_data --out data/demo_multi --num-controls 2
	$(PYTHON) run.py config/examples/train_lora_qwen_image_edit_plus_tiny.yaml

test: setup-ray setup-trackers
	$(PYTHON) -m pytest -q tests

clean-demo:
	rm -rf models/tiny-flux-kontext data/demo output/tiny_kontext_demo models/tiny-qwen-image-edit-plus data/demo_multi \
		output/tiny_qwen_edit_demo
