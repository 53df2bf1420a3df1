# chatsite: the same steps as the README (`make install`, then migrate and
# collectstatic), in one image for every process of docker-compose.yml: the
# Daphne front ends (the default command) and the inference workers
# (`python manage.py inference_worker`).
#
# CPU (the default):   docker build -t chatsite .
# CUDA:                docker build -t chatsite:cuda --build-arg CUDA=1 \
#                        --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-devel-ubuntu22.04 .
# (CUDA=1 builds llama-cpp-python with -DGGML_CUDA=on, as `make install CUDA=1` does;
# the CUDA base image brings the toolkit. Run it with `--gpus all`.)
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG CUDA=0
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_DISABLE_TELEMETRY=1

# Build tools for llama-cpp-python (compiled once, in the image); python3.11
# from the distribution when the base image is not a Python image (CUDA).
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake git make ca-certificates \
    && (command -v python3.11 >/dev/null || apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev) \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Requirements first: the llama.cpp build is cached until they change.
COPY requirements.txt requirements-model.txt Makefile ./
COPY bench/build_llama_server.sh bench/
RUN make install CUDA=${CUDA} PYTHON=python3.11 LLAMA_WHEELS=/tmp/llama-wheels \
    && rm -rf /tmp/llama-wheels /root/.cache

COPY . .
RUN .venv/bin/python manage.py collectstatic --noinput --verbosity 0

RUN useradd --system --home-dir /app chatsite && mkdir -p /app/var /metrics && chown -R chatsite /app/var /metrics
USER chatsite
ENV PATH=/app/.venv/bin:$PATH \
    CHATSITE_SERVER_PROFILE=production
EXPOSE 8000
# No --proxy-headers: Daphne would then take any client's own X-Forwarded-For
# as its address. The service reads a forwarded address itself, and only when
# server.trusted_proxy_header names the header the proxy sets (its last entry).
CMD ["daphne", "--bind", "0.0.0.0", "--port", "8000", "chatsite.asgi:application"]
