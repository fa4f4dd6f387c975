# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A matching torch + torchvision pair (timm, segmentation-models-pytorch and the
# pretrained encoders need torchvision). PyPI's build runs on the CPU and on CUDA
# GPUs; TORCH_INDEX_URL picks another build, e.g. PyTorch's CUDA wheel index
# (see README, "GPU"). TORCH_SPEC / VISION_SPEC pick other versions, one each.
TORCH_SPEC ?= torch==2.14.1
VISION_SPEC ?= torchvision==0.29.1
TORCH_INDEX_URL ?=
TORCH_ARGS := "$(TORCH_SPEC)" "$(VISION_SPEC)"$(if $(TORCH_INDEX_URL), --index-url "$(TORCH_INDEX_URL)")
# Holds the torch arguments last installed: changing them re-installs torch.
TORCH_STAMP := $(VENV)/.torch
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean FORCE

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Always checked, only rewritten when the arguments differ from the recorded ones.
$(TORCH_STAMP): $(BIN)/python FORCE
	@echo '$(TORCH_ARGS)' | cmp -s - $@ || { \
	  echo '$(BIN)/pip install --quiet $(TORCH_ARGS)'; \
	  $(BIN)/pip install --quiet $(TORCH_ARGS) && echo '$(TORCH_ARGS)' > $@; }

# Torch first (order-only), so that mapgap's torch/torchvision requirements are already met.
$(STAMP): $(BIN)/python pyproject.toml | $(TORCH_STAMP)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/mapgap demo

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

bench: install
	@for f in bench/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf demo-out .prefect .pytest_cache
