"""Schema evolution check: every schema must stay backward-compatible with the version on ``main``.

Backward-compatible means a consumer with the NEW schema can read data written with the OLD one (new fields need
defaults, enums may only grow if the reader has a default, types only promote). The check itself is Apache Avro's
maintained implementation (``avro.compatibility.ReaderWriterCompatibilityChecker``), not ours.

Earlier versions of changed records are kept in ``schemas/history`` (``--record-history``; codegen does it against
``HEAD`` whenever it runs), so records written before an upgrade still decode after it: upgrade consumers first.

``python -m pilothouse.bus.compatibility [--against REF] [--record-history]`` exits 1 and names each break.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import avro.schema
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

from pilothouse.bus.schemas import HISTORY_DIR_NAME, SCHEMAS_DIR, SchemaSet, history_file_name, load_schemas


def incompatibilities(old: SchemaSet, new: SchemaSet) -> list[str]:
    """Every way ``new`` fails to read data written with ``old`` (empty when compatible)."""
    return [p for name in old.names() if old.get(name).expanded.get("type") == "record"
            for p in unreadable(name, old.get(name).expanded, new)]


def unreadable(name: str, writer: dict, new: SchemaSet) -> list[str]:
    """Why ``new``'s version of ``name`` cannot read data written with the ``writer`` schema (empty: it can)."""
    if name not in new:
        return [f"{name}: removed (consumers of old data can no longer decode it)"]
    reader = avro.schema.parse(json.dumps(new.get(name).expanded))
    result = ReaderWriterCompatibilityChecker().get_compatibility(reader, avro.schema.parse(json.dumps(writer)))
    if result.compatibility is SchemaCompatibilityType.compatible:
        return []
    detail = "; ".join(sorted(result.messages)) or "incompatible"
    return [f"{name}: not backward-compatible at {', '.join(sorted(result.locations))}: {detail}"]


def record_history(old: SchemaSet, new: SchemaSet, history_dir: Path) -> list[Path]:
    """Keep every record version of ``old`` that ``new`` changed readable: its self-contained schema goes to
    ``history_dir`` (``schemas/history``), where the Serde finds the writer schema of records written before the
    upgrade (decoded, then resolved to the current version). Returns the files written."""
    written = []
    for name in old.names():
        rs = old.get(name)
        if rs.expanded.get("type") != "record" or name not in new or new.get(name).fingerprint == rs.fingerprint:
            continue
        path = history_dir / history_file_name(name, rs.fingerprint)
        if not path.exists():
            history_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rs.expanded, indent=2) + "\n")
            written.append(path)
    return written


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
    """CLI: compare the working tree's schemas with those at --against (default: main) and with every kept earlier
    version; ``--record-history`` first keeps the changed records' versions at the ref readable (schemas/history)."""
    argv = sys.argv[1:] if argv is None else argv
    ref = argv[argv.index("--against") + 1] if "--against" in argv else "main"
    repo = SCHEMAS_DIR.parent
    old = schemas_at(ref, repo)
    if old is None:
        print(f"no schemas at {ref}: nothing to compare")
        return 0
    new = load_schemas()
    if "--record-history" in argv:
        for path in record_history(old, new, SCHEMAS_DIR / HISTORY_DIR_NAME):
            print(f"kept the {ref} version readable: {path.relative_to(repo)}")
    problems = incompatibilities(old, new) + [f"{p} (kept version {h.path.name})" for h in new.history()
                                              for p in unreadable(h.name, h.expanded, new)]
    for p in problems:
        print(p, file=sys.stderr)
    print(f"{len(old.names())} schemas at {ref} checked: {len(problems)} incompatible")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
