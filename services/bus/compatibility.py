"""Schema evolution check: every schema must stay backward-compatible with the version on ``main``.

Backward-compatible means a consumer with the NEW schema can read data written with the OLD one (new fields need
defaults, enums may only grow if the reader has a default, types only promote). The check itself is Apache Avro's
maintained implementation (``avro.compatibility.ReaderWriterCompatibilityChecker``), not ours.

``python -m pilothouse.bus.compatibility [--against REF]`` exits 1 and names each break.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import avro.schema
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

from pilothouse.bus.schemas import SCHEMAS_DIR, SchemaSet, load_schemas


def incompatibilities(old: SchemaSet, new: SchemaSet) -> list[str]:
    """Every way ``new`` fails to read data written with ``old`` (empty when compatible)."""
    problems: list[str] = []
    for name in old.names():
        if old.get(name).expanded.get("type") != "record":
            continue
        if name not in new:
            problems.append(f"{name}: removed (consumers of old data can no longer decode it)")
            continue
        reader = avro.schema.parse(json.dumps(new.get(name).expanded))
        writer = avro.schema.parse(json.dumps(old.get(name).expanded))
        result = ReaderWriterCompatibilityChecker().get_compatibility(reader, writer)
        if result.compatibility is not SchemaCompatibilityType.compatible:
            detail = "; ".join(sorted(result.messages)) or "incompatible"
            where = ", ".join(sorted(result.locations))
            problems.append(f"{name}: not backward-compatible at {where}: {detail}")
    return problems


def schemas_at(ref: str, repo: Path, rel: str = "schemas") -> SchemaSet | None:
    """The schema set committed at git ``ref`` (None if the ref or the folder does not exist there)."""
    try:
        files = subprocess.run(
            ["git", "-C", str(repo), "ls-tree", "-r", "--name-only", ref, rel],
            check=True, capture_output=True, text=True,
        ).stdout.split()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    files = [f for f in files if f.endswith(".avsc")]
    if not files:
        return None
    tmp = Path(tempfile.mkdtemp(prefix="pilothouse-schemas-"))
    for f in files:
        blob = subprocess.run(["git", "-C", str(repo), "show", f"{ref}:{f}"], check=True, capture_output=True).stdout
        dest = tmp / f
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(blob)
    return SchemaSet(tmp / rel)


def main(argv: list[str] | None = None) -> int:
    """CLI: compare the working tree's schemas with those at --against (default: main)."""
    argv = sys.argv[1:] if argv is None else argv
    ref = argv[argv.index("--against") + 1] if "--against" in argv else "main"
    repo = SCHEMAS_DIR.parent
    old = schemas_at(ref, repo)
    if old is None:
        print(f"no schemas at {ref}: nothing to compare")
        return 0
    problems = incompatibilities(old, load_schemas())
    for p in problems:
        print(p, file=sys.stderr)
    print(f"{len(old.names())} schemas at {ref} checked: {len(problems)} incompatible")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
