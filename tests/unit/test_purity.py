"""The pure core modules (docs/CONVENTIONS.md) import no I/O, no clock, no shared memory.

Each module's source is parsed with `ast` (never imported), and every import anywhere in
it (top level or inside functions), plus `__import__("x")` and
`importlib.import_module("x")` with a literal name, is checked against the forbidden
list. A module is "x" or any submodule of it ("asyncio.tasks"); "timeit" is not "time".
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FORBIDDEN = ("asyncio", "zmq", "picows", "socket", "time", "multiprocessing.shared_memory")

# Pure modules that exist now: a missing one is a failure, not a skip.
REQUIRED = (
    "ingest/wire.py", "ingest/messages.py", "ingest/protocol.py", "ingest/subscriptions.py",
    "ingest/backoff.py", "ingest/normalize.py", "ingest/actions.py",
    "bookd/book.py", "bookd/checksum.py",
)
# Pure modules still being written: checked as soon as they exist.
WHEN_PRESENT = ("bookd/layout.py", "bookd/seqlock.py", "bookd/integrity.py",
                "bus/halt_policy.py", "bus/schema.py")
MODULES = REQUIRED + tuple(m for m in WHEN_PRESENT if (ROOT / m).is_file())


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def imported_names(source: str) -> list[tuple[int, str]]:
    """(line, dotted module name) of everything `source` imports."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            # `from multiprocessing import shared_memory` imports the submodule too.
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Name) and node.func.id == "__import__")
                   or (isinstance(node.func, ast.Attribute)
                       and node.func.attr == "import_module"))):
            found.append((node.lineno, node.args[0].value))
    return found


def violations(source: str) -> list[str]:
    return [f"line {line}: {name}" for line, name in imported_names(source) if _forbidden(name)]


@pytest.mark.parametrize("module", REQUIRED)
def test_required_pure_modules_exist(module: str) -> None:
    assert (ROOT / module).is_file(), f"{module} is listed as a pure core module but is missing"


@pytest.mark.parametrize("module", MODULES)
def test_pure_module_imports_nothing_forbidden(module: str) -> None:
    path = ROOT / module
    if not path.is_file():
        pytest.fail(f"{module} is missing")
    bad = violations(path.read_text(encoding="utf-8"))
    assert not bad, f"{module} imports forbidden modules: {', '.join(bad)}"


@pytest.mark.parametrize("source", [
    "import time",
    "import time as t",
    "from time import monotonic_ns",
    "import asyncio.tasks",
    "from asyncio import get_event_loop",
    "import zmq.asyncio",
    "from picows import ws_connect",
    "import socket",
    "import multiprocessing.shared_memory",
    "from multiprocessing import shared_memory",
    "from multiprocessing.shared_memory import SharedMemory",
    "def f():\n    import time\n",
    "x = __import__('socket')",
    "import importlib\nm = importlib.import_module('zmq')",
])
def test_the_checker_catches(source: str) -> None:
    assert violations(source)


@pytest.mark.parametrize("source", [
    "import timeit",
    "import datetime",
    "from multiprocessing import Process",
    "import msgspec",
    "from . import time",
    "from zlib import crc32",
])
def test_the_checker_allows(source: str) -> None:
    assert violations(source) == []
