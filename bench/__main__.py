"""``python -m bench`` (``make bench``): see bench/README.md."""

from __future__ import annotations

from bench.cli import main

raise SystemExit(main())
