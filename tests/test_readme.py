"""The README's code blocks, run, so that the README cannot drift from the code.

- ``python`` blocks run as programs, each on its own, in a folder holding the files the README's
  blocks write (the TLS section's ``server.pem``, ``server.key`` and ``ca.pem``, written by
  running that block) and every block that starts with ``# file: NAME`` (a module the other
  blocks use), written as NAME; the tutorial's port 8000 becomes a free port.
- ``console`` blocks: each ``$ command`` runs, and what it prints (stdout and stderr) must be
  the lines that follow it.
- ``sh`` blocks are commands the test cannot run (installing, the Makefile's own targets; the
  wheel's install is what ``make test-pythons`` does for every Python): every ``make TARGET``
  named must be a target of the Makefile, and every file ``pip install`` names must be what
  ``make wheel`` / ``make sdist`` build for this version.
- ``text`` blocks are pictures and usage lines, not code. Any other kind fails, so a new block
  must say which it is.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = [
    (match.group(1), match.group(2), README.count("\n", 0, match.start()) + 1)
    for match in re.finditer(r"^```(\w*)\n(.*?)^```$", README, flags=re.MULTILINE | re.DOTALL)
]
KINDS = {"python", "console", "sh", "text"}


def blocks_of(kind: str) -> list:
    return [pytest.param(code, id=f"line{line}") for block_kind, code, line in BLOCKS if block_kind == kind]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def with_free_port(code: str) -> str:
    return re.sub(r"\b8000\b", str(free_port()), code)


def writes_certificates(code: str) -> bool:
    return "import trustme" in code


@pytest.fixture
def folder(tmp_path):
    """A working folder with the files the README's blocks write or name."""
    for kind, code, _ in BLOCKS:
        named = re.match(r"# file: (\S+)\n", code)
        if kind == "python" and named:
            (tmp_path / named[1]).write_text(code)
        if kind == "python" and writes_certificates(code):
            run_block(code, tmp_path)
    return tmp_path


def run_block(code: str, folder: Path) -> None:
    program = folder / "example.py"
    program.write_text(with_free_port(code))
    done = subprocess.run(
        [sys.executable, str(program)], cwd=folder, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_the_tls_section_writes_the_files_its_example_reads():
    writers = [code for kind, code, _ in BLOCKS if kind == "python" and writes_certificates(code)]
    assert len(writers) == 1
    assert all(f'"{name}"' in writers[0] for name in ("server.pem", "server.key", "ca.pem"))


def test_every_block_is_of_a_known_kind():
    assert BLOCKS, "no code blocks found"
    unknown = [(kind, line) for kind, _, line in BLOCKS if kind not in KINDS]
    assert not unknown, f"README blocks of no known kind (language, line): {unknown}"


@pytest.mark.parametrize("code", blocks_of("python"))
def test_python_block_runs(code, folder):
    run_block(code, folder)


@pytest.mark.parametrize("code", blocks_of("console"))
def test_console_block_prints_what_it_shows(code, folder):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for command, *expected in (part.split("\n") for part in code.rstrip("\n").split("$ ")[1:]):
        done = subprocess.run(
            command, shell=True, cwd=folder, env=env, capture_output=True, text=True, timeout=60
        )
        printed = (done.stdout + done.stderr).rstrip("\n").split("\n")
        assert printed == [line for line in expected if line], command


@pytest.mark.parametrize("code", blocks_of("sh"))
def test_make_targets_and_files_named_exist(code):
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.MULTILINE))
    for target in re.findall(r"^make ([\w-]+)", code, flags=re.MULTILINE):
        assert target in targets, f"make {target}: no such target"
    version = re.search(r'^version = "([^"]+)"', (ROOT / "Cargo.toml").read_text(), flags=re.MULTILINE)[1]
    built = {
        f"dist/framesock-{version}-cp39-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",  # make wheel
        f"dist/framesock-{version}.tar.gz",  # make sdist
        ".",  # this checkout
    }
    for named in re.findall(r"^pip install (\S+)", code, flags=re.MULTILINE):
        assert named in built, f"pip install {named}: not a file the Makefile builds for {version}"


def test_the_typed_handler_is_the_one_make_lint_checks():
    """``make lint`` runs mypy and pyright (strict) over tests/typed_example.py, which holds the
    README's annotated handler; this keeps the two the same."""
    example = (ROOT / "tests" / "typed_example.py").read_text()
    typed = [code for kind, code, _ in BLOCKS if kind == "python" and "def inventory(" in code]
    assert len(typed) == 1
    handler = re.search(r"^def inventory\(.*?\n\n", typed[0], flags=re.MULTILINE | re.DOTALL)[0]
    assert handler in example
