"""A throwaway PostgreSQL cluster for tests: initdb into a temporary folder, started on a
free port with durability off (fsync, synchronous commit), stopped and deleted after.

The server refuses to run as root, so as root every server command runs as the
``postgres`` system user, which then owns the folder.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg
from psycopg import sql

USER = "supportbot"
PORT_ATTEMPTS = 3
"""Starts tried, each on a newly picked port, when the one picked was taken meanwhile."""
MISSING_HINT = "install the Debian package postgresql (make test does)"
START_TIMEOUT_S = 60


class ClusterError(RuntimeError):
    """The cluster could not be set up (binaries missing, initdb or start failed)."""


def pg_bin_dir() -> Path:
    """``SUPPORTBOT_PG_BIN``, else the newest ``/usr/lib/postgresql/*/bin`` with initdb."""
    configured = os.environ.get("SUPPORTBOT_PG_BIN")
    if configured:
        candidates = [Path(configured)]
    else:
        found = glob.glob("/usr/lib/postgresql/*/bin")
        candidates = sorted(
            (Path(p) for p in found),
            key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.name)] or [0],
            reverse=True,
        )
    for directory in candidates:
        if all(os.access(directory / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return directory
    where = configured or "/usr/lib/postgresql/*/bin"
    raise ClusterError(f"no PostgreSQL server binaries (initdb, pg_ctl) in {where}: {MISSING_HINT}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cluster:
    """One running cluster; :meth:`create_database` gives each test its own database."""

    __slots__ = ("_as_postgres", "_counter", "bin_dir", "data_dir", "folder", "port")

    def __init__(self, bin_dir: Path, folder: Path, as_postgres: bool) -> None:
        self.bin_dir = bin_dir
        self.folder = folder
        self.data_dir = folder / "data"
        self.port = _free_port()
        self._as_postgres = as_postgres
        self._counter = itertools.count(1)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{dbname}"

    def _server_command(self, tool: str, *args: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_postgres else []
        done = subprocess.run(
            [*prefix, str(self.bin_dir / tool), *args],
            cwd=self.folder, capture_output=True, text=True, timeout=START_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            log = self.folder / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise ClusterError(
                f"{tool} {' '.join(args)} failed ({done.returncode}):\n"
                f"{done.stdout}{done.stderr}{tail}"
            )

    def init(self) -> None:
        self._server_command(
            "initdb", "-A", "trust", "-U", USER, "--no-sync", "-E", "UTF8", "--no-locale",
            "-D", str(self.data_dir),
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        self._server_command(
            "pg_ctl", "start", "-w", "-t", str(START_TIMEOUT_S), "-D", str(self.data_dir),
            "-l", str(self.folder / "server.log"), "-o", options,
        )
        with psycopg.connect(self.url(), connect_timeout=10) as conn:  # ready for queries
            conn.execute("SELECT 1")

    def stop(self, mode: str = "immediate") -> None:
        """Stop; by default at once (no checkpoint): a crash, as far as clients can tell,
        which with ``synchronous_commit=off`` may lose the last commits."""
        if (self.data_dir / "postmaster.pid").exists():
            self._server_command("pg_ctl", "stop", "-m", mode, "-w", "-D", str(self.data_dir))

    def restart(self) -> None:
        """Stop cleanly (every client's connection is closed, no commit lost) and start
        again on the same port."""
        self.stop("fast")
        self.start()

    def create_database(self, name: str | None = None) -> str:
        """A new empty database (``t_<n>`` unless named); returns its URL."""
        name = name or f"t_{next(self._counter)}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def cleanup(self) -> None:
        """Stop the server (if it runs) and delete the folder."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def start_cluster() -> Cluster:
    """A new cluster, initialised and running; call :meth:`Cluster.cleanup` when done."""
    bin_dir = pg_bin_dir()
    as_postgres = os.geteuid() == 0
    folder = Path(tempfile.mkdtemp(prefix="supportbot-pg-"))
    if as_postgres:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(folder, ignore_errors=True)
            raise ClusterError(
                f"running as root and there is no postgres system user: {MISSING_HINT}"
            ) from None
        os.chown(folder, account.pw_uid, account.pw_gid)
    cluster = Cluster(bin_dir, folder, as_postgres)
    try:
        cluster.init()
        for attempt in itertools.count(1):
            try:
                cluster.start()
                break
            except ClusterError:
                # The port was free when picked; another process may have bound it since.
                log = cluster.folder / "server.log"
                taken = log.exists() and "could not bind" in log.read_text(errors="replace")
                if not taken or attempt >= PORT_ATTEMPTS:
                    raise
                cluster.port = _free_port()
    except BaseException:
        cluster.cleanup()
        raise
    return cluster
