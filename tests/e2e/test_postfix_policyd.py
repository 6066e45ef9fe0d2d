"""policyd under a real Postfix: SMTP AUTH through Postfix, the real `policyd serve`.

Every outcome is read from Postfix itself: what reached the sink, what sits in the hold
queue (``postqueue -j``), the reply the SMTP client got, Postfix's log; and from
policyd: its log and its events table.  Quota 10, so reject from 20.

The Postfix and policyd configuration used here comes from docs/postfix.md: the tests
read its fenced blocks (```main.cf NAME, ```policyd.cfg NAME, ```sh NAME, ```log NAME)
and run them, so the documentation is what was tested.
"""

from __future__ import annotations

import grp
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

try:
    from tests.e2e.policyd_process import PolicydError, PolicydProcess, RecordedEvent
    from tests.e2e.postfix_rig import (
        BackgroundLoop,
        PostfixRig,
        SendResult,
        SmtpSink,
        free_port,
        make_message,
    )
except ImportError:  # tests/e2e is not a package: pytest put tests/e2e on sys.path
    from policyd_process import PolicydError, PolicydProcess, RecordedEvent  # type: ignore[no-redef,import-not-found]
    from postfix_rig import (  # type: ignore[no-redef,import-not-found]
        BackgroundLoop,
        PostfixRig,
        SendResult,
        SmtpSink,
        free_port,
        make_message,
    )

pytestmark = pytest.mark.postfix

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "postfix.md"
QUOTA = 10  # defaultquota; rejectquota is then 20
USERS = {
    name: f"{name}-pw"
    for name in ("alice", "bob", "carol", "dave", "erin", "u1", "u2", "u3", "u4", "mallory@example.org")
}
RigFactory = Callable[..., PostfixRig]
PolicydFactory = Callable[..., PolicydProcess]

# The port and paths the documentation uses, replaced by the test's own.
DOC_PORT = "9093"
DOC_QUEUE_DIR = "/var/spool/postfix"

# Every fenced block of docs/postfix.md ("KIND NAME"), and so every block a test below runs.
DOC_BLOCKS = {
    "main.cf end-of-data",
    "policyd.cfg tcp",
    "log postfix-down",
    "main.cf defaults",
    "main.cf data-stage",
    "sh socket-dir",
    "policyd.cfg socket",
    "main.cf socket",
    "sh inspect-held",
    "sh release-held",
    "sh delete-held",
    "log policyd",
    "log postfix",
    "text top",
}


# ---------------------------------------------------------------------------------------
# docs/postfix.md


def doc_blocks() -> dict[str, str]:
    """The text of each fenced block of docs/postfix.md, by its info string "KIND NAME"."""
    blocks: dict[str, str] = {}
    for match in re.finditer(r"^```([^\n]*)\n(.*?)^```[ \t]*$", DOC.read_text(), re.M | re.S):
        info = " ".join(match.group(1).split())
        assert len(info.split()) == 2, f"docs/postfix.md: a fenced block without 'KIND NAME': ```{info}"
        assert info not in blocks, f"docs/postfix.md: two blocks ```{info}"
        blocks[info] = match.group(2)
    return blocks


def doc_block(name: str, kind: str) -> str:
    return doc_blocks()[f"{kind} {name}"]


def doc_main_cf(name: str, port: int | None = None) -> dict[str, str]:
    """A ```main.cf block as parameters (continuation lines joined), port substituted."""
    text = doc_block(name, "main.cf")
    if port is not None:
        text = text.replace(f"127.0.0.1:{DOC_PORT}", f"127.0.0.1:{port}")
    params: dict[str, str] = {}
    last = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():
            assert last is not None, f"main.cf block {name}: continuation line first"
            params[last] = f"{params[last]} {line.strip()}".strip()
            continue
        key, sep, value = line.partition("=")
        assert sep, f"main.cf block {name}: not 'name = value': {line!r}"
        last = key.strip()
        params[last] = value.strip()
    return params


def doc_policyd_cfg(name: str, port: int | None = None, queue_dir: Path | None = None) -> dict[str, str]:
    """A ```policyd.cfg block as key -> value, port and queue directory substituted."""
    settings = {}
    for line in doc_block(name, "policyd.cfg").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if port is not None and key.strip() == "port":
            assert value == DOC_PORT
            value = str(port)
        if queue_dir is not None:
            value = value.replace(DOC_QUEUE_DIR, str(queue_dir))
        settings[key.strip()] = value
    return settings


def doc_commands(name: str) -> list[list[str]]:
    """The commands of a ```sh block, one per line, comments dropped."""
    commands = []
    for raw in doc_block(name, "sh").splitlines():
        line = re.sub(r"(^|\s)#.*", "", raw).strip()
        if line:
            commands.append(shlex.split(line))
    return commands


def run_doc_commands(name: str, rig: PostfixRig, queue_id: str = "") -> list[str]:
    """Run a ```sh block against the rig's Postfix (MAIL_CONFIG); QUEUE_ID substituted."""
    env = dict(os.environ, MAIL_CONFIG=str(rig.config_dir))
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), "/usr/sbin", "/sbin"])
    outputs = []
    for command in doc_commands(name):
        argv = [arg.replace("QUEUE_ID", queue_id) for arg in command]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"{' '.join(argv)}: {proc.returncode}\n{proc.stdout}{proc.stderr}"
        outputs.append(proc.stdout + proc.stderr)
    return outputs


def _policyd_messages(lines: Sequence[str]) -> list[str]:
    # syslog "... policyd[123]: msg" (the doc) or --foreground "... policyd[123] INFO: msg"
    return [re.sub(r"^.*?\bpolicyd\[\d+\](?: [A-Z]+)?: ", "", line) for line in lines]


def _postfix_messages(lines: Sequence[str], port: int | None = None) -> list[str]:
    out = []
    for raw in lines:
        line = re.sub(r"^.*? (postfix/[\w/]+)\[\d+\]: ", r"\1: ", raw)
        line = re.sub(r"^(postfix/[\w/]+: )[0-9A-F]{6,}: ", r"\1QUEUE_ID: ", line)
        if port is not None:
            line = line.replace(f"127.0.0.1:{port}", f"127.0.0.1:{DOC_PORT}")
        out.append(line)
    return out


def assert_in_order(expected: Sequence[str], actual: Sequence[str], what: str) -> None:
    """Each expected line appears in actual, in this order (other lines may come between)."""
    rest = iter(actual)
    for line in expected:
        assert any(line == candidate for candidate in rest), (
            f"{what}: line of docs/postfix.md not logged (in this order):\n  {line}\n"
            "actual:\n  " + "\n  ".join(actual)
        )


# ---------------------------------------------------------------------------------------
# helpers


def rcpts(n: int, tag: str = "r") -> list[str]:
    return [f"{tag}{i}@example.net" for i in range(n)]


def send(rig: PostfixRig, user: str, n: int, *, tag: str = "r", subject: str = "") -> SendResult:
    sender = f"{user}@example.org"
    to = rcpts(n, tag)
    message = make_message(sender, to, subject=subject) if subject else None
    return rig.send(user, USERS[user], sender, to, message=message)


def policy_connections(port: int) -> set[int]:
    """Client-side ports of ESTABLISHED TCP connections to 127.0.0.1:port (from /proc)."""
    ports = set()
    target = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state = line.split()[1:4]
        if remote == target and state == "01":
            ports.add(int(local.split(":")[1], 16))
    return ports


def counted(events: Sequence[RecordedEvent]) -> list[tuple[str, int, str]]:
    return [(e.sasl_username, e.recipient_count, e.action) for e in events]


def smtpd_warnings(rig: PostfixRig, since: int = 0) -> list[str]:
    return [line for line in rig.log_text()[since:].splitlines() if "smtpd[" in line and "warning:" in line]


def assert_clean_policyd_log(policyd: PolicydProcess) -> None:
    bad = policyd.log_lines(r" (WARNING|ERROR|CRITICAL): |Traceback|connection lost|closing the connection")
    assert bad == [], "policyd logged problems:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
def policyd(tmp_path: Path) -> Iterator[PolicydFactory]:
    """Factory: ``policyd(**PolicydProcess kwargs)`` -> a started daemon, stopped after the test."""
    made: list[PolicydProcess] = []

    def make(**kwargs: object) -> PolicydProcess:
        kwargs.setdefault("quota", QUOTA)
        daemon = PolicydProcess(tmp_path / f"policyd{len(made)}", **kwargs)  # type: ignore[arg-type]
        made.append(daemon)
        return daemon.start()

    yield make
    problems = []
    for daemon in made:  # stop them all first, then complain
        pid = daemon.pid
        try:
            status = daemon.stop()
        except PolicydError as error:  # ignored SIGTERM: it was killed
            problems.append(str(error))
        else:
            if status not in (None, 0):
                problems.append(f"policyd exited with status {status}")
        if pid is not None and os.path.exists(f"/proc/{pid}"):
            problems.append(f"policyd pid {pid} still running")
        print(f"--- policyd log ({daemon.log_path}) ---\n{daemon.log_text()}")  # shown if the test failed
    assert problems == []


def start_with_doc_config(
    policyd: PolicydFactory, postfix_rig: RigFactory, *main_cf_blocks: str, **rig_kwargs: object
) -> tuple[PolicydProcess, PostfixRig]:
    """policyd with the doc's policyd.cfg (tcp), Postfix with the doc's main.cf blocks."""
    port = free_port()
    daemon = policyd(port=port, extra=doc_policyd_cfg("tcp", port=port))
    main_cf: dict[str, str] = {}
    for name in main_cf_blocks:
        main_cf.update(doc_main_cf(name, port))
    rig = postfix_rig(users=USERS, main_cf=main_cf, **rig_kwargs)
    return daemon, rig


# ---------------------------------------------------------------------------------------
# the quota through Postfix


def test_below_quota_delivered_then_held_then_rejected_other_user_unaffected(
    policyd: PolicydFactory, postfix_rig: RigFactory
) -> None:
    daemon, rig = start_with_doc_config(policyd, postfix_rig, "end-of-data")
    # alice and bob in two SMTP sessions open at the same time, their messages interleaved.
    with (
        rig.connect("alice", USERS["alice"]) as alice,
        rig.connect("bob", USERS["bob"]) as bob,
    ):
        assert alice.authenticated and bob.authenticated
        a1 = alice.send("alice@example.org", rcpts(8, "a1-"))  # 8: below the quota
        b1 = bob.send("bob@example.org", rcpts(5, "b1-"))  # bob 5
        a2 = alice.send("alice@example.org", rcpts(2, "a2-"))  # 10: the quota: held
        b2 = bob.send("bob@example.org", rcpts(4, "b2-"))  # bob 9: still below
        a3 = alice.send("alice@example.org", rcpts(3, "a3-"))  # 13: held
        a4 = alice.send("alice@example.org", rcpts(7, "a4-"))  # 20: the reject threshold

    for result in (a1, b1, a2, b2, a3):
        assert result.accepted, result  # HOLD is accepted too: 250, then the hold queue
    assert (a4.accepted, a4.stage, a4.code) == (False, "end-of-data", 554), a4
    assert a4.text == "5.7.1 <END-OF-MESSAGE>: End-of-data rejected: max quota exceeded"

    # Delivered: alice's first message and both of bob's, nothing else.
    rig.wait_delivered(3)
    held = rig.held()
    assert {m.queue_id for m in held} == {a2.queue_id, a3.queue_id}
    assert sorted(len(m.recipients) for m in held) == [2, 3]
    assert {m.queue_name for m in rig.queue()} == {"hold"}  # the rejected one is not queued
    delivered = sorted(rig.sink.recipients() if rig.sink else [])
    assert delivered == sorted(rcpts(8, "a1-") + rcpts(5, "b1-") + rcpts(4, "b2-"))

    # Postfix's log: the hold with policyd's text, the reject with its 5xx.
    for result in (a2, a3):
        rig.wait_log(
            rf"{result.queue_id}: hold: END-OF-MESSAGE from unknown\[127\.0\.0\.1\]: "
            r"<END-OF-MESSAGE>: End-of-data quota exceeded; from=<alice@example\.org>"
        )
    rig.wait_log(
        r"reject: END-OF-MESSAGE from unknown\[127\.0\.0\.1\]: 554 5\.7\.1 <END-OF-MESSAGE>: "
        r"End-of-data rejected: max quota exceeded; from=<alice@example\.org>"
    )

    # policyd's records and log.
    assert counted(daemon.events()) == [
        ("alice", 8, "DUNNO"),
        ("bob", 5, "DUNNO"),
        ("alice", 2, "HOLD"),
        ("bob", 4, "DUNNO"),
        ("alice", 3, "HOLD"),
        ("alice", 7, "REJECT"),
    ]
    assert daemon.log_lines("overquota") and all("bob" not in line for line in daemon.log_lines("overquota"))
    assert daemon.top_rows() == {
        "alice": {"recipients": 20, "messages": 4, "held": 2, "rejected": 1},
        "bob": {"recipients": 9, "messages": 2, "held": 0, "rejected": 0},
    }
    assert smtpd_warnings(rig) == []
    assert_clean_policyd_log(daemon)

    # The documentation's example is this run.
    assert_in_order(
        _policyd_messages(doc_block("policyd", "log").splitlines()),
        _policyd_messages(daemon.log_text().splitlines()),
        "policyd's log",
    )
    assert_in_order(
        _postfix_messages(doc_block("postfix", "log").splitlines()),
        _postfix_messages(rig.log_text().splitlines()),
        "Postfix's log",
    )
    when = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$")
    assert [when.sub("WHEN", line) for line in doc_block("top", "text").splitlines()] == [
        when.sub("WHEN", line) for line in daemon.top().splitlines()
    ]


@pytest.mark.parametrize(
    ("block", "state", "reject_stage"),
    [("end-of-data", "END-OF-MESSAGE", "end-of-data"), ("data-stage", "DATA", "data")],
    ids=["end-of-data", "data-stage"],
)
def test_every_recipient_of_a_message_counts(
    policyd: PolicydFactory, postfix_rig: RigFactory, block: str, state: str, reject_stage: str
) -> None:
    daemon, rig = start_with_doc_config(policyd, postfix_rig, block)

    nine = send(rig, "carol", 9)  # one message, 9 recipients: below the quota
    assert nine.accepted, nine
    (msg,) = rig.wait_delivered(1)
    assert sorted(msg.recipients) == sorted(rcpts(9))
    one_more = send(rig, "carol", 1)  # 9 + 1 = the quota: held, so all 9 were counted
    twelve = send(rig, "dave", 12)  # a first message over the quota on its own: held
    many = send(rig, "erin", 25)  # over the reject threshold on its own
    assert one_more.accepted and twelve.accepted, (one_more, twelve)
    assert (many.accepted, many.stage, many.code) == (False, reject_stage, 554), many
    assert "max quota exceeded" in many.text

    held = {m.queue_id: m for m in rig.held()}
    assert set(held) == {one_more.queue_id, twelve.queue_id}
    assert len(held[str(twelve.queue_id)].recipients) == 12
    for result in (one_more, twelve):
        rig.wait_log(rf"{result.queue_id}: hold: {state} from .*quota exceeded")
    rig.wait_log(rf"reject: {state} from .*: 554 5\.7\.1 .*max quota exceeded")
    assert len(rig.delivered) == 1

    assert counted(daemon.events()) == [
        ("carol", 9, "DUNNO"),
        ("carol", 1, "HOLD"),
        ("dave", 12, "HOLD"),
        ("erin", 25, "REJECT"),
    ]
    daemon.wait_log(r"Updating db: carol/carol@example\.org/127\.0\.0\.1/9/9\n")
    daemon.wait_log(r"DEFERRING overquota \(10>10\) for user carol ")
    daemon.wait_log(r"DEFERRING overquota \(12>10\) for user dave ")
    daemon.wait_log(r"REJECTING overquota \(25>2x10\) for user erin ")
    assert_clean_policyd_log(daemon)


def test_unauthenticated_mail_is_neither_limited_nor_recorded(
    policyd: PolicydFactory, postfix_rig: RigFactory
) -> None:
    daemon, rig = start_with_doc_config(policyd, postfix_rig, "end-of-data")
    # 3 x 15 recipients through the port without AUTH: more than the reject threshold.
    for i in range(3):
        result = rig.send(None, None, "app@example.org", rcpts(15, f"m{i}-"), port="plain")
        assert result.accepted, result
    # Postfix did ask policyd (its smtpd holds a connection to it) ...
    assert policy_connections(daemon.port)
    rig.wait_delivered(3)
    assert rig.held() == []
    # ... which let everything through and recorded nothing.
    assert daemon.events() == []
    assert daemon.top().strip() == "no messages recorded in the last 24h"

    # An authenticated message through the same Postfix is counted.
    assert send(rig, "alice", 1).accepted
    rig.wait_delivered(4)
    assert counted(daemon.events()) == [("alice", 1, "DUNNO")]
    assert list(daemon.top_rows()) == ["alice"]
    assert smtpd_warnings(rig) == []
    assert_clean_policyd_log(daemon)


def test_released_held_mail_is_delivered_and_still_counts(
    policyd: PolicydFactory, postfix_rig: RigFactory
) -> None:
    daemon, rig = start_with_doc_config(policyd, postfix_rig, "end-of-data")
    assert send(rig, "alice", 9, tag="first").accepted  # 9
    rig.wait_delivered(1)
    held_a = send(rig, "alice", 1, tag="a", subject="held A")  # 10: held
    held_b = send(rig, "alice", 2, tag="b", subject="held B")  # 12: held
    held_c = send(rig, "alice", 1, tag="c", subject="held C")  # 13: held
    a, b, c = (r.queue_id or "" for r in (held_a, held_b, held_c))
    assert {m.queue_id for m in rig.held()} == {a, b, c}

    # The admin looks (docs/postfix.md, "inspect-held") ...
    mailq, queue_json, postcat = run_doc_commands("inspect-held", rig, queue_id=a)
    assert re.search(rf"^{a}!", mailq, re.M), mailq  # '!': on hold
    queue = {entry["queue_id"]: entry for entry in map(json.loads, queue_json.splitlines())}
    assert {queue[qid]["queue_name"] for qid in (a, b, c)} == {"hold"}
    assert "Subject: held A" in postcat

    # ... deletes C, releases A and then all the rest (B), and delivers now.
    run_doc_commands("delete-held", rig, queue_id=c)
    assert {m.queue_id for m in rig.held()} == {a, b}
    release_one, release_all, _flush = run_doc_commands("release-held", rig, queue_id=a)
    assert "Released from hold: 1 message" in release_one
    assert "Released from hold: 1 message" in release_all
    rig.wait_delivered(3)
    rig.wait_queue(lambda queue: queue == [])
    delivered = sorted(rig.sink.recipients() if rig.sink else [])
    assert delivered == sorted(rcpts(9, "first") + rcpts(1, "a") + rcpts(2, "b"))

    # Released (and deleted) mail still counts: 13 + 7 = 20 is rejected. (Had the held
    # messages been forgotten, 9 + 7 = 16 would only have been held.)
    over = send(rig, "alice", 7, tag="d")
    assert (over.accepted, over.code) == (False, 554), over
    assert "max quota exceeded" in over.text
    # The rejected message does not count: 13 + 1 = 14, held.
    again = send(rig, "alice", 1, tag="e")
    assert again.accepted
    assert [m.queue_id for m in rig.held()] == [again.queue_id]
    assert counted(daemon.events()) == [
        ("alice", 9, "DUNNO"),
        ("alice", 1, "HOLD"),
        ("alice", 2, "HOLD"),
        ("alice", 1, "HOLD"),
        ("alice", 7, "REJECT"),
        ("alice", 1, "HOLD"),
    ]
    daemon.wait_log(r"REJECTING overquota \(20>2x10\) for user alice ")
    daemon.wait_log(r"DEFERRING overquota \(14>10\) for user alice ")
    assert_clean_policyd_log(daemon)


def test_held_release_delete_touch_only_the_users_own_mail(
    policyd: PolicydFactory, postfix_rig: RigFactory
) -> None:
    """policyd held / release / delete: the user's held mail, from the queue ids policyd
    recorded and postqueue confirms; anyone else's is refused, and nothing is done."""
    daemon, rig = start_with_doc_config(policyd, postfix_rig, "end-of-data")
    assert send(rig, "alice", 10, tag="first").accepted  # 10: held
    alice_ids = [send(rig, "alice", 1, tag=f"a{n}").queue_id or "" for n in range(3)]  # 11..13: held
    assert send(rig, "bob", 10, tag="bob").accepted  # bob's, held too
    rig.wait_queue(lambda queue: len([m for m in queue if m.queue_name == "hold"]) == 5)
    first_id, bob_id = (
        next(m.queue_id for m in rig.held() if m.sender == f"{user}@example.org" and len(m.recipients) == 10)
        for user in ("alice", "bob")
    )

    def policyd_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "policyd",
                *args,
                "-c",
                str(daemon.config_path),
                "--postfix-config",
                str(rig.config_dir),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed = policyd_cli("held", "alice", "--json")
    assert listed.returncode == 0, listed.stderr
    entries = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {entry["queue_id"] for entry in entries} == {first_id, *alice_ids}
    assert sorted(entry["recipients"] for entry in entries) == [1, 1, 1, 10]
    assert {entry["sender"] for entry in entries} == {"alice@example.org"}
    table = policyd_cli("held", "alice")
    assert table.stdout.splitlines()[-1] == "4 held messages, 13 recipients"

    # bob's message is not alice's to touch: refused, and nothing is done at all.
    refused = policyd_cli("delete", "alice", alice_ids[0], bob_id)
    assert refused.returncode == 2
    assert f"not held mail of alice, nothing done: {bob_id}" in refused.stderr
    assert len(rig.held()) == 5

    dry = policyd_cli("delete", "alice", "--all", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.startswith("would delete 4 held messages of alice: ")
    assert len(rig.held()) == 5

    deleted = policyd_cli("delete", "alice", alice_ids[0])
    assert deleted.returncode == 0, deleted.stderr
    assert {m.queue_id for m in rig.held()} == {first_id, bob_id, *alice_ids[1:]}
    released = policyd_cli("release", "alice", "--all")
    assert released.returncode == 0, released.stderr
    assert {m.queue_id for m in rig.held()} == {bob_id}
    rig.flush()
    rig.wait_delivered(2)  # the 10 and the last two: the released ones
    assert policyd_cli("held", "alice").stdout == "no held mail of alice\n"
    assert {m.queue_id for m in rig.held()} == {bob_id}


RUNBOOK = ROOT / "docs" / "phished-account.md"
RUNBOOK_USER = "mallory@example.org"


def runbook_blocks() -> dict[str, str]:
    blocks = {}
    for match in re.finditer(r"^```([^\n]*)\n(.*?)^```[ \t]*$", RUNBOOK.read_text(), re.M | re.S):
        blocks[" ".join(match.group(1).split())] = match.group(2)
    return blocks


def run_runbook(step: str, daemon: PolicydProcess, rig: PostfixRig) -> list[str]:
    """The commands of the runbook's ```sh STEP block, as written, against this daemon
    and this Postfix (POLICYD_CONFIG, POLICYD_POSTFIX_CONFIG); their outputs."""
    env = dict(os.environ, POLICYD_CONFIG=str(daemon.config_path), POLICYD_POSTFIX_CONFIG=str(rig.config_dir))
    outputs = []
    for raw in runbook_blocks()[f"sh {step}"].splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        argv = shlex.split(line)
        assert argv[0] == "policyd", line
        proc = subprocess.run(
            [sys.executable, "-m", "policyd", *argv[1:]], env=env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, f"{line}: {proc.returncode}\n{proc.stdout}{proc.stderr}"
        outputs.append(proc.stdout)
    return outputs


def test_the_phished_account_runbook(policyd: PolicydFactory, postfix_rig: RigFactory) -> None:
    """docs/phished-account.md, every command, in order, against a real Postfix."""
    loop = BackgroundLoop()
    alerts = SmtpSink(loop)
    alerts.start()
    try:
        port = free_port()
        config = doc_policyd_cfg("tcp", port=port)
        for line in runbook_blocks()["policyd.cfg alerts"].splitlines():
            if "=" in line and not line.startswith("#"):
                key, _, value = line.partition("=")
                config[key.strip()] = value.strip()
        config["alert_smtp"] = f"127.0.0.1:{alerts.port}"
        daemon = policyd(port=port, extra=config)
        rig = postfix_rig(users=USERS, main_cf=doc_main_cf("end-of-data", port))

        def spam(n: int, tag: str) -> SendResult:
            return rig.send(RUNBOOK_USER, USERS[RUNBOOK_USER], RUNBOOK_USER, rcpts(n, tag))

        assert spam(9, "a").accepted  # 9: delivered
        held = [spam(2, "b"), spam(1, "c")]  # 11, 12: held
        assert all(result.accepted for result in held)
        rig.wait_queue(lambda queue: len([m for m in queue if m.queue_name == "hold"]) == 2)
        assert send(rig, "alice", 1, tag="x").accepted  # someone else's mail, delivered

        # 1. The alert arrives: one mail, naming the user and the held messages.
        deadline = time.monotonic() + 20
        while not alerts.messages:
            assert time.monotonic() < deadline, "no alert"
            time.sleep(0.2)
        alert = alerts.messages[0].data.decode()
        assert f"{RUNBOOK_USER} over 10/24h (HOLD)" in alert
        assert "held so far: 2 messages:" in alert
        for queue_id in (result.queue_id or "" for result in held):
            assert queue_id in alert

        # 2. Look.
        user_view, held_list = run_runbook("look", daemon, rig)
        assert RUNBOOK_USER in user_view and "held" in user_view
        assert held_list.splitlines()[-1] == "2 held messages, 3 recipients"
        # 3. Block: rejected now, whatever the total.
        run_runbook("block", daemon, rig)
        time.sleep(1.0)  # applied within a second
        blocked = spam(1, "d")
        assert (blocked.accepted, blocked.code) == (False, 554), blocked
        # 4. The spam in hold: deleted, and no one else's mail touched.
        dry, deleted = run_runbook("delete", daemon, rig)
        assert dry.startswith(f"would delete 2 held messages of {RUNBOOK_USER}: ")
        assert deleted.splitlines()[-1] == "postsuper: Deleted: 2 messages"
        assert rig.held() == []
        # 5. Given back: reset and unlisted, the next message is delivered.
        reset, unlisted, after = run_runbook("give-back", daemon, rig)
        assert reset.startswith(f"reset {RUNBOOK_USER}: recipients before ")
        assert unlisted == f"removed 1 entries for {RUNBOOK_USER}\n"
        assert after.startswith(f"user {RUNBOOK_USER}: ok\n")
        assert "reset at " in after and ": password changed" in after
        time.sleep(1.0)
        assert spam(1, "e").accepted
        rig.wait_delivered(3)  # the 9, alice's, the one after the reset
        assert len(alerts.messages) == 1, "one incident, one alert"
    finally:
        alerts.stop()
        loop.close()


# ---------------------------------------------------------------------------------------
# policyd stopped and restarted


def test_policyd_down_with_default_action_dunno_then_restarted(
    policyd: PolicydFactory, postfix_rig: RigFactory
) -> None:
    # The documented main.cf: the check with default_action=DUNNO, and the timeouts.
    daemon, rig = start_with_doc_config(policyd, postfix_rig, "end-of-data", "defaults")
    assert send(rig, "alice", 8, tag="before").accepted
    rig.wait_delivered(1)

    assert daemon.stop() == 0
    assert daemon.log_lines(r"INFO: stopped$")
    down = send(rig, "alice", 5, tag="down")
    assert down.accepted, down  # mail flows while policyd is down ...
    rig.wait_delivered(2)
    # Postfix tried twice, then applied default_action=DUNNO.
    problem = rf"warning: problem talking to server 127\.0\.0\.1:{daemon.port}: Connection refused"
    rig.wait_log(rf"(?s){problem}.*{problem}")
    assert rig.held() == []

    daemon.start()
    log_mark = len(rig.log_text())
    after = send(rig, "alice", 1, tag="after")  # 8 + 1: the 8 are remembered, the 5 ...
    assert after.accepted
    rig.wait_delivered(3)
    assert rig.held() == []  # ... sent while policyd was down are not counted
    crossing = send(rig, "alice", 1, tag="crossing")  # 10: held
    assert [m.queue_id for m in rig.held()] == [crossing.queue_id]
    assert counted(daemon.events()) == [("alice", 8, "DUNNO"), ("alice", 1, "DUNNO"), ("alice", 1, "HOLD")]
    # Postfix took the restart in its stride: no error talking to the new daemon.
    assert smtpd_warnings(rig, since=log_mark) == []
    assert_clean_policyd_log(daemon)


def test_policyd_down_with_postfix_default_temp_fails_then_restarted(
    policyd: PolicydFactory, postfix_rig: RigFactory
) -> None:
    daemon = policyd()
    # check_policy_service without default_action: Postfix's default action.
    rig = postfix_rig(daemon.target, users=USERS)
    assert send(rig, "alice", 3, tag="before").accepted
    rig.wait_delivered(1)

    assert daemon.stop() == 0
    refused = rig.send("alice", USERS["alice"], "alice@example.org", ["bob@example.net"])
    assert (refused.accepted, refused.stage, refused.code) == (False, "end-of-data", 451), refused
    assert refused.text == "4.3.5 <END-OF-MESSAGE>: End-of-data rejected: Server configuration problem"
    assert rig.queue() == []
    rig.wait_log(r"reject: END-OF-MESSAGE .*: 451 4\.3\.5 ")
    assert_in_order(
        _postfix_messages(doc_block("postfix-down", "log").splitlines()),
        _postfix_messages(rig.log_text().splitlines(), port=daemon.port),
        "Postfix's log",
    )

    daemon.start()
    log_mark = len(rig.log_text())
    crossing = send(rig, "alice", 7, tag="after")  # 3 + 7 = 10: the 3 were remembered
    assert crossing.accepted, crossing
    assert [m.queue_id for m in rig.held()] == [crossing.queue_id]
    assert counted(daemon.events()) == [("alice", 3, "DUNNO"), ("alice", 7, "HOLD")]
    assert smtpd_warnings(rig, since=log_mark) == []
    assert_clean_policyd_log(daemon)


# ---------------------------------------------------------------------------------------
# connections


def test_postfix_keeps_one_connection_to_policyd_for_many_messages(
    policyd: PolicydFactory, postfix_rig: RigFactory
) -> None:
    daemon, rig = start_with_doc_config(policyd, postfix_rig, "end-of-data")
    first: set[int] = set()
    seen: set[int] = set()
    sent = 0

    def check_connection() -> None:
        nonlocal first
        now = policy_connections(daemon.port)
        seen.update(now)
        if not first:
            assert len(now) == 1, now
            first = now
        assert first <= now, f"the first policy connection {first} was closed (now {now})"

    # Three SMTP sessions of nine messages each, one after the other ...
    for user in ("u1", "u2", "u3"):
        with rig.connect(user, USERS[user]) as client:
            for i in range(9):
                assert client.send(f"{user}@example.org", [f"{user}-{i}@example.net"]).accepted
                sent += 1
                check_connection()
    # ... and sessions of one message each.
    for i in range(5):
        assert send(rig, "u4", 1, tag=f"single{i}-").accepted
        sent += 1
        check_connection()

    rig.wait_delivered(sent)
    assert len(seen) <= 2, f"Postfix opened {len(seen)} connections for {sent} messages"
    assert [e.action for e in daemon.events()] == ["DUNNO"] * sent
    assert "problem talking to server" not in rig.log_text()
    assert smtpd_warnings(rig) == []
    assert_clean_policyd_log(daemon)
    assert daemon.stop() == 0
    assert daemon.log_lines(rf"stopping: {sent} requests answered, {sent} events counted$")


def test_reload_applies_to_the_next_message_on_the_same_connection(
    policyd: PolicydFactory, postfix_rig: RigFactory
) -> None:
    daemon, rig = start_with_doc_config(policyd, postfix_rig, "end-of-data")
    assert send(rig, "alice", 5).accepted  # 5 of 10
    connection = policy_connections(daemon.port)
    assert len(connection) == 1
    daemon.write_config(defaultquota="6")
    daemon.reload()  # SIGHUP
    held = send(rig, "alice", 1)  # 6: now the quota
    assert [m.queue_id for m in rig.held()] == [held.queue_id]
    assert policy_connections(daemon.port) == connection  # the same connection
    daemon.wait_log(r"DEFERRING overquota \(6>6\) for user alice ")
    assert smtpd_warnings(rig) == []
    assert_clean_policyd_log(daemon)


def test_unix_socket(policyd: PolicydFactory, postfix_rig: RigFactory) -> None:
    # Postfix first: the socket directory is inside its queue directory.
    rig = postfix_rig(users=USERS, main_cf=doc_main_cf("socket"))
    (install,) = doc_commands("socket-dir")
    assert install[:2] == ["install", "-d"]
    install = [arg.replace(DOC_QUEUE_DIR, str(rig.queue_dir)) for arg in install]
    # No `policyd` user here and policyd runs as root: root owns the directory instead.
    # What Postfix relies on is tested: group postfix via the setgid directory, mode 0660.
    install[install.index("-o") + 1] = "root"
    subprocess.run(install, check=True)

    settings = doc_policyd_cfg("socket", queue_dir=rig.queue_dir)
    daemon = policyd(socket_path=settings.pop("socket"), extra=settings)
    assert daemon.socket_path is not None
    info = os.stat(daemon.socket_path)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_gid == grp.getgrnam("postfix").gr_gid

    assert send(rig, "alice", 9).accepted
    rig.wait_delivered(1)
    held = send(rig, "alice", 1)  # 10: held
    assert [m.queue_id for m in rig.held()] == [held.queue_id]
    rejected = send(rig, "alice", 10)  # 20: rejected
    assert (rejected.accepted, rejected.code) == (False, 554), rejected
    assert "max quota exceeded" in rejected.text
    assert counted(daemon.events()) == [("alice", 9, "DUNNO"), ("alice", 1, "HOLD"), ("alice", 10, "REJECT")]
    assert policy_connections(daemon.port) == set()  # all of it over the unix socket
    assert smtpd_warnings(rig) == []
    assert_clean_policyd_log(daemon)
    assert daemon.stop() == 0
    assert not os.path.exists(daemon.socket_path)  # removed at stop


# ---------------------------------------------------------------------------------------
# the documentation


def test_every_block_of_the_postfix_doc_is_tested() -> None:
    blocks = doc_blocks()
    assert set(blocks) == DOC_BLOCKS, (
        "docs/postfix.md has blocks no test runs (add a test) or a test uses a block that is gone: "
        f"{sorted(set(blocks) ^ DOC_BLOCKS)}"
    )
    # The README shows the same main.cf lines.
    readme = (ROOT / "README.md").read_text()
    assert doc_block("end-of-data", "main.cf") in readme


def test_documented_defaults_are_postfix_defaults(postfix_rig: RigFactory) -> None:
    """The "defaults" block (used as such by a test above) really is what Postfix defaults to."""
    # (postfix_rig is only asked for its skip: no Postfix installed, no test.)
    documented = doc_main_cf("defaults")
    proc = subprocess.run(
        ["postconf", "-d", *documented],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, PATH=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])),
    )
    actual = dict(line.split(" = ", 1) for line in proc.stdout.splitlines())
    assert actual == documented
