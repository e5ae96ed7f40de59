"""Whole programs, run as their own processes, many times, on every CPython the machine has.

What only a whole process shows: that it exits with status 0 (no crash, no abort, no hang at
exit), also after fork. Each program in ``tests/programs`` is run 40 times (four at a time) on
each interpreter from 3.9 up found here (the one running the tests, and pyenv's); framesock's
abi3 extension is imported from this checkout on all of them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import framesock

PROGRAMS = Path(__file__).parent / "programs"
RUNS = 40
AT_ONCE = 4
# Generous: a run takes well under a second; this only turns a hang into a failure.
RUN_LIMIT = 30


def interpreters() -> dict[str, str]:
    """``{"3.11": path}`` for this interpreter and every pyenv CPython from 3.9 up (only this
    one with FRAMESOCK_TEST_PYTHONS=self, as ``make test-pythons`` sets: it runs the suite on
    each interpreter in turn)."""
    found = {f"{sys.version_info[0]}.{sys.version_info[1]}": sys.executable}
    if os.environ.get("FRAMESOCK_TEST_PYTHONS") == "self":
        return found
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    versions = Path(root) / "versions"
    if versions.is_dir():
        for entry in sorted(versions.iterdir()):
            match = re.fullmatch(r"(\d+)\.(\d+)\.\d+", entry.name)
            python = entry / "bin" / "python"
            if match and (int(match[1]), int(match[2])) >= (3, 9) and python.exists():
                found.setdefault(f"{match[1]}.{match[2]}", str(python))
    return found


INTERPRETERS = interpreters()
# Where `import framesock` finds this checkout's package (with its built extension).
PACKAGE_ROOT = str(Path(framesock.__file__).resolve().parent.parent)


def run_many(python: str, program: Path) -> list[str]:
    """Runs `program` RUNS times; returns a description of each run that did not exit 0."""
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT, PYTHONWARNINGS="ignore::DeprecationWarning")

    def run_once(index: int) -> str | None:
        try:
            done = subprocess.run(
                [python, str(program)], env=env, capture_output=True, timeout=RUN_LIMIT
            )
        except subprocess.TimeoutExpired:
            return f"run {index}: still running after {RUN_LIMIT} s"
        if done.returncode != 0:
            return f"run {index}: exit status {done.returncode}: {done.stderr.decode()[-2000:]}"
        if b"panicked at" in done.stderr:
            return f"run {index}: a Rust panic: {done.stderr.decode()[-2000:]}"
        return None

    with ThreadPoolExecutor(AT_ONCE) as pool:
        return [failure for failure in pool.map(run_once, range(RUNS)) if failure]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("version", sorted(INTERPRETERS))
@pytest.mark.parametrize("program", sorted(p.name for p in PROGRAMS.glob("*.py")))
def test_program_exits_cleanly_every_time(program, version):
    failures = run_many(INTERPRETERS[version], PROGRAMS / program)
    assert not failures, "\n".join(failures)
