# Every install goes through constraints.txt (torch==2.13.0: the CPU wheel, not GBs of CUDA).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install -q -c constraints.txt

# No SDK may probe a cloud metadata address from tests or tools.
export AWS_EC2_METADATA_DISABLED := true
export NO_GCE_CHECK := True
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: install demo test test-slow test-all bench clean containers

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e ".[all,test]"
	touch $@

# transformers 4.x, as in the Hugging Face inference containers, beside (not inside) the
# venv's transformers 5: tests load generated artifacts with it to prove they run there.
# 4.48.0 is the oldest the artifacts meet (Vertex's HF PyTorch image; SageMaker's has 4.51.3).
TF4 := $(VENV)/tf4
TF4_PINS := "transformers==4.48.0" "tokenizers==0.21.0" "huggingface-hub==0.36.0"
$(TF4)/.installed: $(VENV)/.installed Makefile
	rm -rf $(TF4)
	$(BIN)/python -m pip install -q --no-deps --target $(TF4) $(TF4_PINS)
	echo $(TF4_PINS) > $@

## The main job: build a tiny model offline, deploy it to the local provider, invoke it, clean up.
demo: install
	$(BIN)/python -m cloudllm.testing.tiny_models gpt2 demo/tiny-gpt2
	$(BIN)/cloudllm deploy demo/tiny-gpt2 --provider local --name demo
	$(BIN)/cloudllm invoke demo "Once upon a time" --max-new-tokens 20
	$(BIN)/cloudllm delete demo

## The container engine (podman, buildah, skopeo, runc, docker-registry), its settings and the offline
# base images the container tests build FROM (containers/setup/install.sh; idempotent, cached).
# `make test` runs it where it can (root on Debian); elsewhere tests/containers/ skip naming this target.
containers:
	sh containers/setup/install.sh
CONTAINERS_CAN := $(shell [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && echo containers)

## The test suite CI runs (.ci/run). Slow tests are marked and run by `make test-slow`.
# Two workers, each test file whole on one (module-scoped emulators stay shared): most of a test's
# time is spent waiting on a model server or an emulator, so 2 cores run the suite ~1.7x faster.
PYTEST := $(BIN)/python -m pytest -q -n $(or $(TEST_WORKERS),2) --dist loadfile
test: install $(TF4)/.installed $(CONTAINERS_CAN)
	$(PYTEST)

test-slow: install $(TF4)/.installed $(CONTAINERS_CAN)
	$(PYTEST) -m slow

test-all: install $(TF4)/.installed $(CONTAINERS_CAN)
	$(PYTEST) -m "slow or not slow"

bench: install
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) demo .pytest_cache
