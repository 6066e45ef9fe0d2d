"""A throwaway, real Postfix (Debian's package) for end-to-end tests.

``PostfixRig`` builds a private Postfix instance in a temp dir (its own
config_directory, queue_directory, data_directory and log file) plus a private
Dovecot that only does SASL auth from a passwd-file, and a Python SMTP sink
that counts what Postfix relays. Everything listens on 127.0.0.1 on free
ports; nothing touches /etc/postfix, the system queue, syslog or systemd.

    with PostfixRig(policy="inet:127.0.0.1:10040", users={"alice": "pw"}) as rig:
        result = rig.send("alice", "pw", "alice@example.test", ["bob@example.test"])
        assert result.accepted
        rig.wait_delivered(1)

Listeners:

* ``rig.submission_port``: SASL AUTH PLAIN required to relay (plaintext AUTH
  is allowed: it is loopback only).
* ``rig.plain_port``: no AUTH; relays for 127.0.0.0/8 (mynetworks).

Both run ``check_policy_service`` at ``stage`` (default
smtpd_end_of_data_restrictions) unless told otherwise. Postfix runs as root
(needs the ``postfix`` user and ``postdrop`` group from the package), so the
rig needs root.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import grp
import json
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

__all__ = [
    "BackgroundLoop",
    "DeliveredMessage",
    "PostfixRig",
    "QueuedMessage",
    "RigClient",
    "RigError",
    "SendResult",
    "SmtpSink",
    "free_port",
    "make_message",
    "unavailable_reason",
]

HOSTNAME = "rig.example.test"  # explicit everywhere: a hostname lookup could reach DNS
_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/lib/postfix/sbin"])
_T = TypeVar("_T")


class RigError(RuntimeError):
    """The rig could not be set up, or a Postfix command failed."""


def _which(name: str) -> str | None:
    return shutil.which(name, path=_SBIN_PATH)


def unavailable_reason() -> str | None:
    """None if a rig can run here, else why not (for a pytest skip)."""
    missing = [name for name in ("postfix", "postqueue", "postsuper", "dovecot") if _which(name) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install postfix dovecot-core)"
    if os.geteuid() != 0:
        return "the Postfix rig must run as root (Postfix's master and postsuper need it)"
    try:
        pwd.getpwnam("postfix")
        grp.getgrnam("postdrop")
    except KeyError:
        return "user postfix / group postdrop missing (created by the postfix package)"
    return None


def _bin(name: str) -> str:
    path = _which(name)
    if path is None:
        raise RigError(f"{name} not found (apt-get install postfix dovecot-core)")
    return path


def _master_bin() -> str:
    daemon_dir = subprocess.run(
        [_bin("postconf"), "-dh", "daemon_directory"], check=True, capture_output=True, text=True
    ).stdout.strip()
    return f"{daemon_dir}/master"


def _listening(ports: set[int]) -> bool:
    """True when every port has a TCP listener on 127.0.0.1 (checked via /proc,
    so no test connection shows up in the Postfix log)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, _remote, state = line.split()[1:4]
        addr, port = local.split(":")
        if state == "0A" and addr == "0100007F":  # LISTEN on 127.0.0.1
            found.add(int(port, 16))
    return ports <= found


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (small race, fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------
# process helpers (Linux /proc)


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # fields after "comm)" are: state ppid pgrp ...
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append(int(entry))
    return members


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _kill_group(pgid: int) -> None:
    # Never signal our own group (would kill pytest).
    if pgid > 1 and pgid != os.getpgrp() and _group_members(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        _wait_group_gone(pgid, 5)


_WATCHDOG = """
import os, signal, sys
pgids = []
for line in sys.stdin:
    if line.strip() == "done":
        sys.exit(0)
    pgids.append(int(line))
for pgid in pgids:  # EOF: the test process died without stopping the rig
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
"""


class _Watchdog:
    """Kills the rig's process groups if the test process dies without stop()
    (e.g. SIGKILLed by a CI timeout; atexit covers normal exits). It notices
    through EOF on its stdin pipe. A parent-death signal is no use here: the
    Postfix master changes its effective uid/gid, which clears it."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG], stdin=subprocess.PIPE, start_new_session=True
        )

    def watch(self, pgid: int) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(f"{pgid}\n".encode())
        self._proc.stdin.flush()

    def release(self) -> None:
        """Exit without killing anything (the rig stopped its processes itself)."""
        assert self._proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self._proc.stdin.write(b"done\n")
            self._proc.stdin.close()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


# --------------------------------------------------------------------------
# asyncio in a background thread (the tests themselves are synchronous)


class BackgroundLoop:
    """An asyncio event loop running in a daemon thread.

    ``run(coro)`` runs a coroutine on it and returns its result; use it to host
    small servers (the SMTP sink, in-test policy servers) next to blocking
    smtplib clients.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="rig-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 30) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_closed():
            return

        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(_cancel_all())
        # let transports' scheduled close callbacks run (no unclosed-socket warnings)
        self.run(asyncio.sleep(0.01))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


# --------------------------------------------------------------------------
# SMTP sink: where Postfix relays everything


@dataclass(frozen=True)
class DeliveredMessage:
    """One SMTP transaction that Postfix completed to the sink."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes


class SmtpSink:
    """A minimal SMTP server (no extensions) that accepts and records every message."""

    def __init__(self, loop: BackgroundLoop, host: str = "127.0.0.1") -> None:
        self._bg = loop
        self.host = host
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._messages: list[DeliveredMessage] = []
        self._cond = threading.Condition()

    def start(self) -> None:
        async def _start() -> asyncio.Server:
            return await asyncio.start_server(self._handle, self.host, 0)

        self._server = self._bg.run(_start())
        self.port = int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return

        async def _stop() -> None:
            server.close()
            for w in list(self._writers):
                w.close()
            await server.wait_closed()

        self._bg.run(_stop())

    @property
    def messages(self) -> list[DeliveredMessage]:
        with self._cond:
            return list(self._messages)

    def recipients(self) -> list[str]:
        """Every delivered recipient, one entry per delivery."""
        return [r for m in self.messages for r in m.recipients]

    def clear(self) -> None:
        with self._cond:
            self._messages.clear()

    def wait(self, n: int, timeout: float) -> list[DeliveredMessage]:
        """Block until at least ``n`` messages arrived; TimeoutError otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._messages) >= n, timeout):
                raise TimeoutError(f"sink got {len(self._messages)} of {n} messages in {timeout}s")
            return list(self._messages)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        sender: str | None = None
        rcpts: list[str] = []

        async def reply(line: str) -> None:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()

        try:
            await reply(f"220 sink.{HOSTNAME} ESMTP sink")
            while line := await reader.readline():
                cmd = line.decode("utf-8", "replace").rstrip("\r\n")
                verb = cmd[:4].upper()
                if verb in ("EHLO", "HELO"):
                    await reply(f"250 sink.{HOSTNAME}")
                elif verb == "MAIL":
                    sender, rcpts = _smtp_path(cmd), []
                    await reply("250 2.1.0 Ok")
                elif verb == "RCPT" and sender is not None:
                    rcpts.append(_smtp_path(cmd))
                    await reply("250 2.1.5 Ok")
                elif verb == "DATA" and rcpts:
                    await reply("354 End data with <CR><LF>.<CR><LF>")
                    data = await _read_data(reader)
                    with self._cond:
                        self._messages.append(DeliveredMessage(sender or "", tuple(rcpts), data))
                        self._cond.notify_all()
                    sender, rcpts = None, []
                    await reply("250 2.0.0 Ok: delivered to sink")
                elif verb == "RSET":
                    sender, rcpts = None, []
                    await reply("250 2.0.0 Ok")
                elif verb == "NOOP":
                    await reply("250 2.0.0 Ok")
                elif verb == "QUIT":
                    await reply("221 2.0.0 Bye")
                    break
                else:
                    await reply("503 5.5.1 Bad sequence of commands")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


def _smtp_path(cmd: str) -> str:
    m = re.search(r"<([^>]*)>", cmd)
    return m.group(1) if m else ""


async def _read_data(reader: asyncio.StreamReader) -> bytes:
    lines: list[bytes] = []
    while True:
        line = await reader.readuntil(b"\n")
        if line in (b".\r\n", b".\n"):
            return b"".join(lines)
        lines.append(line[1:] if line.startswith(b"..") else line)  # undo dot-stuffing


# --------------------------------------------------------------------------
# client side


@dataclass
class SendResult:
    """What the client saw for one message.

    ``accepted`` is True when the end-of-DATA reply was 2xx (the message is in
    the queue, possibly in ``hold``). Otherwise ``stage`` tells where it
    failed (connect, auth, mail, rcpt, data, end-of-data) and ``code``/``text``
    carry that reply.
    """

    accepted: bool
    code: int
    text: str
    stage: str
    queue_id: str | None = None
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.stage}: {self.code} {self.text}"


def _reply(code: int, msg: bytes | str) -> tuple[int, str]:
    return code, msg.decode("utf-8", "replace") if isinstance(msg, bytes) else msg


def make_message(sender: str, recipients: Iterable[str], subject: str = "rig test", body: str = "") -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain=HOSTNAME)  # domain given: no getfqdn() lookup
    msg.set_content(body or "hello from the postfix rig\n")
    return msg.as_bytes()


class RigClient:
    """One SMTP session (optionally authenticated) that can send several messages."""

    def __init__(
        self, port: int, user: str | None = None, password: str | None = None, timeout: float = 60
    ) -> None:
        # local_hostname given: smtplib would otherwise call socket.getfqdn()
        self.smtp = smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.test", timeout=timeout)
        self.smtp.ehlo()
        self.auth: tuple[int, str] | None = None
        if user is not None:
            token = base64.b64encode(f"\0{user}\0{password or ''}".encode()).decode()
            self.auth = _reply(*self.smtp.docmd("AUTH", f"PLAIN {token}"))

    @property
    def authenticated(self) -> bool:
        return self.auth is not None and self.auth[0] == 235

    def send(self, sender: str, recipients: Iterable[str], message: bytes | str | None = None) -> SendResult:
        rcpts = list(recipients)
        if self.auth is not None and not self.authenticated:
            return SendResult(False, *self.auth, stage="auth")
        if message is None:
            message = make_message(sender, rcpts)
        try:
            code, text = _reply(*self.smtp.mail(sender))
            if code != 250:
                self.smtp.rset()
                return SendResult(False, code, text, "mail")
            refused: dict[str, tuple[int, str]] = {}
            for rcpt in rcpts:
                rc, rt = _reply(*self.smtp.rcpt(rcpt))
                if rc not in (250, 251):
                    refused[rcpt] = (rc, rt)
            if len(refused) == len(rcpts):
                self.smtp.rset()
                last = refused[rcpts[-1]] if rcpts else (0, "no recipients")
                return SendResult(False, *last, stage="rcpt", refused=refused)
            try:
                code, text = _reply(*self.smtp.data(message))
            except smtplib.SMTPDataError as e:  # DATA command itself refused (smtpd_data_restrictions)
                self.smtp.rset()
                return SendResult(False, *_reply(e.smtp_code, e.smtp_error), stage="data", refused=refused)
        except smtplib.SMTPServerDisconnected as e:
            return SendResult(False, 0, f"disconnected: {e}", "connect")
        m = re.search(r"queued as (\S+)", text)
        return SendResult(
            200 <= code < 300, code, text, "end-of-data", queue_id=m.group(1) if m else None, refused=refused
        )

    def close(self) -> None:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            self.smtp.quit()
        self.smtp.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class QueuedMessage:
    """One entry of ``postqueue -j``."""

    queue_name: str  # maildrop, incoming, active, deferred, hold
    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    delay_reasons: tuple[str, ...]
    raw: dict[str, Any]


# --------------------------------------------------------------------------
# the rig

_MASTER_CF_COMMON = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

PortName = Literal["submission", "plain"]


class PostfixRig:
    """A private Postfix + Dovecot-auth + SMTP sink, all on 127.0.0.1.

    Args:
        policy: policy service in Postfix notation, e.g. ``inet:127.0.0.1:10040``
            or ``unix:/abs/path.sock`` (the socket must be usable by the
            ``postfix`` user). None: no policy check (unless ``restriction``).
        restriction: the whole restriction list for ``stage``, replacing the
            default ``check_policy_service <policy>``; e.g.
            ``check_policy_service { inet:127.0.0.1:9, default_action=DUNNO }``.
        stage: the main.cf restriction parameter that gets it, e.g.
            ``smtpd_data_restrictions`` or ``smtpd_recipient_restrictions``.
        plain_port_policy: also apply it on the no-AUTH listener.
        users: SASL users (name -> password); more with ``add_user``.
        main_cf: extra main.cf parameters; they override the rig's.
        base_dir: parent of the temp dir (default: the system temp dir; keep
            it short: unix socket paths are limited to 107 bytes).
        keep: keep the temp dir after stop (also env POSTFIX_RIG_KEEP=1).
    """

    def __init__(
        self,
        policy: str | None = None,
        *,
        restriction: str | None = None,
        stage: str = "smtpd_end_of_data_restrictions",
        plain_port_policy: bool = True,
        users: Mapping[str, str] | None = None,
        main_cf: Mapping[str, str] | None = None,
        base_dir: str | Path | None = None,
        keep: bool = False,
    ) -> None:
        if restriction is None:
            restriction = f"check_policy_service {policy}" if policy else ""
        self.restriction = restriction
        self.stage = stage
        self.plain_port_policy = plain_port_policy
        self.users: dict[str, str] = {}
        self.extra_main_cf = dict(main_cf or {})
        self._base_dir = base_dir
        self.keep = keep or os.environ.get("POSTFIX_RIG_KEEP", "") not in ("", "0")
        for name, password in (users or {}).items():
            self._check_user(name, password)
            self.users[name] = password

        self.dir = Path()
        self.submission_port = 0
        self.plain_port = 0
        self._loop: BackgroundLoop | None = None
        self.sink: SmtpSink | None = None
        self._dovecot: subprocess.Popen[bytes] | None = None
        self._master: subprocess.Popen[bytes] | None = None
        self._pgids: list[int] = []  # process groups of Postfix's master and Dovecot
        self._watchdog: _Watchdog | None = None
        self._started = False

    # paths ---------------------------------------------------------------
    @property
    def config_dir(self) -> Path:
        return self.dir / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.dir / "spool"

    @property
    def maillog(self) -> Path:
        return self.dir / "maillog"

    @property
    def auth_socket(self) -> Path:
        return self.dir / "dovecot" / "auth-postfix"

    @property
    def users_dir(self) -> Path:
        return self.dir / "dovecot" / "users"

    # lifecycle -----------------------------------------------------------
    def start(self) -> Self:
        if self._started:
            return self
        self._started = True
        _LIVE.add(self)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pfrig-", dir=self._base_dir))
        # Postfix and Dovecot drop to their own users: they must traverse the dir.
        self.dir.chmod(0o755)
        for sub in ("etc", "spool", "data", "dovecot"):
            (self.dir / sub).mkdir(mode=0o755)
        shutil.chown(self.dir / "data", user="postfix")

        self._watchdog = _Watchdog()
        self._loop = BackgroundLoop()
        self.sink = SmtpSink(self._loop)
        self.sink.start()
        self.submission_port, self.plain_port = free_port(), free_port()
        while self.plain_port == self.submission_port:
            self.plain_port = free_port()

        self.users_dir.mkdir()
        for name in self.users:
            self._write_user(name)
        self._start_dovecot()
        self._write_postfix_config()
        self._start_postfix()

    def _start_postfix(self) -> None:
        # `postfix check` creates the queue tree with the right owners/modes.
        check = subprocess.run(
            [_bin("postfix"), "-c", str(self.config_dir), "check"],
            check=False,
            capture_output=True,
            timeout=60,
        )
        if check.returncode != 0:
            raise RigError(f"postfix check failed:\n{self._diagnose()}{self.log_text()}")
        # Then the master itself, as our child instead of `postfix start`'s daemon:
        # without -w it stays in the foreground, so we hold its pid and reap it
        # (no daemon left behind by a crashed test run: see _Watchdog). Its own
        # session: SIGTERM to the master signals its whole process group.
        self._master = subprocess.Popen(
            [_master_bin(), "-c", str(self.config_dir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._watch(self._master.pid)
        deadline = time.monotonic() + 15
        while not _listening({self.submission_port, self.plain_port}):
            if self._master.poll() is not None or time.monotonic() > deadline:
                raise RigError(f"postfix master did not start:\n{self._diagnose()}{self.log_text()}")
            time.sleep(0.02)

    def _watch(self, pgid: int) -> None:
        self._pgids.append(pgid)
        if self._watchdog is not None:
            self._watchdog.watch(pgid)

    def _diagnose(self) -> str:
        # Postfix commands print errors only to a tty (else to the log, which a
        # bad maillog_file breaks): rerun the check under script(1) to see them.
        script = shutil.which("script")
        if script is None:
            return ""
        cmd = f"{_bin('postfix')} -c {self.config_dir} check"
        proc = subprocess.run(
            [script, "-qec", cmd, "/dev/null"], check=False, capture_output=True, text=True, timeout=60
        )
        return proc.stdout

    def _start_dovecot(self) -> None:
        ddir = self.dir / "dovecot"
        conf = ddir / "dovecot.conf"
        conf.write_text(
            f"""\
# Auth only: no mail protocols; Postfix talks to the auth socket below.
base_dir = {ddir}/run
state_dir = {ddir}/state
log_path = {ddir}/dovecot.log
protocols = none
listen = 127.0.0.1
hostname = {HOSTNAME}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
# One passwd-file per user: Dovecot re-checks a file at most once a second,
# but a new user's file is read on first use, so add_user() is live at once.
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.users_dir}/%u
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}}
service auth {{
  unix_listener {self.auth_socket} {{
    mode = 0666
  }}
}}
# No auth penalty: it delays every login from 127.0.0.1 after one failure.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""
        )
        out = (ddir / "dovecot.out").open("wb")
        self._dovecot = subprocess.Popen(
            [_bin("dovecot"), "-F", "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() can kill it and its children
        )
        out.close()
        self._watch(self._dovecot.pid)
        deadline = time.monotonic() + 15
        while not self.auth_socket.exists():
            if self._dovecot.poll() is not None or time.monotonic() > deadline:
                log = ddir / "dovecot.log"
                raise RigError(
                    "dovecot did not start:\n"
                    + (ddir / "dovecot.out").read_text(errors="replace")
                    + (log.read_text(errors="replace") if log.exists() else "")
                )
            time.sleep(0.02)

    def main_cf(self) -> dict[str, str]:
        """The main.cf parameters this rig uses (after ``main_cf`` overrides)."""
        params = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.dir / "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            # Logging to a file via postlogd (master.cf) instead of syslog;
            # Postfix refuses maillog_file paths outside maillog_file_prefixes.
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.dir),
            "myhostname": HOSTNAME,
            "mydomain": "example.test",
            "myorigin": "$myhostname",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            # Nothing is local: every domain is relayed to the sink.
            "mydestination": "",
            "local_recipient_maps": "",
            "relay_domains": "",
            "alias_maps": "",
            "alias_database": "",
            "relayhost": f"[127.0.0.1]:{self.sink.port if self.sink else 0}",
            "notify_classes": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            # No DNS at all (and no traffic off loopback).
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "lmtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            # Fast: retry deferred mail within a second or two, no tarpitting.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtpd_error_sleep_time": "0",
            "in_flow_delay": "0",
            "smtp_connect_timeout": "5s",
            "smtpd_tls_security_level": "none",
            "smtp_tls_security_level": "none",
            # SASL via Dovecot; enabled per listener in master.cf. Plaintext
            # AUTH is fine: loopback only, no TLS.
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": str(self.auth_socket),
            "smtpd_sasl_security_options": "noanonymous",
            "smtpd_tls_auth_only": "no",
            "smtpd_relay_restrictions": "permit_sasl_authenticated, reject",
            "smtpd_end_of_data_restrictions": "",
            self.stage: self.restriction,
        }
        params.update(self.extra_main_cf)
        return params

    def _write_postfix_config(self) -> None:
        main = "".join(f"{k} = {v}\n" for k, v in self.main_cf().items())
        plain_extra = "" if self.plain_port_policy else f"\n  -o {self.stage}="
        master = (
            f"""\
# submission-like: AUTH required to relay
127.0.0.1:{self.submission_port} inet n - n - - smtpd
  -o syslog_name=postfix/submission
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject
# no AUTH offered; relays for mynetworks (127.0.0.0/8)
127.0.0.1:{self.plain_port} inet n - n - - smtpd
  -o syslog_name=postfix/plain
  -o smtpd_sasl_auth_enable=no
  -o smtpd_relay_restrictions=permit_mynetworks,reject{plain_extra}
# everything else as in Debian's master.cf, but never chrooted
"""
            + _MASTER_CF_COMMON
        )
        for name, text in (("main.cf", main), ("master.cf", master)):
            path = self.config_dir / name
            path.write_text(text)
            # Postfix waits ("pausing to let ... cool down") while a config file's
            # mtime is under ~1s old; backdate it to start instantly.
            past = time.time() - 10
            os.utime(path, (past, past))

    def stop(self) -> None:
        """Stop Postfix, Dovecot and the sink; remove the temp dir (unless keep)."""
        if not self._started:
            return
        self._started = False
        _LIVE.discard(self)
        if self._master is not None:
            # What `postfix stop` does, minus its 1s polling sleeps.
            self._master.terminate()
            try:
                self._master.wait(10)
            except subprocess.TimeoutExpired:
                self._master.kill()
                self._master.wait(5)
            if not _wait_group_gone(self._master.pid, 10):  # children exit on their own SIGTERM
                _kill_group(self._master.pid)
            self._master = None
        if self._dovecot is not None:
            # Dovecot only does auth here and keeps no state; SIGTERM would cost
            # ~1s (it waits for its log process), so SIGKILL its process group.
            _kill_group(self._dovecot.pid)
            self._dovecot.wait(5)
            self._dovecot = None
        if self._watchdog is not None:
            self._watchdog.release()
            self._watchdog = None
        if self.sink is not None:
            self.sink.stop()
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        if not self.keep and self.dir.is_absolute():
            shutil.rmtree(self.dir, ignore_errors=True)

    def processes(self) -> list[int]:
        """Live pids of this rig's Postfix and Dovecot (empty after ``stop()``)."""
        return [pid for pgid in self._pgids for pid in _group_members(pgid)]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # users -----------------------------------------------------------------
    @staticmethod
    def _check_user(name: str, password: str) -> None:
        if not name or name.startswith(".") or any(c in name + password for c in ":/\n\0"):
            raise ValueError(f"unusable SASL user/password for a passwd-file: {name!r}")

    def add_user(self, name: str, password: str) -> None:
        """Add a SASL user, live while running. Changing an existing user's
        password waits ~1s (Dovecot re-checks a passwd-file at most once a second)."""
        self._check_user(name, password)
        changed = self.users.get(name, password) != password
        self.users[name] = password
        if self._started:
            self._write_user(name)
            if changed:
                time.sleep(1.1)

    def _write_user(self, name: str) -> None:
        path = self.users_dir / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(f"{name}:{{PLAIN}}{self.users[name]}\n")
        tmp.replace(path)  # atomic: Dovecot never reads a half-written file

    # sending ---------------------------------------------------------------
    def port(self, port: PortName | int) -> int:
        if isinstance(port, int):
            return port
        return {"submission": self.submission_port, "plain": self.plain_port}[port]

    def connect(
        self, user: str | None = None, password: str | None = None, port: PortName | int = "submission"
    ) -> RigClient:
        """An SMTP session (AUTH PLAIN first if ``user`` is given) for several messages."""
        return RigClient(self.port(port), user, password)

    def send(
        self,
        user: str | None,
        password: str | None,
        sender: str,
        recipients: Iterable[str],
        *,
        port: PortName | int = "submission",
        message: bytes | str | None = None,
    ) -> SendResult:
        """Send one message in its own session; ``user=None`` skips AUTH."""
        try:
            client = self.connect(user, password, port)
        except (smtplib.SMTPException, OSError) as e:
            return SendResult(False, 0, str(e), "connect")
        with client:
            return client.send(sender, recipients, message)

    # queue -----------------------------------------------------------------
    def _postfix_cmd(self, name: str, *args: str) -> str:
        proc = subprocess.run(
            [_bin(name), "-c", str(self.config_dir), *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise RigError(f"{name} {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    def queue(self) -> list[QueuedMessage]:
        """The queue as ``postqueue -j`` sees it (maildrop/incoming/active/deferred/hold)."""
        out = []
        for line in self._postfix_cmd("postqueue", "-j").splitlines():
            raw = json.loads(line)
            rcpts = raw.get("recipients", [])
            out.append(
                QueuedMessage(
                    queue_name=raw["queue_name"],
                    queue_id=raw["queue_id"],
                    sender=raw.get("sender", ""),
                    recipients=tuple(r["address"] for r in rcpts),
                    delay_reasons=tuple(r.get("delay_reason", "") for r in rcpts),
                    raw=raw,
                )
            )
        return out

    def held(self) -> list[QueuedMessage]:
        return [m for m in self.queue() if m.queue_name == "hold"]

    def wait_queue(
        self, predicate: Callable[[list[QueuedMessage]], bool], timeout: float = 10
    ) -> list[QueuedMessage]:
        """Poll ``queue()`` until ``predicate(queue)`` holds; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while not predicate(q := self.queue()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue condition not met in {timeout}s; queue: {q}")
            time.sleep(0.1)
        return q

    def release_held(self, queue_id: str = "ALL") -> None:
        """``postsuper -H``: move held mail to the deferred queue (then ``flush()``)."""
        self._postfix_cmd("postsuper", "-H", queue_id)

    def flush(self) -> None:
        """``postqueue -f``: attempt delivery of all queued mail now."""
        self._postfix_cmd("postqueue", "-f")

    # sink / log --------------------------------------------------------------
    @property
    def delivered(self) -> list[DeliveredMessage]:
        return self.sink.messages if self.sink else []

    def wait_delivered(self, n: int, timeout: float = 15) -> list[DeliveredMessage]:
        """Block until the sink has at least ``n`` messages (SMTP transactions); returns them all."""
        if self.sink is None:
            raise RigError("rig not started")
        try:
            return self.sink.wait(n, timeout)
        except TimeoutError as e:
            raise TimeoutError(
                f"{e}\nqueue: {self.queue()}\n--- maillog tail ---\n{self.log_tail()}"
            ) from None

    def log_text(self) -> str:
        """Postfix's log (postlogd writes it asynchronously: see ``wait_log``)."""
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_log(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        """Wait until the log matches regex ``pattern``; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while (m := re.search(pattern, self.log_text())) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pattern!r} not in maillog after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)
        return m


# Rigs still running when the interpreter exits are stopped (a killed
# interpreter is _Watchdog's job).
_LIVE: set[PostfixRig] = set()


@atexit.register
def _stop_all() -> None:
    for rig in list(_LIVE):
        with contextlib.suppress(Exception):
            rig.stop()
