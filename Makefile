# make demo: create .venv if missing, install, run the embedded demo.  make test: the same, then the tests.
# On a machine without an NVIDIA GPU the CPU build of torch is installed (torch==2.13.0 is on disk here);
# with one, pip's default (CUDA) build is used. A torch already in .venv is always kept.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.5' || echo 'torch==2.13.0')
PYTEST_ARGS ?=

.PHONY: install demo test test-quick

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/python -m pip install --quiet '$(TORCH)'
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/ringify demo

# pytest exits 5 when it collects no test: that is a failure too.
test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo 'pytest collected no tests: failing'; exit 1; fi; exit $$rc

test-quick: PYTEST_ARGS += -m 'not slow'
test-quick: test
