#!/usr/bin/env python3
"""Run nitmir's policyd-rate-limit 1.2.0 (PyPI) against MariaDB, as a peer to benchmark policyd against.

    .venv/bin/python bench/peer_rate_limit.py                 # private MariaDB, DATA, -c 20, 5 s
    .venv/bin/python bench/peer_rate_limit.py --duration 10 --venv /tmp/prl-venv

`ensure_installed()` puts policyd-rate-limit==1.2.0 and its MySQL driver (mysqlclient, imported
as MySQLdb; PyMySQL is not used by it) in a venv of their own. `running_rate_limit()` writes its
YAML config (backend 1 = MySQL, one limit of 1500 recipients per 86400 s, TCP on 127.0.0.1:port,
count_mode 1 = count recipient_count at protocol_state DATA), creates its table, runs it in the
foreground and stops it by pid. The demo below starts a private MariaDB (tests/dbservers.py) and
drives the peer with ../shared/tools/policy-bench at DATA.

What its source (site-packages/policyd_rate_limit/) requires, read there and (but for `imp`) seen running:
- `sql_limits_by_id: ""` must be set: the key is missing from its built-in defaults, so without it
  the start-up schema step fails and every request then closes the connection with a traceback.
- `count_mode: 1` must be set: the built-in default is 0 (count at RCPT only); DATA requests are
  then answered DUNNO without being counted (the shipped YAML template says 1).
- `debug: false`: the default logs every request to stderr (1,362 against 1,837 req/s in one pair here).
- `user`/`group`: when started as root it drops privileges to them (default account
  "policyd-rate-limit", which does not exist: exit 2), so they are set to the caller's own.
- There is no `--init`: it creates `mail_count` and its index itself at start-up. `--clean` runs
  the same step and exits, so it is run first here to fail early with a clear error.
- SIGTERM has no handler (the default action ends it), so its pid file is removed here afterwards.
- It imports `imp`, so it needs Python <= 3.11 (the venv is made from the running interpreter).

Apt packages to build mysqlclient (no Linux wheel on PyPI), beyond the MariaDB server and client
in scripts/apt-packages.txt: default-libmysqlclient-dev, pkg-config, build-essential, installed
here when missing (as root). The libmariadb3 runtime comes with mariadb-client.

Verified on Debian 12, Python 3.11.7, mysqlclient 2.3.2, MariaDB 10.11 (2 cores): the demo ran with
0 errors at 1,000-1,600 req/s, every reply DUNNO, one mail_count row per authenticated request,
all at DATA; a fresh venv installs in about 13 s with no pip cache.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import grp
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT.parent / "shared" / "tools"

PACKAGE = "policyd-rate-limit"
VERSION = "1.2.0"
DRIVER = "mysqlclient==2.3.2"  # its MySQL backend does `import MySQLdb`
APT_PACKAGES = ("default-libmysqlclient-dev", "pkg-config", "build-essential")

HOST = "127.0.0.1"
LIMIT = (1500, 86400)  # (recipients, seconds): the same as policyd's default quota
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
MYSQL_SCHEMES = ("mysql", "mariadb")

# Exits 0 only when the pinned version and the driver both import.
_CHECK = (
    "import importlib.metadata as m, sys\n"
    f"sys.exit(m.version({PACKAGE!r}) != {VERSION!r})\n"
    "import MySQLdb, policyd_rate_limit.utils\n"
)


class PeerError(RuntimeError):
    """policyd-rate-limit could not be installed, configured or started."""


@dataclasses.dataclass(frozen=True)
class RunningPeer:
    """A started policyd-rate-limit: where it listens and where it logs."""

    host: str
    port: int
    pid: int
    config: Path
    log: Path

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _imports(python: Path) -> bool:
    check = subprocess.run([str(python), "-c", _CHECK], capture_output=True, check=False)
    return check.returncode == 0


def install_apt_packages() -> None:
    """APT_PACKAGES, those missing, with apt-get when root (the bench's alone: the tests
    do not need them, so scripts/bootstrap does not install them)."""
    missing = [
        package
        for package in APT_PACKAGES
        if "install ok installed"
        not in subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
        ).stdout
    ]
    if not missing or os.geteuid() != 0:
        return  # not root: pip's error below names them
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=environment)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        check=True,
        env=environment,
        stdout=subprocess.DEVNULL,
    )


def ensure_installed(venv_dir: Path) -> Path:
    """Make `venv_dir` a venv holding policyd-rate-limit 1.2.0 and mysqlclient (skipped when
    already so) and return the path of its `policyd-rate-limit` executable."""
    python = venv_dir / "bin" / "python"
    executable = venv_dir / "bin" / PACKAGE
    if python.exists() and executable.exists() and _imports(python):
        return executable
    install_apt_packages()
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv_dir)], check=True)
    log = venv_dir / "pip-install.log"
    with log.open("wb") as out:
        pip = subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                f"{PACKAGE}=={VERSION}",
                DRIVER,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    if pip.returncode != 0:
        raise PeerError(
            f"pip install into {venv_dir} failed (exit {pip.returncode}); mysqlclient builds from source"
            f" and needs the apt packages {' '.join(APT_PACKAGES)}. Log tail:\n{_log_tail(log)}"
        )
    if not _imports(python):
        check = subprocess.run([str(python), "-c", _CHECK], capture_output=True, text=True, check=False)
        raise PeerError(f"{PACKAGE} {VERSION} does not import in {venv_dir}:\n{check.stderr.strip()}")
    return executable


def rate_limit_config(mysql_url: str, port: int, pidfile: Path) -> dict[str, object]:
    """policyd-rate-limit's settings for a MySQL/MariaDB URL, listening on 127.0.0.1:port."""
    url = urlsplit(mysql_url)
    database = url.path.lstrip("/")
    if url.scheme not in MYSQL_SCHEMES or not url.hostname or not database:
        raise PeerError(f"not a mysql://user:password@host:port/database URL: {mysql_url!r}")
    account = pwd.getpwuid(os.getuid())
    return {
        "debug": False,
        "user": account.pw_name,
        "group": grp.getgrgid(account.pw_gid).gr_name,
        "pidfile": str(pidfile),
        "backend": 1,  # policyd_rate_limit.const.MYSQL_DB
        "mysql_config": {  # passed as is to MySQLdb.connect()
            "host": url.hostname,
            "port": url.port or 3306,
            "user": unquote(url.username or ""),
            "passwd": unquote(url.password or ""),
            "db": database,
            "charset": "utf8",
        },
        "SOCKET": [HOST, port],
        "limits": [list(LIMIT)],
        "limits_by_id": {},
        "sql_limits_by_id": "",
        "limit_by_sasl": True,
        "limit_by_sender": False,
        "limit_by_ip": False,
        "limited_networks": [],
        "count_mode": 1,
        "success_action": "dunno",
        "fail_action": "defer_if_permit Rate limit reach, retry later",
        "db_error_action": "dunno",
        "report": False,
    }


def _port_open(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=0.2).close()
    except OSError:
        return False
    return True


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not _port_open(port):
        if process.poll() is not None:
            raise PeerError(f"{PACKAGE} exited with {process.returncode}; log tail:\n{_log_tail(log)}")
        if time.monotonic() > deadline:
            raise PeerError(f"{PACKAGE} not listening on {HOST}:{port} after {START_TIMEOUT:.0f}s")
        time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def running_rate_limit(venv_dir: Path, mysql_url: str, port: int, workdir: Path) -> Iterator[RunningPeer]:
    """Run policyd-rate-limit on 127.0.0.1:port over the database at `mysql_url` while the block
    runs; its config, pid file and log go in `workdir`."""
    executable = ensure_installed(venv_dir)
    if _port_open(port):
        raise PeerError(f"{HOST}:{port} is already in use")
    workdir.mkdir(parents=True, exist_ok=True)
    pidfile = workdir / "run" / f"{PACKAGE}.pid"
    pidfile.parent.mkdir(exist_ok=True)
    pidfile.unlink(missing_ok=True)  # a stale one with a reused pid would stop it from starting
    config = workdir / f"{PACKAGE}.yaml"  # JSON is YAML; the suffix selects its YAML loader
    config.write_text(json.dumps(rate_limit_config(mysql_url, port, pidfile), indent=2) + "\n")
    log = workdir / f"{PACKAGE}.log"

    # Its schema step: `--clean` creates the table and index as a start does, then exits.
    init = subprocess.run(
        [str(executable), "--file", str(config), "--clean"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if init.returncode != 0 or "Fail to initialize database" in init.stderr:
        raise PeerError(f"{PACKAGE} --clean failed (exit {init.returncode}):\n{init.stderr.strip()}")

    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(executable), "--file", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        _wait_for_port(port, process, log)
        yield RunningPeer(host=HOST, port=port, pid=process.pid, config=config, log=log)
    finally:
        _stop(process)
        pidfile.unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def policy_bench(target: str, args: argparse.Namespace) -> dict[str, object]:
    """One run of ../shared/tools/policy-bench against `target`, as parsed from its --json output."""
    command = [
        sys.executable,
        str(TOOLS / "policy-bench"),
        "--target",
        target,
        "-c",
        str(args.connections),
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--users",
        str(args.users),
        "--state",
        args.state,
        "--json",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    data: dict[str, object] = json.loads(result.stdout)
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description="Benchmark policyd-rate-limit 1.2.0 on a private MariaDB.")
    parser.add_argument(
        "--venv",
        type=Path,
        default=Path(tempfile.gettempdir()) / f"{PACKAGE}-{VERSION}-venv",
        help="venv for policyd-rate-limit (made if missing)",
    )
    parser.add_argument("-c", "--connections", type=int, default=20)
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--warmup", type=float, default=1)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--state", default="DATA", choices=["DATA", "RCPT", "END-OF-MESSAGE"])
    args = parser.parse_args()

    ensure_installed(args.venv)  # before the database starts: a first install takes a minute
    sys.path.insert(0, str(ROOT))
    from tests import dbservers

    with (
        dbservers.MariaDBServer() as server,
        tempfile.TemporaryDirectory(prefix="peer-rate-limit-") as workdir,
        running_rate_limit(args.venv, server.url, free_port(), Path(workdir)) as peer,
    ):
        result = policy_bench(peer.target, args)
        counted = server.admin_execute(
            "SELECT COUNT(*), COALESCE(SUM(recipient_count), 0), GROUP_CONCAT(DISTINCT protocol_state) "
            "FROM mail_count",
            server.database,
        ).split()
    print(
        f"{PACKAGE} {VERSION}: {result['throughput_rps']} req/s, errors {result['errors']}, "
        f"{counted[0]} mail_count rows ({counted[1]} recipients) at protocol_state {counted[-1]}",
        file=sys.stderr,
    )
    print(json.dumps(result))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
