"""The verifier's compiled hot loop (``_chainscan.c``): how it is found or built, and the scanner that uses it.

:func:`scanner` returns a :data:`~pilothouse.ledger.domain.Scanner` that gives exactly
:func:`~pilothouse.ledger.domain.serial_scan`'s result (the pure-Python reference, which stays the definition of what
verifies): the C code checks the entries of the "fast shape" — header fields that are None, 64-bit ints or printable
ASCII strings without quotes or backslashes, which JSON writes verbatim — and hands any other entry back, where the
reference checks it and the C code resumes after it. An entry that does not verify ends the valid prefix in both.
SHA-256 runs with the GIL released on ``threads`` threads (one process: nothing is forked or copied), two entries
side by side per thread with the CPU's SHA extensions where it has them (else OpenSSL's); the Merkle levels of the
chunk are hashed in C as well.

Finding the module: an installed build (``pilothouse.ledger._chainscan``) if there is one, else one compiled here on
first use with the C compiler Python was built with (``sysconfig``: gcc and Python's headers — Debian ``gcc
python3-dev``; OpenSSL's ``libcrypto``, with ``libssl-dev``'s headers or else the runtime library alone) into
``$XDG_CACHE_HOME/pilothouse/ledger-native`` (default ``~/.cache``), named by the SHA-256 of the source, the
compiler commands and the Python ABI, so a changed source is rebuilt and a stale build is never loaded. (Whoever can
write that directory can change what verifies, as whoever can write site-packages can: audit from an account whose
home you trust.) If neither works, :func:`load` says why and ``ledger verify`` runs the reference.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from pilothouse.ledger.domain import (
    _FORMAT_LINE,
    GENESIS_PREV_HASH,
    Scanner,
    ScanResult,
    scan_range,
    serial_scan,
)
from pilothouse.ledger.merkle import HASH_SIZE

SOURCE = Path(__file__).with_name("_chainscan.c")
MODULE = "pilothouse.ledger._chainscan"
_PREFIX = b"\x00" + _FORMAT_LINE  # what every entry hash starts with (RFC 9162 leaf prefix + format line)
MAX_LEVEL = 20  # Merkle levels a chunk hashes itself (chunks start on multiples of 2**level); the rest in Python
# `ledger verify --threads` default. Measured on the 2-vCPU machine class while other work shared it (bench ledger,
# three runs): one thread 701k-818k entries/s wall at ~1 KB, two threads 484k-653k: each batch waits for every
# thread, and a thread whose core is taken by another process holds it up for a scheduler time slice. On a host with
# idle cores more threads can pay: `pilothouse bench ledger --threads N` measures both.
DEFAULT_THREADS = 1


@dataclass(frozen=True, slots=True)
class Native:
    """The compiled module, or None and why not; ``origin`` says where it came from."""

    module: ModuleType | None
    origin: str

    @property
    def available(self) -> bool:
        return self.module is not None


_lock = threading.Lock()
_loaded: Native | None = None


def load() -> Native:
    """The compiled scanner (found or built once per process; never raises: a failure is reported, not fatal)."""
    global _loaded  # noqa: PLW0603 - one build per process
    with _lock:
        if _loaded is None:
            _loaded = _find_or_build()
        return _loaded


def _find_or_build() -> Native:
    try:
        spec = importlib.util.find_spec(MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        try:
            return Native(importlib.import_module(MODULE), f"installed: {spec.origin}")
        except ImportError as e:
            installed_error = f"installed build unusable ({e}); "
    else:
        installed_error = ""
    try:
        path = _build()
        return Native(_load_file(path), f"built: {path}")
    except (OSError, subprocess.SubprocessError, ImportError, RuntimeError) as e:
        return Native(None, f"{installed_error}could not build {SOURCE.name} ({type(e).__name__}: {e}); "
                            "the pure-Python verifier runs instead")


def _compile_commands(src: Path, out: Path) -> list[list[str]]:
    """With OpenSSL's headers and ``-lcrypto`` (libssl-dev); failing that, without them, against the runtime
    libcrypto (``libcrypto.so.3``, what Python's hashlib is linked with)."""
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    common = [*cc, "-O2", "-shared", "-fPIC", "-Wall", f"-I{sysconfig.get_paths()['include']}", "-o", str(out),
              str(src)]
    return [[*common, "-lcrypto", "-lpthread"],
            [*common, "-DPILOTHOUSE_NO_OPENSSL_HEADERS", "-l:libcrypto.so.3", "-lpthread"]]


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pilothouse" / "ledger-native"


def _build() -> Path:
    source = SOURCE.read_bytes()
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    key = hashlib.sha256(source + repr(_compile_commands(Path("s"), Path("o"))).encode()
                         + sys.version.encode() + suffix.encode()).hexdigest()[:20]
    target = _cache_dir() / f"_chainscan-{key}{suffix}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        errors = []
        for command in _compile_commands(SOURCE, out):
            done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
            if done.returncode == 0:
                break
            errors.append(f"compiler exit {done.returncode}: {done.stderr.strip()[-300:]}")
        else:
            raise RuntimeError("; ".join(errors))
        os.replace(out, target)  # atomic: a concurrent build of the same source writes the same file
    return target


def _load_file(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
    spec = importlib.util.spec_from_file_location(MODULE, str(path), loader=loader)
    if spec is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def subtree_levels(module: ModuleType, leaves: bytes, max_level: int, threads: int = 1) -> tuple[bytes, ...]:
    """:func:`pilothouse.ledger.merkle.subtree_levels`, hashed in C."""
    out: list[bytes] = []
    level = leaves
    while len(out) < max_level and len(level) >= 2 * HASH_SIZE:
        level = module.pairs(level, threads)
        out.append(level)
    return tuple(out)


def levels_for(start: int) -> int:
    """Merkle levels worth hashing for a chunk that starts at chain position ``start`` (those aligned to it)."""
    return MAX_LEVEL if start == 0 else min(MAX_LEVEL, (start & -start).bit_length() - 1)


def scanner(threads: int = 1, native: Native | None = None) -> Scanner | None:
    """A scanner that runs the compiled loop on ``threads`` threads; None when there is no compiled module."""
    got = native or load()
    module = got.module
    if module is None:
        return None
    threads = max(1, threads)

    def scan(items: Sequence[Any], chain: str, first_seq: int = 0, prev: str = GENESIS_PREV_HASH,
             want_leaves: bool = True, secondary: Sequence[Any] | None = None) -> ScanResult:
        if not (isinstance(items, list) and type(chain) is str and type(prev) is str
                and (secondary is None or isinstance(secondary, list))):
            return serial_scan(items, chain, first_seq, prev, want_leaves, secondary)  # the reference
        n = len(items)
        valid, last, leaves, agree = module.scan(items, 0, chain, prev, first_seq, want_leaves, secondary, threads,
                                                 _PREFIX)
        parts = [leaves]
        while valid < n:
            # The C code handed this entry back (another shape, or it does not verify): the reference decides.
            one = scan_range(items, chain, valid, valid + 1, last, want_leaves, first_seq + valid)
            if not one.valid:
                break
            parts.append(one.leaves)
            last = one.last_hash
            valid += 1
            more, last, leaves, _ = module.scan(items, valid, chain, last, first_seq + valid, want_leaves, None,
                                                threads, _PREFIX)
            parts.append(leaves)
            valid += more
        if not want_leaves or not valid:
            return ScanResult(valid, last, agree=agree)
        joined = b"".join(parts) if len(parts) > 1 else parts[0]
        return ScanResult(valid, last, joined, subtree_levels(module, joined, levels_for(first_seq), threads), agree)

    return scan
