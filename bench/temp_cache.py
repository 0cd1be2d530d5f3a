"""A JSON result computed once per set of inputs and shared through the temporary folder.

``cached_json(folder, parts, compute)`` returns ``compute()``'s result, kept as
``<tempdir>/<folder>/<hash of parts>.json``. Another process asking for the same result (a
second pytest-xdist worker) waits on a file lock while the first computes it, then reads it;
the file appears whole or not at all (written aside, then renamed). bench/kernel_model.py's
figures and bench/numba_variants.py's PTX are kept so.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path


def cached_json(folder: str, parts: list, compute):
    """``compute()``'s JSON result for ``parts`` (bytes, or anything JSON can write)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True).encode())
        digest.update(b"\0")
    cache = Path(tempfile.gettempdir()) / folder
    path = cache / f"{digest.hexdigest()}.json"
    if path.is_file():
        return json.loads(path.read_text())
    cache.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return json.loads(path.read_text())
        result = compute()
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(result))
        os.replace(partial, path)
    return result
