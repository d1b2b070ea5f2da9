"""Architecture rules, checked on the source: services never import each other; only the bus imports Kafka/Avro."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ["sensing", "reasoning", "policy", "actuator", "ledger", "console"]
KAFKA_AVRO = {"confluent_kafka", "fastavro", "avro"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def python_files(folder: Path):
    return [p for p in folder.rglob("*.py") if "__pycache__" not in p.parts]


def test_services_never_import_each_other_nor_the_local_stack():
    problems = []
    for svc in SERVICES:
        forbidden = {f"pilothouse.{o}" for o in SERVICES if o != svc} | {"pilothouse.stack", "pilothouse.fleet",
                                                                            "pilothouse.cli"}
        for path in python_files(ROOT / "services" / svc):
            for name in imports_of(path):
                if any(name == f or name.startswith(f + ".") for f in forbidden):
                    problems.append(f"{path.relative_to(ROOT)} imports {name}")
    assert problems == []


# The red-team tool attacks the broker as a thief with stolen credentials would: raw bytes, wrong record types,
# transactions under other principals. It must bypass the bus's guards, so it is the one deliberate exception.
ATTACKERS = {"services/pilothouse/redteam.py"}


def test_only_the_bus_imports_kafka_and_avro_libraries():
    problems = []
    for folder in [ROOT / "services" / s for s in SERVICES] + [ROOT / "infra", ROOT / "services" / "pilothouse"]:
        for path in python_files(folder):
            if str(path.relative_to(ROOT)) in ATTACKERS:
                continue
            for name in imports_of(path):
                if name.split(".")[0] in KAFKA_AVRO:
                    problems.append(f"{path.relative_to(ROOT)} imports {name}")
    assert problems == []


def test_no_dumping_ground_modules():
    bad = [p for p in python_files(ROOT / "services") + python_files(ROOT / "infra")
           if p.stem in {"utils", "helpers", "common", "misc"}]
    assert bad == []


def test_every_package_directory_is_declared_in_pyproject():
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(cfg["packages"])
    dirs = {v: k for k, v in cfg["package-dir"].items()}
    found = set()
    for src, pkg in dirs.items():
        for init in (ROOT / src).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / src)
            found.add(".".join([pkg, *rel.parts]) if rel.parts else pkg)
    assert found - declared == set(), "add these to [tool.setuptools] packages in pyproject.toml"
