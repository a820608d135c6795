"""A throwaway PostgreSQL cluster in a temp folder, for the tests and the labeling benchmarks.

``PostgresCluster(find_postgres_bin()).start()`` runs ``initdb`` in a temp folder and ``pg_ctl start`` on a free
port on 127.0.0.1 (as the ``postgres`` user when running as root: initdb refuses root); ``new_database()`` gives
the URL of a fresh database; ``stop()`` stops the server and deletes the folder. ``durable=False`` (the tests)
turns off fsync and synchronous commits; the benchmarks keep PostgreSQL's durable defaults.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def find_postgres_bin() -> Path | None:
    """The folder of the newest ``initdb`` + ``pg_ctl``: Debian's /usr/lib/postgresql/N/bin, else PATH."""
    def version(folder: str) -> int:
        name = Path(folder).parent.name
        return int(name) if name.isdigit() else 0

    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    on_path = shutil.which("initdb")
    for folder in [*folders, *([str(Path(on_path).parent)] if on_path else [])]:
        if all(os.access(Path(folder) / tool, os.X_OK) for tool in ("initdb", "pg_ctl")):
            return Path(folder)
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresCluster:
    """A throwaway PostgreSQL cluster in a temp folder; ``new_database()`` gives the URL of a fresh database."""

    def __init__(self, bindir: Path, durable: bool = False):
        self.bindir, self.durable = bindir, durable
        # initdb refuses to run as root: the cluster then belongs to the postgres user (in /tmp, which it can reach)
        self.prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.root = Path(tempfile.mkdtemp(prefix="rlhf-test-pg-", dir="/tmp" if self.prefix else None))
        if self.prefix:
            shutil.chown(self.root, user="postgres")
        self.data, self.port = self.root / "data", 0
        self._names = itertools.count()

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self.prefix, str(self.bindir / tool), *args], capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        if done.returncode != 0:
            log = self.root / "log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stdout}{done.stderr}{tail}")

    def start(self) -> "PostgresCluster":
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8",
                  "--locale=C", "--no-instructions")  # fmt: skip
        for attempt in range(3):  # the free port can be taken by someone else before the server binds it
            self.port = _free_port()
            options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=300"
            if not self.durable:
                options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-t", "60",
                          "-o", options, "start")  # fmt: skip
                return self
            except RuntimeError:
                if attempt == 2:
                    raise
        return self

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql)

    def new_database(self) -> str:
        name = f"db_{next(self._names)}"
        self._admin(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
