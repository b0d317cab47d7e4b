# vpeft developer entry points. `make test` and `make bench` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch/torchvision pair to install; override for another platform, e.g.
#   make test TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?= -n 2

.PHONY: install test lint bench docs clean gpu-check

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m ruff check src tests scripts benchmarks
	$(PY) -m pytest $(PYTEST_ARGS) tests

lint: install
	$(PY) -m ruff check src tests scripts benchmarks
	$(PY) -m ruff format --check src tests scripts benchmarks

bench: install
	$(VENV)/bin/vpeft bench --suite mini --out results/bench-mini

# The docs pages (README.md, docs/**/*.md) as HTML into $(SITE), after checking that every relative
# link between them resolves (scripts/build_docs.py fails on a broken one); then the API reference from
# the docstrings (pdoc) into $(DOCS_OUT); a package's __all__ hides its submodules from pdoc, so those
# are named explicitly. $(SITE)/index.html links the pages and the API reference.
SITE ?= site
DOCS_OUT ?= $(SITE)/api
docs: install
	$(PY) scripts/build_docs.py --out $(SITE)
	$(PY) -c 'import importlib, pkgutil, vpeft; from pdoc.__main__ import cli; \
	names = [m.name for m in pkgutil.walk_packages(vpeft.__path__, "vpeft.") if "._" not in m.name]; \
	hidden = [n for n in names if n.rpartition(".")[2] not in getattr(importlib.import_module(n.rpartition(".")[0]), "__all__", [n.rpartition(".")[2]])]; \
	cli(["--docformat", "markdown", "-o", "$(DOCS_OUT)", "vpeft", *hidden])'
	@echo "docs: $(SITE)/index.html, API reference: $(DOCS_OUT)/index.html"

# On a GPU machine without network (torch, timm and peft preinstalled): step table against full FT
# and peft, an end-to-end train on a generated VTAB-1k-sized task, a profile per method, the tests.
# Uses $(PYTHON) with src/ on PYTHONPATH, no install; GPU_CHECK_ARGS=--smoke checks it on a CPU.
gpu-check:
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info
