"""The benchmark harness: the service's engine against raw llama-cpp-python (see README.md)."""

from __future__ import annotations
