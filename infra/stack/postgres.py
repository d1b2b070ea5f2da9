"""PostgreSQL from the Debian packages, as a cluster owned by the stack under `<data>/postgres`, on 127.0.0.1.

Authentication is scram-sha-256 everywhere (TCP and the private Unix socket), with a generated password; durability
settings (fsync, synchronous_commit, full_page_writes) stay at their durable defaults. PostgreSQL refuses to run as
root, so when the stack runs as root the cluster belongs to an unprivileged OS user (`postgres` if the Debian package
created it, else a `pilothouse` system user created here).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psycopg
from psycopg import sql

from pilothouse.stack import procs
from pilothouse.stack.config import Settings
from pilothouse.stack.errors import ComponentFailed, MissingPrerequisite, StackError
from pilothouse.stack.info import StackInfo

NAME = "postgres"
STOP_SIGNAL = signal.SIGINT  # "fast" shutdown: SIGTERM ("smart") would wait for every client to disconnect
READY_TIMEOUT_S = 60.0
PREFERRED_MAJOR = 15
PG_FIX = "apt-get install -y postgresql"
DATABASE = "pilothouse"
ROLE = "pilothouse"
# Non-superuser login roles: the ledger mirror writes as this one (INSERT/SELECT only on its append-only tables,
# granted by `PostgresLedgerMirror.migrate(writer_role=...)`), so it cannot disable the append-only triggers.
LEDGER_WRITER_ROLE = "pilothouse_ledger_writer"
ROLES = (LEDGER_WRITER_ROLE,)


def find_bindir() -> Path:
    """/usr/lib/postgresql/15/bin (or the newest installed major >= 15), else MissingPrerequisite."""
    root = Path("/usr/lib/postgresql")
    preferred = root / str(PREFERRED_MAJOR) / "bin"
    candidates = [preferred] + sorted(
        (p / "bin" for p in root.glob("*") if p.name.isdigit() and int(p.name) > PREFERRED_MAJOR),
        key=lambda p: int(p.parent.name),
        reverse=True,
    )
    for bindir in candidates:
        if (bindir / "postgres").is_file() and (bindir / "initdb").is_file():
            return bindir
    raise MissingPrerequisite(f"PostgreSQL server binaries (no {preferred}/postgres)", PG_FIX)


def os_user() -> str | None:
    """The OS user to run PostgreSQL as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pilothouse"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    out = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "pilothouse"],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise StackError(f"cannot create the unprivileged OS user 'pilothouse' for PostgreSQL: {out.stderr.strip()}")
    return "pilothouse"


def _paths(settings: Settings) -> dict[str, Path]:
    base = settings.data_dir / "postgres"
    return {"base": base, "data": base / "data", "socket": base / "run", "log": settings.logs_dir / "postgres.log"}


def _chown_tree(path: Path, user: str | None) -> None:
    if user is None:
        return
    pw = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, pw.pw_uid, pw.pw_gid)
        for name in files:
            os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid, follow_symlinks=False)


def _check_traversable(path: Path, user: str | None) -> None:
    """The unprivileged user must be able to reach the data directory through every parent."""
    if user is None:
        return
    for parent in reversed(path.resolve().parents):
        if not os.stat(parent).st_mode & 0o001:
            raise StackError(
                f"PostgreSQL runs as OS user {user!r}, which cannot enter {parent} (mode "
                f"{oct(os.stat(parent).st_mode & 0o777)}); choose a PILOTHOUSE_DATA_DIR it can reach, "
                f"or `chmod o+x {parent}`"
            )


def provision(settings: Settings, info: StackInfo, bindir: Path) -> bool:
    """Create the cluster once (initdb). Returns True if it was created now."""
    p = _paths(settings)
    user = os_user()
    if (p["data"] / "PG_VERSION").is_file():
        have = (p["data"] / "PG_VERSION").read_text().strip()
        if have != bindir.parent.name:
            raise StackError(
                f"cluster in {p['data']} is PostgreSQL {have}, binaries are {bindir}; upgrade or remove it"
            )
        return False
    p["base"].mkdir(parents=True, exist_ok=True)
    p["socket"].mkdir(parents=True, exist_ok=True)
    _check_traversable(p["base"], user)
    pwfile = p["base"] / ".initdb-pw"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(info.postgres.password.get_secret_value() + "\n")
    _chown_tree(p["base"], user)
    try:
        out = subprocess.run(
            [
                str(bindir / "initdb"), "-D", str(p["data"]), "-U", ROLE, f"--pwfile={pwfile}",
                "--auth=scram-sha-256", "--encoding=UTF8", "--no-locale",
            ],  # fmt: skip
            capture_output=True,
            text=True,
            cwd=p["base"],
            user=user,
            group=pwd.getpwnam(user).pw_gid if user else None,
            extra_groups=[] if user else None,
            timeout=300,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    if out.returncode != 0:
        detail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        raise ComponentFailed(f"initdb failed: {' | '.join(detail)}")
    return True


def start(settings: Settings, bindir: Path):
    """Start the postmaster detached; None if it already runs."""
    if procs.find(settings.run_dir, NAME):
        return None
    p = _paths(settings)
    user = os_user()
    p["socket"].mkdir(parents=True, exist_ok=True)
    _chown_tree(p["socket"], user)
    argv = [
        str(bindir / "postgres"), "-D", str(p["data"]),
        "-c", f"listen_addresses={settings.host}", "-c", f"port={settings.postgres_port}",
        "-c", f"unix_socket_directories={p['socket']}", "-c", "password_encryption=scram-sha-256",
    ]  # fmt: skip
    return procs.start(NAME, argv, run_dir=settings.run_dir, log_path=p["log"], cwd=p["base"], user=user)


def _connect(info: StackInfo, dbname: str, timeout_s: int = 3) -> psycopg.Connection:
    pg = info.postgres
    return psycopg.connect(
        host=pg.host,
        port=pg.port,
        user=pg.user,
        password=pg.password.get_secret_value(),
        dbname=dbname,
        connect_timeout=timeout_s,
        autocommit=True,
    )


def wait_ready(settings: Settings, info: StackInfo, proc) -> None:
    """Wait for an authenticated connection, then create the `pilothouse` database if it is missing."""
    p = _paths(settings)
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ComponentFailed(
                f"postgres exited (code {proc.returncode}); see {p['log']}:\n{procs.log_tail(p['log'])}"
            )
        try:
            with _connect(info, "postgres") as conn:
                exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone()
                if not exists:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
                ensure_roles(conn, info)
                return
        except psycopg.OperationalError as e:
            last = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "password authentication failed" in last:
                raise ComponentFailed(
                    f"postgres rejects the password in {info.path_for(info.data_dir)} (the cluster in {p['data']} "
                    "was created with another one); restore stack.json or remove the cluster"
                ) from e
        time.sleep(0.3)
    raise ComponentFailed(f"postgres not ready after {READY_TIMEOUT_S:.0f}s ({last}); see {p['log']}")


def ensure_roles(conn: psycopg.Connection, info: StackInfo) -> None:
    """Create (or re-password) the stack's non-superuser login roles; each may connect to the database, no more."""
    for role, password in info.postgres.roles.items():
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        attributes = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
        conn.execute(
            sql.SQL("{} ROLE {} " + attributes + " PASSWORD {}").format(
                sql.SQL("ALTER" if exists else "CREATE"), sql.Identifier(role), sql.Literal(password.get_secret_value())
            )
        )
        conn.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(DATABASE), sql.Identifier(role))
        )


def health(settings: Settings, info: StackInfo | None) -> dict:
    running = procs.find(settings.run_dir, NAME)
    out: dict = {"healthy": False, "pid": running.pid if running else None, "port": settings.postgres_port}
    if info is None:
        out["error"] = "not provisioned"
        return out
    try:
        with _connect(info, info.postgres.database, timeout_s=3) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
    except psycopg.Error as e:
        out["error"] = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return out
    out.update(healthy=True, version=re.split(r"\s", version)[0], database=info.postgres.database)
    return out
