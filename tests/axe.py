"""axe-core, the accessibility checker the browser tests run in the page.

Fetched once from the npm registry (no npm needed) into
``~/.cache/chatsite/axe-core/<version>/``, checked against the sha512 the
registry publishes for the pinned version (``dist.integrity`` of
https://registry.npmjs.org/axe-core/4.10.3), and unpacked: only
``axe.min.js`` is kept.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import tarfile
import urllib.request
from pathlib import Path

VERSION = "4.10.3"
TARBALL_URL = f"https://registry.npmjs.org/axe-core/-/axe-core-{VERSION}.tgz"
# The registry's dist.integrity for VERSION.
INTEGRITY = "sha512-Xm7bpRXnDSX2YE2YFfBk2FnF0ep6tmG7xPh8iHee8MIcrgq762Nkce856dYtJYLkuIoYZvGfTs/PbZhideTcEg=="
CACHE = Path.home() / ".cache" / "chatsite" / "axe-core" / VERSION


def _checked(tarball: bytes) -> bytes:
    algorithm, _, expected = INTEGRITY.partition("-")
    digest = base64.b64encode(hashlib.new(algorithm, tarball).digest()).decode()
    if digest != expected:
        raise RuntimeError(f"{TARBALL_URL} does not match its pinned {algorithm} ({digest} != {expected})")
    return tarball


def axe_script() -> Path:
    """The path of ``axe.min.js``, downloaded and checked on first use."""
    target = CACHE / "axe.min.js"
    if target.exists():
        return target
    with urllib.request.urlopen(TARBALL_URL, timeout=60) as response:
        tarball = _checked(response.read())
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        member = archive.extractfile("package/axe.min.js")
        if member is None:
            raise RuntimeError(f"{TARBALL_URL} has no package/axe.min.js")
        script = member.read()
    CACHE.mkdir(parents=True, exist_ok=True)
    # Written aside then renamed, so that a test run cut short leaves no half file.
    partial = target.with_suffix(f".{os.getpid()}.part")
    partial.write_bytes(script)
    partial.replace(target)
    return target


if __name__ == "__main__":
    print(axe_script())
