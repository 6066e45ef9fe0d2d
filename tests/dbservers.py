"""Throwaway MariaDB and PostgreSQL servers for tests.

Each server runs from Debian's packaged binaries, as a child of the test
process, with its data directory, unix socket and log inside a private temp
directory, listening on 127.0.0.1 on a free port. Nothing here touches the
system instances (their ports, sockets or data dirs), systemd or docker.

Typical use from a pytest fixture::

    from tests import dbservers

    @pytest.fixture(scope="session")
    def mariadb():
        dbservers.require("mariadb")  # skip, or fail when CI=true
        with dbservers.MariaDBServer() as server:
            yield server

Each server provides a database ``policyd_test`` owned by the user ``policyd``
(password ``policyd-pw``, password auth over TCP), exposed as ``.url``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self, TypedDict

import pytest

__all__ = [
    "DBServer",
    "DBServerError",
    "GaleraCluster",
    "GaleraNode",
    "MariaDBServer",
    "PostgreSQLServer",
    "TcpProxy",
    "available",
    "require",
    "server_class",
]

DEFAULT_USER = "policyd"
DEFAULT_PASSWORD = "policyd-pw"
DEFAULT_DATABASE = "policyd_test"
HOST = "127.0.0.1"

START_TIMEOUT = 60.0  # generous upper bound; a normal start takes ~1-3 s
STOP_TIMEOUT = 20.0  # graceful shutdown budget before SIGKILL

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

# Servers still running, stopped at interpreter exit as a fallback for
# fixtures that never reached their teardown.
_LIVE: set[DBServer] = set()
_LIVE_LOCK = threading.Lock()


class _SpawnKwargs(TypedDict):
    env: dict[str, str]
    cwd: Path
    user: int | None
    group: int | None
    extra_groups: list[int] | None


class DBServerError(RuntimeError):
    """A test database server could not be set up, started or used."""


# --------------------------------------------------------------------------
# Binary discovery


def _which(names: Sequence[str], extra_dirs: Sequence[str] = ()) -> str | None:
    """First of ``names`` found on PATH or in ``extra_dirs`` (sbin is often
    not on a non-root user's PATH)."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
        for d in extra_dirs:
            candidate = os.path.join(d, name)
            if os.access(candidate, os.X_OK):
                return candidate
    return None


_SBIN = ("/usr/sbin", "/usr/local/sbin", "/usr/libexec", "/sbin")


def _mariadb_binaries() -> dict[str, str] | str:
    """Paths of the MariaDB server, installer and client, or a reason."""
    found = {
        "server": _which(["mariadbd", "mysqld"], _SBIN),
        "install_db": _which(["mariadb-install-db", "mysql_install_db"], _SBIN),
        "client": _which(["mariadb", "mysql"]),
    }
    missing = [k for k, v in found.items() if v is None]
    if missing:
        return (
            f"MariaDB binaries not found ({', '.join(missing)}); install the Debian "
            "packages mariadb-server and mariadb-client (see scripts/apt-packages.txt)"
        )
    return {k: v for k, v in found.items() if v is not None}


def _pg_bindir() -> str | None:
    """Directory holding initdb/postgres/psql: $POLICYD_TEST_PG_BINDIR, else the
    newest Debian /usr/lib/postgresql/<ver>/bin, else wherever initdb is on PATH."""
    candidates: list[str] = []
    env_dir = os.environ.get("POLICYD_TEST_PG_BINDIR")
    if env_dir:
        candidates.append(env_dir)

    def version_key(path: str) -> tuple[int, ...]:
        ver = Path(path).parent.name
        return tuple(int(p) for p in ver.split(".") if p.isdigit())

    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version_key, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(os.path.dirname(initdb))
    for d in candidates:
        if all(os.access(os.path.join(d, b), os.X_OK) for b in ("initdb", "postgres")):
            return d
    return None


def _postgres_binaries() -> dict[str, str] | str:
    """Paths of initdb, postgres and psql, or a reason."""
    bindir = _pg_bindir()
    if bindir is None:
        return (
            "PostgreSQL server binaries (initdb, postgres) not found under "
            "/usr/lib/postgresql/*/bin; install the Debian package postgresql "
            "(see scripts/apt-packages.txt)"
        )
    psql = os.path.join(bindir, "psql")
    if not os.access(psql, os.X_OK):
        psql = shutil.which("psql") or ""
    if not psql:
        return "psql not found; install the Debian package postgresql-client"
    return {
        "initdb": os.path.join(bindir, "initdb"),
        "server": os.path.join(bindir, "postgres"),
        "client": psql,
    }


def _service_user(preferred: str) -> pwd.struct_passwd | None:
    """The unprivileged account to run a server as when we are root: the
    package's own system user if present, else ``nobody``. None when not root
    (then the server runs as the current user)."""
    if os.geteuid() != 0:
        return None
    for name in (preferred, "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise DBServerError(
        f"running as root but neither '{preferred}' nor 'nobody' exists to run the database server as"
    )


def available(kind: str) -> str | None:
    """None if a ``kind`` server ("mariadb"/"mysql" or "postgresql"/"postgres")
    can be started here, else a human-readable reason why not."""
    cls = server_class(kind)
    found = cls._find_binaries()
    if isinstance(found, str):
        return found
    try:
        _service_user(cls._run_as)
    except DBServerError as exc:
        return str(exc)
    return None


def require(kind: str) -> None:
    """In a pytest fixture/test: skip if ``kind`` is unavailable, but fail
    when CI=true (CI must run the database tests, never silently skip)."""
    reason = available(kind)
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"CI=true but {kind} server unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


def server_class(kind: str) -> type[DBServer]:
    """Server class for a kind name."""
    kinds: dict[str, type[DBServer]] = {
        "mariadb": MariaDBServer,
        "mysql": MariaDBServer,
        "galera": GaleraNode,
        "postgresql": PostgreSQLServer,
        "postgres": PostgreSQLServer,
        "pg": PostgreSQLServer,
    }
    try:
        return kinds[kind.lower()]
    except KeyError:
        raise ValueError(f"unknown database kind {kind!r}") from None


# --------------------------------------------------------------------------
# Helpers


def _free_port() -> int:
    """A currently free loopback TCP port (the server binds it right after;
    a lost race shows up as a failed start, which start() retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _clean_env() -> dict[str, str]:
    """Environment for the servers and clients: C locale, and no PG*/MYSQL*
    variables from the caller that could redirect the clients elsewhere."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PG", "MYSQL", "MARIADB", "LC_")) and k != "LANG"
    }
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


_OWNER_FILE = "owner.pid"  # pid of the test process that made a temp dir


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_tmpdirs(base: str, kind: str) -> None:
    """Delete temp dirs left by test processes that were SIGKILLed (their
    servers died with them via PDEATHSIG, but nobody removed the files)."""
    for path in glob.glob(os.path.join(base, f"policyd-{kind}-*")):
        try:
            owner = int(Path(path, _OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue  # not ours, or being created right now
        if not _pid_alive(owner):
            shutil.rmtree(path, ignore_errors=True)


_PR_SET_PDEATHSIG = 1


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    # Linux-only: the kernel sends SIGTERM to the server if the test process
    # dies without running atexit (e.g. SIGKILLed by a CI timeout).
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _atexit_stop_all() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


atexit.register(_atexit_stop_all)


# --------------------------------------------------------------------------
# Base class


class DBServer:
    """Common lifecycle: temp dir, init, spawn, readiness wait, shutdown."""

    kind: str = ""
    scheme: str = ""
    superuser: str = ""
    _run_as: str = "nobody"  # preferred system account when running as root
    _stop_signal: signal.Signals = signal.SIGTERM  # graceful shutdown
    _crash_signal: signal.Signals = signal.SIGKILL  # abrupt: no goodbye to clients

    def __init__(
        self,
        *,
        user: str = DEFAULT_USER,
        password: str = DEFAULT_PASSWORD,
        database: str = DEFAULT_DATABASE,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        for name in (user, database):
            if not _NAME_RE.match(name):
                raise ValueError(f"invalid identifier {name!r}")
        if "'" in password or "\\" in password:
            raise ValueError("password must not contain quotes or backslashes")
        self.host = HOST
        self.port = 0
        self.user = user
        self.password = password
        self.database = database
        self.start_timeout = start_timeout
        self.tmpdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._account: pwd.struct_passwd | None = None
        self._bins: dict[str, str] = {}
        self._env = _clean_env()

    # -- public API --------------------------------------------------------

    @property
    def url(self) -> str:
        """URL of the test database as the test user, over TCP."""
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        """URL of ``database`` as the test user, over TCP."""
        return f"{self.scheme}://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    @property
    def pid(self) -> int | None:
        """Server process id while it runs."""
        return self._proc.pid if self._proc and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def datadir(self) -> Path:
        return self._dir / "data"

    @property
    def log_path(self) -> Path:
        return self._dir / "server.log"

    def start(self) -> Self:
        """Create the temp dir, init the data dir, start the server and create
        the test user and database. Returns self."""
        if self.tmpdir is not None:
            raise DBServerError(f"{self.kind} server already started")
        found = self._find_binaries()
        if isinstance(found, str):
            raise DBServerError(found)
        self._bins = found
        self._account = _service_user(self._run_as)
        self.tmpdir = self._make_tmpdir()
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self._init_datadir()
            # A port picked by _free_port() may be taken before the server
            # binds it; retry a couple of times with fresh ports.
            for attempt in range(3):
                self.port = _free_port()
                try:
                    self.start_server()
                    break
                except DBServerError:
                    if attempt == 2 or "in use" not in _log_tail(self.log_path):
                        raise
            self._setup()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (gracefully, then SIGKILL) and delete its temp dir."""
        try:
            self.stop_server()
        finally:
            if self.tmpdir is not None:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
                self.tmpdir = None
            with _LIVE_LOCK:
                _LIVE.discard(self)

    def stop_server(self, timeout: float = STOP_TIMEOUT, *, crash: bool = False) -> None:
        """Stop the server process but keep its data dir and port, to simulate
        an outage; start_server() brings the same server back. ``crash=True``
        kills it abruptly instead (crash recovery runs at the next start)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(self._crash_signal if crash else self._stop_signal)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # Kill the whole process group: postgres backends and the like.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def start_server(self) -> None:
        """(Re)start the server process on the same port and data dir, and
        wait until it accepts connections."""
        if self.tmpdir is None:
            raise DBServerError("start() the server first")
        if self.running:
            return
        cmd = self._server_command()
        # Server log (stdout+stderr) is appended to, so restarts keep history.
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,  # own group: a Ctrl-C to pytest doesn't hit it
                preexec_fn=self._preexec(),  # noqa: PLW1509
                **self._spawn_kwargs(),
            )
        self._wait_ready()

    def admin_execute(self, sql: str, database: str | None = None) -> str:
        """Run SQL as the superuser via the command-line client over the unix
        socket; returns the client's tab-separated output without headers."""
        if not self.running:
            raise DBServerError(f"{self.kind} server is not running")
        cmd = self._admin_command(database)
        res = subprocess.run(
            cmd, input=sql.encode(), capture_output=True, env=self._env, timeout=60, check=False
        )
        if res.returncode != 0:
            raise DBServerError(
                f"{self.kind} admin SQL failed ({res.returncode}): "
                f"{res.stderr.decode(errors='replace').strip()}\nSQL: {sql}"
            )
        return res.stdout.decode(errors="replace")

    def create_database(self, name: str) -> str:
        """Create a fresh empty database that the test user fully owns;
        returns its URL."""
        self._check_name(name)
        self.admin_execute(self._create_database_sql(name))
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop a database made by create_database() (no error if missing)."""
        self._check_name(name)
        self.admin_execute(self._drop_database_sql(name))

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host}:{self.port} {state}>"

    # -- to implement ------------------------------------------------------

    @classmethod
    def _find_binaries(cls) -> dict[str, str] | str:
        raise NotImplementedError

    def _init_datadir(self) -> None:
        raise NotImplementedError

    def _server_command(self) -> list[str]:
        raise NotImplementedError

    def _is_ready(self) -> bool:
        raise NotImplementedError

    def _setup(self) -> None:
        raise NotImplementedError

    def _admin_command(self, database: str | None) -> list[str]:
        raise NotImplementedError

    def _create_database_sql(self, name: str) -> str:
        raise NotImplementedError

    def _drop_database_sql(self, name: str) -> str:
        raise NotImplementedError

    # -- internals ---------------------------------------------------------

    @property
    def _dir(self) -> Path:
        if self.tmpdir is None:
            raise DBServerError(f"{self.kind} server not started")
        return self.tmpdir

    @staticmethod
    def _check_name(name: str) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid database name {name!r}")

    def _make_tmpdir(self) -> Path:
        base = tempfile.gettempdir()
        # The unix socket lives in here, so keep the path short (sun_path is
        # 108 bytes); and when the server runs as another user, the base must
        # be traversable by it (a root TMPDIR under /root is not).
        if len(base) > 40 or (self._account is not None and not os.stat(base).st_mode & 0o001):
            base = "/tmp"
        _remove_stale_tmpdirs(base, self.kind)
        path = Path(tempfile.mkdtemp(prefix=f"policyd-{self.kind}-", dir=base))
        (path / _OWNER_FILE).write_text(f"{os.getpid()}\n")
        if self._account is not None:
            os.chown(path, self._account.pw_uid, self._account.pw_gid)
        return path

    def _spawn_kwargs(self) -> _SpawnKwargs:
        """Popen kwargs: clean env, cwd in the temp dir, and (when root) run
        the child as the service account with no supplementary groups."""
        acct = self._account
        return {
            "env": self._env,
            "cwd": self._dir,
            "user": acct.pw_uid if acct else None,
            "group": acct.pw_gid if acct else None,
            "extra_groups": [] if acct else None,
        }

    @staticmethod
    def _preexec() -> Callable[[], None] | None:
        # PDEATHSIG fires when the *thread* that forked exits, so only arm it
        # when started from the main thread (the usual pytest case).
        if threading.current_thread() is threading.main_thread():
            return _set_pdeathsig
        return None

    def _run_as_account(self, cmd: list[str], what: str) -> None:
        """Run a one-shot command (initdb etc.) as the server account."""
        log_path = self._dir / "init.log"  # separate, so server.log is the server's own
        with open(log_path, "ab") as log:
            res = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=self.start_timeout,
                check=False,
                **self._spawn_kwargs(),
            )
        if res.returncode != 0:
            raise DBServerError(
                f"{self.kind}: {what} failed (exit {res.returncode}); output tail:\n" + _log_tail(log_path)
            )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        delay = 0.02
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                self._proc = None
                raise DBServerError(
                    f"{self.kind} server exited during startup (exit {code}); "
                    f"server log tail:\n{_log_tail(self.log_path)}"
                )
            if self._is_ready():
                return
            if time.monotonic() > deadline:
                self.stop_server()
                raise DBServerError(
                    f"{self.kind} server not ready after {self.start_timeout:.0f}s; "
                    f"server log tail:\n{_log_tail(self.log_path)}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)


# --------------------------------------------------------------------------
# MariaDB


class MariaDBServer(DBServer):
    """A private mariadbd. Superuser ``root`` (no password, unix socket only
    in practice: the TCP root accounts are dropped)."""

    kind = "mariadb"
    scheme = "mysql"
    superuser = "root"
    _run_as = "mysql"
    _stop_signal = signal.SIGTERM  # mariadbd: normal shutdown, kills clients

    @property
    def socket_path(self) -> Path:
        return self._dir / "mysqld.sock"

    @classmethod
    def _find_binaries(cls) -> dict[str, str] | str:
        return _mariadb_binaries()

    # MariaDB's default redo log.  With 16M the fault tests' replay of 25,000 spooled
    # events fills it, and the checkpoint that forces can stall the next write past
    # db_timeout (seen 1 run in 4): a second outage that a server sized as shipped would
    # not have.
    redo_log_size = "96M"

    def _tuning(self) -> list[str]:
        # Small and non-durable: it is a throwaway test server. The InnoDB
        # settings also make mariadb-install-db's bootstrap run much faster.
        return [
            "--innodb-buffer-pool-size=64M",
            f"--innodb-log-file-size={self.redo_log_size}",
            "--innodb-log-buffer-size=4M",
            "--innodb-flush-log-at-trx-commit=2",  # write at commit, no fsync: survives a crash
            "--innodb-doublewrite=0",
            "--innodb-flush-method=nosync",
            "--innodb-use-native-aio=0",  # io_uring/libaio often blocked in containers
            "--innodb-buffer-pool-dump-at-shutdown=0",
            "--innodb-buffer-pool-load-at-startup=0",
            "--sync-frm=0",
            "--skip-name-resolve",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_unicode_ci",
            "--performance-schema=0",
            "--max-connections=200",
        ]

    def _init_datadir(self) -> None:
        self.datadir.mkdir()
        tmp = self._dir / "tmp"
        tmp.mkdir()
        if self._account is not None:
            for d in (self.datadir, tmp):
                os.chown(d, self._account.pw_uid, self._account.pw_gid)
        self._run_as_account(
            [
                self._bins["install_db"],
                "--no-defaults",  # ignore /etc/mysql/*.cnf of the system server
                f"--datadir={self.datadir}",
                f"--tmpdir={tmp}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
                *self._tuning(),
            ],
            "mariadb-install-db",
        )

    def _server_command(self) -> list[str]:
        return [
            self._bins["server"],
            "--no-defaults",
            f"--datadir={self.datadir}",
            f"--tmpdir={self._dir / 'tmp'}",
            f"--socket={self.socket_path}",
            f"--pid-file={self._dir / 'mysqld.pid'}",
            f"--bind-address={self.host}",
            f"--port={self.port}",
            "--skip-log-bin",
            *self._tuning(),
        ]

    def _is_ready(self) -> bool:
        # mariadbd creates its socket after InnoDB recovery; a connect() that
        # lands before the grant tables are loaded just waits in the listen
        # backlog until the server starts accepting, so this is good enough.
        if not self.socket_path.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            try:
                s.connect(str(self.socket_path))
            except OSError:
                return False
        return True

    def _admin_command(self, database: str | None) -> list[str]:
        cmd = [
            self._bins["client"],
            "--no-defaults",
            f"--socket={self.socket_path}",
            f"--user={self.superuser}",
            "--batch",
            "--skip-column-names",
        ]
        if database:
            cmd.append(f"--database={database}")
        return cmd

    def _setup(self) -> None:
        # "normal" root auth means no password: keep only root@localhost (the
        # unix socket under --skip-name-resolve), drop root@<hostname>,
        # root@127.0.0.1 etc. and any anonymous accounts.
        extra = self.admin_execute(
            "SELECT host, user FROM mysql.user WHERE (user = 'root' AND host <> 'localhost') OR user = ''"
        )
        drops = "".join(
            f"DROP USER '{user}'@'{host}';\n"
            for host, _, user in (line.partition("\t") for line in extra.splitlines())
        )
        creates = "".join(
            f"CREATE USER '{self.user}'@'{host}' IDENTIFIED BY '{self.password}';\n"
            for host in ("%", "localhost")  # TCP, unix socket
        )
        self.admin_execute(drops + creates + self._create_database_sql(self.database))

    def _create_database_sql(self, name: str) -> str:
        u = self.user
        return (
            f"CREATE DATABASE `{name}`;\n"
            f"GRANT ALL PRIVILEGES ON `{name}`.* TO '{u}'@'%';\n"
            f"GRANT ALL PRIVILEGES ON `{name}`.* TO '{u}'@'localhost';\n"
        )

    def _drop_database_sql(self, name: str) -> str:
        return f"DROP DATABASE IF EXISTS `{name}`;\n"


# --------------------------------------------------------------------------
# MariaDB Galera


def _galera_provider() -> str | None:
    """Path of the Galera 4 provider library (Debian package galera-4)."""
    for path in ("/usr/lib/galera/libgalera_smm.so", "/usr/lib/libgalera_smm.so"):
        if os.access(path, os.R_OK):
            return path
    return None


def _galera_binaries() -> dict[str, str] | str:
    found = _mariadb_binaries()
    if isinstance(found, str):
        return found
    provider = _galera_provider()
    if provider is None:
        return "Galera provider libgalera_smm.so not found; install the Debian package galera-4"
    missing = [name for name in ("rsync", "wsrep_sst_rsync", "ss") if _which([name], _SBIN) is None]
    if missing:
        return (
            f"Galera SST tools not found ({', '.join(missing)}); install the Debian packages "
            "rsync and iproute2 (see scripts/apt-packages.txt)"
        )
    return {**found, "provider": provider}


# Group communication timeouts, shorter than Galera's defaults (suspect a silent node
# after 5 s, evict it after 15 s) so that a killed node leaves the cluster in ~2 s and a
# test does not wait out the defaults. Production keeps the defaults (docs/shared-database.md).
GALERA_EVS_OPTIONS = (
    "evs.keepalive_period=PT0.3S",
    "evs.inactive_check_period=PT0.3S",
    "evs.suspect_timeout=PT1.5S",
    "evs.inactive_timeout=PT3S",
    "evs.install_timeout=PT3S",
)


class GaleraNode(MariaDBServer):
    """One node of a GaleraCluster: a private mariadbd with wsrep on, its own client,
    group communication (gcomm), IST and SST ports on 127.0.0.1, and a my.cnf of its own
    (the SST script reads the node's settings from it)."""

    kind = "galera"
    redo_log_size = "16M"  # rsync SST copies it: small keeps a node's join quick

    def __init__(self, cluster: GaleraCluster, index: int) -> None:
        super().__init__(
            user=cluster.user,
            password=cluster.password,
            database=cluster.database,
            start_timeout=cluster.start_timeout,
        )
        self.cluster = cluster
        self.index = index  # 1-based; node 1 bootstraps the cluster
        self.port = _free_port()
        self.gcomm_port = _free_port()
        self.ist_port = _free_port()
        self.sst_port = _free_port()
        self._bootstrap = False

    @property
    def name(self) -> str:
        return f"node{self.index}"

    @property
    def config_path(self) -> Path:
        return self._dir / "my.cnf"

    @classmethod
    def _find_binaries(cls) -> dict[str, str] | str:
        return _galera_binaries()

    def start(self) -> Self:
        """Create the temp dir and start the node: node 1 from a fresh data dir as a new
        cluster, the others from an empty one, filled by SST from a running node."""
        if self.tmpdir is not None:
            raise DBServerError(f"galera {self.name} already started")
        found = self._find_binaries()
        if isinstance(found, str):
            raise DBServerError(found)
        self._bins = found
        self._account = _service_user(self._run_as)
        self.tmpdir = self._make_tmpdir()
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            if self.index == 1:
                self._init_datadir()
            else:
                for d in (self.datadir, self._dir / "tmp"):
                    d.mkdir()
                    if self._account is not None:
                        os.chown(d, self._account.pw_uid, self._account.pw_gid)
            self._write_config()
            self._bootstrap = self.index == 1
            try:
                self.start_server()
            finally:
                self._bootstrap = False  # a restart joins the running nodes
            if self.index == 1:
                self._setup()  # replicated to the joiners by SST
        except BaseException:
            self.stop()
            raise
        return self

    def _write_config(self) -> None:
        cluster_address = ",".join(f"{HOST}:{node.gcomm_port}" for node in self.cluster.nodes)
        provider_options = "; ".join(
            (
                f"gmcast.listen_addr=tcp://{HOST}:{self.gcomm_port}",
                f"ist.recv_addr={HOST}:{self.ist_port}",
                "gcache.size=32M",
                *GALERA_EVS_OPTIONS,
            )
        )
        options = [option.removeprefix("--") for option in self._tuning()]
        options += [
            f"datadir={self.datadir}",
            f"tmpdir={self._dir / 'tmp'}",
            f"socket={self.socket_path}",
            f"pid-file={self._dir / 'mysqld.pid'}",
            f"bind-address={self.host}",
            f"port={self.port}",
            "skip-log-bin",
            "binlog_format=ROW",
            "innodb_autoinc_lock_mode=2",
            "wsrep_on=ON",
            f"wsrep_provider={self._bins['provider']}",
            f"wsrep_cluster_name=policyd-test-{os.getpid()}",
            f"wsrep_cluster_address=gcomm://{cluster_address}",
            f"wsrep_node_name={self.name}",
            f"wsrep_node_address={HOST}:{self.gcomm_port}",
            f"wsrep_node_incoming_address={HOST}:{self.port}",
            f'wsrep_provider_options="{provider_options}"',
            "wsrep_sst_method=rsync",
            f"wsrep_sst_receive_address={HOST}:{self.sst_port}",
            "wsrep_slave_threads=2",
        ]
        text = "[mysqld]\n" + "".join(f"{option}\n" for option in options)
        self.config_path.write_text(text)

    def _server_command(self) -> list[str]:
        cmd = [self._bins["server"], f"--defaults-file={self.config_path}"]
        if self._bootstrap:
            cmd.append("--wsrep-new-cluster")
        return cmd

    def _is_ready(self) -> bool:
        # Accepting connections is not enough: a joiner takes queries only once it is
        # Synced with the cluster (after SST or IST).
        if not super()._is_ready():
            return False
        try:
            return self.wsrep_status("wsrep_local_state_comment") == "Synced"
        except DBServerError:
            return False

    def wsrep_status(self, name: str) -> str:
        """The value of a wsrep status variable on this node."""
        out = self.admin_execute(f"SHOW GLOBAL STATUS LIKE '{name}'")
        _, _, value = out.strip().partition("\t")
        return value


class GaleraCluster:
    """Three (by default) GaleraNode servers on 127.0.0.1 forming one cluster: node 1 is
    bootstrapped with --wsrep-new-cluster, the others join it by rsync SST. Each node
    has the test user and database; ``url`` lists all nodes, libpq style."""

    scheme = "mysql"

    def __init__(
        self,
        size: int = 3,
        *,
        user: str = DEFAULT_USER,
        password: str = DEFAULT_PASSWORD,
        database: str = DEFAULT_DATABASE,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.user = user
        self.password = password
        self.database = database
        self.start_timeout = start_timeout
        self.nodes: list[GaleraNode] = []
        self.nodes = [GaleraNode(self, index) for index in range(1, size + 1)]

    @property
    def url(self) -> str:
        """URL of the test database with every node, in node order."""
        return self.url_for(self.database)

    def url_for(self, database: str, nodes: Sequence[GaleraNode] | None = None) -> str:
        hosts = ",".join(f"{node.host}:{node.port}" for node in (nodes or self.nodes))
        return f"{self.scheme}://{self.user}:{self.password}@{hosts}/{database}"

    def start(self) -> Self:
        try:
            for node in self.nodes:
                node.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in reversed(self.nodes):
            with contextlib.suppress(Exception):
                node.stop()

    def admin_execute(self, sql: str, database: str | None = None) -> str:
        """Run SQL on the first running node (DDL replicates by TOI)."""
        for node in self.nodes:
            if node.running:
                return node.admin_execute(sql, database)
        raise DBServerError("no Galera node is running")

    def create_database(self, name: str) -> str:
        self.admin_execute(self.nodes[0]._create_database_sql(name))
        return self.url_for(name)

    def wait_synced(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until every running node is Synced and sees all running nodes."""
        deadline = time.monotonic() + timeout
        running = [node for node in self.nodes if node.running]
        while True:
            try:
                states = [
                    (node.wsrep_status("wsrep_local_state_comment"), node.wsrep_status("wsrep_cluster_size"))
                    for node in running
                ]
            except DBServerError:
                states = []
            if states and all(state == ("Synced", str(len(running))) for state in states):
                return
            if time.monotonic() > deadline:
                raise DBServerError(f"Galera nodes not synced after {timeout:.0f}s: {states}")
            time.sleep(0.1)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class TcpProxy:
    """A TCP forwarder on 127.0.0.1 to a server's port, in the test's event loop: cut()
    makes the address refuse connections and drops the ones open (a database host
    gone, as a client sees it), restore() brings it back on the same port."""

    def __init__(self, target_port: int, host: str = HOST) -> None:
        self.host = host
        self.target_port = target_port
        self.port = _free_port()
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    def hang(self) -> None:
        """Go silent: connections are accepted and nothing is forwarded either way, as
        with a host that stopped answering (no reset, no refusal)."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)
        return self

    async def restore(self) -> None:
        if self._server is None:
            await self.start()

    async def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for transport in list(self._transports):
            transport.abort()  # RST: the client's next read fails at once
        self._transports.clear()
        if server is not None:
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._forward(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()  # the test's loop is ending: nothing to report

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._flowing.wait()
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer.transport, upstream_writer.transport)
        self._transports.update(pair)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    await self._flowing.wait()
                    sink.write(data)
                    await sink.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                sink.transport.abort()

        try:
            await asyncio.gather(pump(reader, upstream_writer), pump(upstream_reader, writer))
        finally:
            self._transports.difference_update(pair)


# --------------------------------------------------------------------------
# PostgreSQL


class PostgreSQLServer(DBServer):
    """A private postgres. Superuser ``postgres`` with trust auth on the unix
    socket only; TCP requires a password (scram-sha-256)."""

    kind = "postgresql"
    scheme = "postgresql"
    superuser = "postgres"
    _run_as = "postgres"
    # SIGINT = "fast" shutdown: disconnects clients at once (SIGTERM would
    # wait for every client to leave, which defeats outage simulation).
    _stop_signal = signal.SIGINT
    # SIGQUIT = "immediate" shutdown: every backend exits at once, no
    # checkpoint. (SIGKILL on the postmaster alone would leave backends
    # holding its shared memory, and the restart would then refuse to run.)
    _crash_signal = signal.SIGQUIT

    @property
    def socket_dir(self) -> Path:
        return self._dir

    @classmethod
    def _find_binaries(cls) -> dict[str, str] | str:
        return _postgres_binaries()

    def _init_datadir(self) -> None:
        self._run_as_account(
            [
                self._bins["initdb"],
                f"--pgdata={self.datadir}",
                f"--username={self.superuser}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",  # no dependency on generated system locales
                "--no-sync",  # skip fsync of the new cluster: much faster
                "--no-instructions",
            ],
            "initdb",
        )

    def _server_command(self) -> list[str]:
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            # No fsync: a throwaway server; this makes it fast. Commits are
            # still written to the OS at commit time (synchronous_commit stays
            # on), so they survive a process crash (stop_server(crash=True)).
            "fsync": "off",
            "full_page_writes": "off",
            "shared_buffers": "16MB",
            "max_connections": "100",
            "max_wal_size": "256MB",
            "logging_collector": "off",
            "log_min_messages": "warning",
        }
        cmd = [self._bins["server"], "-D", str(self.datadir)]
        for key, value in settings.items():
            cmd += ["-c", f"{key}={value}"]
        return cmd

    def _is_ready(self) -> bool:
        # Same check as `pg_ctl -w`: line 8 of postmaster.pid says "ready"
        # once the postmaster accepts connections.
        try:
            lines = (self.datadir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready"

    def _admin_command(self, database: str | None) -> list[str]:
        return [
            self._bins["client"],
            "--no-psqlrc",
            "--quiet",
            "--no-align",
            "--tuples-only",
            "--field-separator=\t",
            "--set=ON_ERROR_STOP=1",
            f"--host={self.socket_dir}",
            f"--port={self.port}",
            f"--username={self.superuser}",
            f"--dbname={database or 'postgres'}",
            # Statements come on stdin (not -c) so that several may be sent
            # and CREATE DATABASE is not wrapped in one transaction.
            "--file=-",
        ]

    def _setup(self) -> None:
        self.admin_execute(
            f"CREATE ROLE \"{self.user}\" LOGIN PASSWORD '{self.password}';\n"
            + self._create_database_sql(self.database)
        )

    def _create_database_sql(self, name: str) -> str:
        # FILE_COPY: with fsync off it is ~5x faster than PG 15's default
        # WAL_LOG strategy (about 35 ms against 175 ms per database here).
        return f'CREATE DATABASE "{name}" OWNER "{self.user}" STRATEGY = FILE_COPY;\n'

    def _drop_database_sql(self, name: str) -> str:
        return f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE);\n'
