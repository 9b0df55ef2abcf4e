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

.PHONY: install demo test test-slow test-all bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e ".[all,test]"
	touch $@

## The main job: build a tiny model offline, deploy it to the local provider, invoke it, clean up.
demo: install
	$(BIN)/python -m cloudllm.testing.tiny_models gpt2 demo/tiny-gpt2
	$(BIN)/cloudllm deploy demo/tiny-gpt2 --provider local --name demo
	$(BIN)/cloudllm invoke demo "Once upon a time" --max-new-tokens 20
	$(BIN)/cloudllm delete demo

## The test suite CI runs (.ci/run). Slow tests are marked and run by `make test-slow`.
test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

test-all: install
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: install
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) demo .pytest_cache
