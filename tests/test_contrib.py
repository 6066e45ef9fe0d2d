"""contrib/: the systemd unit and the monit check agree with the daemon, and their tools accept them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from policyd import manpages
from policyd.config import DEFAULT_CONFIG_PATH, Settings

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
UNIT = CONTRIB / "policyd.service"
MONIT = CONTRIB / "monit" / "policyd"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
# The highest "Overall exposure level" (0 = locked down, 10 = unprotected) the unit may get.
MAX_EXPOSURE = 2.0


def skip_or_fail(reason: str) -> None:
    """Outside CI a missing tool skips the test; in CI it is a failure (it must be installed)."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a missing tool is a failure)")
    pytest.skip(reason)


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values in order (systemd keys may repeat, unlike configparser's)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    lines = iter(text.splitlines())
    for raw in lines:
        line = raw.strip()
        while line.endswith("\\"):  # continuation lines
            line = line[:-1] + " " + next(lines, "").strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"setting outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


def one(section: dict[str, list[str]], key: str) -> str:
    values = section.get(key)
    assert values, f"{key}= is missing"
    assert len(values) == 1, f"{key}= is set {len(values)} times"
    return values[0]


def test_unit_is_notify_and_runs_policyd_serve(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    assert one(service, "Type") == "notify"
    assert one(service, "NotifyAccess") == "main"
    command = one(service, "ExecStart").split()
    assert command[0].startswith("/") and Path(command[0]).name == "policyd"
    assert command[1:] == ["serve", "-c", DEFAULT_CONFIG_PATH]
    assert one(service, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(service, "Restart") == "on-failure"
    assert one(service, "WatchdogSec") == "30"
    assert one(service, "User") == "policyd"
    assert one(service, "Group") == "policyd"
    assert one(unit["Install"], "WantedBy") == "multi-user.target"


def test_unit_state_directory_holds_the_default_database_and_spool(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    service = unit["Service"]
    state = Path("/var/lib") / one(service, "StateDirectory")
    assert one(service, "StateDirectoryMode") == "0750"
    defaults = Settings()
    assert defaults.database.startswith("sqlite://")
    database = Path(defaults.database.removeprefix("sqlite://"))
    assert database.parent == state
    spool = getattr(defaults, "spool", None)
    if spool:
        assert Path(spool).is_relative_to(state)


HARDENING = {
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "SystemCallArchitectures": "native",
    "UMask": "0027",
}


@pytest.mark.parametrize(("key", "expected"), sorted(HARDENING.items()))
def test_unit_hardening(unit: dict[str, dict[str, list[str]]], key: str, expected: str) -> None:
    assert one(unit["Service"], key) == expected


def test_unit_system_call_filter(unit: dict[str, dict[str, list[str]]]) -> None:
    filters = unit["Service"].get("SystemCallFilter", [])
    assert filters[0] == "@system-service", "the allow list comes first"
    assert all(extra.startswith("~") for extra in filters[1:]), "later lines may only take away"


def test_unit_has_no_path_that_would_fail_the_start(unit: dict[str, dict[str, list[str]]]) -> None:
    # ProtectSystem=strict leaves only the state directory writable; an extra writable path
    # that does not exist on a host fails the start unless prefixed with "-".
    for path in unit["Service"].get("ReadWritePaths", []):
        assert path.startswith("-"), path


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        skip_or_fail("systemd-analyze is not installed (Debian package: systemd)")
    assert found is not None
    return found


def _venv_policyd() -> str:
    found = shutil.which("policyd", path=os.path.dirname(sys.executable))
    if found is None:
        pytest.fail(f"no policyd command next to {sys.executable}: is policyd installed in this venv?")
    return found


def _unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at this venv's policyd, which exists here."""
    text = UNIT.read_text()
    text, count = re.subn(r"(?m)^ExecStart=\S+", lambda _: f"ExecStart={_venv_policyd()}", text)
    assert count == 1
    copy = tmp_path / "policyd.service"
    copy.write_text(text)
    return copy


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    copy = _unit_copy(tmp_path)
    # Documentation= names policyd(8): verify runs man on it, so put the generated page on MANPATH.
    manpages.write_pages(tmp_path / "man")
    env = {**os.environ, "MANPATH": f"{tmp_path / 'man'}:"}
    result = subprocess.run(
        [analyze, "verify", str(copy)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Other units of this host may draw remarks; ours must draw none.
    assert "policyd.service" not in output, output


def test_systemd_analyze_security(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    copy = _unit_copy(tmp_path)
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(copy)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0 and "offline" in output and "unrecognized" in output:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    match = re.search(r"Overall exposure level for policyd\.service: (\d+(?:\.\d+)?)", output)
    assert match, output
    assert float(match.group(1)) <= MAX_EXPOSURE, output


# ---------------------------------------------------------------------------
# monit
# ---------------------------------------------------------------------------


def test_monit_checks_the_policy_protocol_on_the_default_port() -> None:
    text = MONIT.read_text()
    defaults = Settings()
    assert re.search(r'(?m)^check process policyd matching "policyd serve"$', text)
    assert f"if failed host {defaults.bind} port {defaults.port} type tcp" in text
    assert 'send "request=smtpd_access_policy\\nprotocol_state=RCPT\\n\\n"' in text
    assert 'expect "action=DUNNO"' in text
    assert '"/bin/systemctl start policyd.service"' in text
    assert '"/bin/systemctl stop policyd.service"' in text


def test_monit_accepts_the_snippet(tmp_path: Path) -> None:
    monit = shutil.which("monit")
    if monit is None:
        pytest.skip("monit is not installed (Debian package: monit)")
    control = tmp_path / "monitrc"
    control.write_text(
        f"set daemon 60\n"
        f"set idfile {tmp_path}/id\n"
        f"set statefile {tmp_path}/state\n"
        f"set log {tmp_path}/monit.log\n"
        f"include {MONIT}\n"
    )
    control.chmod(0o600)  # monit refuses a control file others can read
    result = subprocess.run(
        [monit, "-t", "-c", str(control)], check=False, capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Control file syntax OK" in output, output
