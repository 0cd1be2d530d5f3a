"""Run Python code in a fresh interpreter that imports the same gpubp as the tests."""

import os
import subprocess
import sys
from pathlib import Path

import gpubp


def child_env() -> dict:
    """The parent's environment, with the folder holding this gpubp first on the import path."""
    source = str(Path(gpubp.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def run_python(code: str, *args, timeout: float = 120, **env) -> str:
    """Run ``code`` with ``args`` in ``sys.argv[1:]`` and ``env`` added to the environment; its stdout,
    or an AssertionError with its stderr."""
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], env={**child_env(), **env},
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"the child process failed:\n{done.stderr[-4000:]}"
    return done.stdout


def start_python(code: str, *args) -> subprocess.Popen:
    """Start ``code`` in the background, its stdout a pipe the caller reads lines from."""
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
