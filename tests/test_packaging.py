"""Packaging: one version everywhere, the man pages and completion, the wheel in a fresh venv,
and the .deb installed with apt-get into a clean Debian 12 root booted under a real systemd."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from policyd import __version__, manpages
from policyd.cli import main as cli_main
from policyd.config import KEYS
from tests import debroot
from tests.conftest import skip_or_fail

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "policyd-rcpt-quota"
# As docs/install.md says it (test_install_doc_has_the_tested_commands keeps them equal).
INSTALL = "apt-get install ./dist/policyd-rcpt-quota_*_amd64.deb"
# Postfix is only recommended (the machine has no network to fetch it).
APT_FLAGS = "--yes --no-install-recommends"
GO_POLICYD_HOST_INSTALL = (
    "apt-get -o Dpkg::Options::=--force-confold install ./dist/policyd-rcpt-quota_*_amd64.deb"
)
VENV_BIN = Path(sys.executable).parent


def changelog_version() -> str:
    match = re.search(r"(?m)^## (\d+\.\d+\.\d+\S*) \(\d{4}-\d\d-\d\d\)$", (ROOT / "CHANGELOG.md").read_text())
    assert match, "CHANGELOG.md has no '## X.Y.Z (YYYY-MM-DD)' heading"
    return match.group(1)


def run(*command: str | Path, cwd: Path | None = None, timeout: float = 600) -> str:
    result = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{command} exited with {result.returncode}:\n{output[-6000:]}"
    return output


def normalized(text: str) -> str:
    return " ".join(text.replace("\b", "").split())  # click's no-rewrap mark is not text


# ---------------------------------------------------------------------------
# version, licence
# ---------------------------------------------------------------------------


def test_one_version_everywhere() -> None:
    debian = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    match = re.fullmatch(rf"{PACKAGE} \((\S+)\) \S+; urgency=\w+", debian)
    assert match, debian
    command = run(VENV_BIN / "policyd", "--version").strip()
    assert command == f"policyd, version {__version__}"
    assert changelog_version() == __version__ == match.group(1)


def test_install_doc_has_the_tested_commands() -> None:
    text = (ROOT / "docs" / "install.md").read_text()
    for command in (
        INSTALL,
        GO_POLICYD_HOST_INSTALL,
        f"apt-get remove {PACKAGE}",
        f"apt-get purge {PACKAGE}",
    ):
        assert re.search(rf"(?m)^{re.escape(command)}(\s|$)", text), command
    assert "scripts/build-deb" in text and "systemctl enable --now policyd" in text


def test_licence_file_and_metadata_say_mit() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert "LICENSE" in project["license-files"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")
    assert "License: MIT" in (ROOT / "debian" / "copyright").read_text()


# ---------------------------------------------------------------------------
# man pages and completion, generated from the code
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered_pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The pages as `man` shows them (plain text), after checking groff finds nothing to warn about."""
    if shutil.which("man") is None or shutil.which("groff") is None:
        skip_or_fail("man or groff is not installed (Debian package: man-db)")
    directory = tmp_path_factory.mktemp("man")
    pages = {}
    for path in manpages.write_pages(directory):
        warnings = subprocess.run(
            ["groff", "-man", "-ww", "-z", str(path)], capture_output=True, text=True, check=False
        )
        assert warnings.returncode == 0 and not warnings.stderr, warnings.stderr
        shown = subprocess.run(
            ["man", "--local-file", str(path)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "MANWIDTH": "200", "MANPAGER": "cat", "MAN_KEEP_FORMATTING": ""},
        )
        pages[path.name] = normalized(shown.stdout)
    return pages


def test_policyd_8_has_every_command_and_option_as_help_shows_them(rendered_pages: dict[str, str]) -> None:
    page = rendered_pages["policyd.8"]
    root = click.Context(cli_main, info_name="policyd", **cli_main.context_settings)
    names = cli_main.list_commands(root)
    assert {"serve", "top", "check-config", "config-keys", "migrate", "purge"} <= set(names)
    for name in names:
        command = cli_main.get_command(root, name)
        assert command is not None
        assert f"policyd {name} [OPTIONS]" in page
        assert normalized(command.help or "") in page, name
        context = click.Context(command, info_name=name, parent=root)
        help_text = normalized(command.get_help(context))
        for param in command.get_params(context):
            record = param.get_help_record(context)
            if record:
                # what --help shows is what the page shows
                assert normalized(record[0]) in help_text and normalized(record[0]) in page, (name, record)
                assert normalized(record[1]) in help_text and normalized(record[1]) in page, (name, record)


def test_policyd_cfg_5_has_every_key_as_config_keys_lists_them(rendered_pages: dict[str, str]) -> None:
    page = rendered_pages["policyd.cfg.5"]
    listed = run(VENV_BIN / "policyd", "config-keys").splitlines()
    assert len(listed) == len(KEYS)
    for line in listed:
        key, description = line.split(None, 1)
        assert f"{key} {normalized(description)}" in page, key


def test_bash_completion_completes_commands(tmp_path: Path) -> None:
    script = subprocess.run(
        [VENV_BIN / "policyd"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "_POLICYD_COMPLETE": "bash_source"},
    ).stdout
    (tmp_path / "policyd.bash").write_text(script)
    # What bash does on `policyd ch<TAB>`, with policyd on PATH.
    probe = (
        f"source {tmp_path}/policyd.bash\n"
        "COMP_WORDS=(policyd ch); COMP_CWORD=1\n"
        "_policyd_completion policyd ch policyd\n"  # bash passes: command, word, previous word
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(
        ["bash", "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"},
    )
    assert "check-config" in result.stdout.split(), result


# ---------------------------------------------------------------------------
# the wheel and sdist
# ---------------------------------------------------------------------------


def source_copy(destination: Path) -> Path:
    """The checkout's tracked and new files (not .venv, dist/, ...), as a clean clone has them."""
    files = run("git", "ls-files", "--cached", "--others", "--exclude-standard", cwd=ROOT).splitlines()
    for name in files:
        if (ROOT / name).is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target)
    return destination


@pytest.mark.slow
@pytest.mark.packaging
def test_wheel_installs_into_a_fresh_venv(tmp_path: Path) -> None:
    source = source_copy(tmp_path / "source")
    dist = tmp_path / "dist"
    output = run(sys.executable, "-m", "build", "--outdir", dist, source)
    assert "deprecat" not in output.lower(), [line for line in output.splitlines() if "eprecat" in line]
    wheel = dist / f"policyd-{__version__}-py3-none-any.whl"
    sdist = dist / f"policyd-{__version__}.tar.gz"
    assert wheel.is_file() and sdist.is_file(), sorted(dist.iterdir())
    listing = run("tar", "-tzf", sdist)
    for name in ("LICENSE", "CHANGELOG.md", "debian/rules", "scripts/build-deb", "examples/policyd.cfg"):
        assert f"policyd-{__version__}/{name}" in listing.splitlines(), name

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "pip", "install", "--quiet", "--disable-pip-version-check", f"{wheel}[all]")
    assert run(venv / "bin" / "policyd", "--version").strip() == f"policyd, version {changelog_version()}"
    run(venv / "bin" / "python", "-c", "import aiomysql, asyncpg, uvloop, policyd.manpages")
    licence = run(
        venv / "bin" / "python",
        "-c",
        "import importlib.metadata as m; print(m.metadata('policyd')['License-Expression'])",
    )
    assert licence.strip() == "MIT"


# ---------------------------------------------------------------------------
# the Debian package on a booted Debian 12
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def debian_package() -> Path:
    """scripts/build-deb, as documented: the path it prints."""
    if os.geteuid() != 0:
        skip_or_fail("building the .deb installs its build tools: needs root")
    output = subprocess.run(
        [ROOT / "scripts" / "build-deb"], capture_output=True, text=True, timeout=900, cwd=ROOT, check=False
    )
    assert output.returncode == 0, output.stdout + output.stderr
    path = ROOT / output.stdout.strip().splitlines()[-1]
    assert path.name == f"{PACKAGE}_{__version__}_amd64.deb", path
    return path


@pytest.fixture(scope="module")
def machine(debian_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[debroot.BootedRoot]:
    reason = debroot.unavailable_reason()
    if reason:
        skip_or_fail(reason)
    directory = tmp_path_factory.mktemp("debian12")
    depends = run("dpkg-deb", "--field", debian_package, "Depends")
    names = [re.sub(r"\s*\(.*\)", "", part).strip() for part in depends.split(",")]
    debroot.make_root(directory / "root", names)
    (directory / "root" / "root" / "dist").mkdir()
    shutil.copy(debian_package, directory / "root" / "root" / "dist" / debian_package.name)
    booted = debroot.BootedRoot(directory / "root", f"policyd-test-{os.getpid()}", directory / "console.log")
    try:
        booted.start()
        yield booted
    finally:
        booted.stop()


def ask(machine: debroot.BootedRoot, user: str, recipients: int) -> str:
    """One policy request to 127.0.0.1:9093 inside the machine; the action line it gets."""
    request = (
        "request=smtpd_access_policy\\nprotocol_state=END-OF-MESSAGE\\n"
        f"sasl_username={user}\\nsender={user}@example.org\\nclient_address=192.0.2.7\\n"
        f"recipient_count={recipients}\\n\\n"
    )
    program = (
        "import socket\n"
        "s = socket.create_connection(('127.0.0.1', 9093), timeout=10)\n"
        f"s.sendall(b'{request}')\n"
        "print(s.recv(4096).decode().strip())\n"
    )
    return machine.run("python3.11", "-c", program).stdout.strip()


def main_pid(machine: debroot.BootedRoot) -> int:
    return int(machine.run("systemctl", "show", "--value", "-p", "MainPID", "policyd").stdout)


def wait_active(machine: debroot.BootedRoot) -> None:
    for _ in range(100):
        state = machine.run("systemctl", "is-active", "policyd", check=False).stdout.strip()
        if state == "active":
            return
        assert state in {"activating", "reloading", "inactive"}, machine.run(
            "journalctl", "-u", "policyd", check=False
        ).stdout
        machine.run("sleep", "0.2")
    raise AssertionError(machine.run("systemctl", "status", "policyd", check=False).stdout)


def events_in_database(machine: debroot.BootedRoot) -> int:
    program = (
        "import sqlite3\n"
        "db = sqlite3.connect('file:/var/lib/policyd/policyd.sqlite?mode=ro', uri=True)\n"
        "print(db.execute('SELECT count(*) FROM events').fetchone()[0])\n"
    )
    return int(machine.run("python3.11", "-c", program).stdout)


@pytest.mark.slow
@pytest.mark.packaging
def test_deb_on_debian_12_under_systemd(machine: debroot.BootedRoot, debian_package: Path) -> None:
    deb = f"/root/dist/{debian_package.name}"
    # Installed by apt, which resolves the dependencies; disabled and stopped (README.Debian).
    machine.run("sh", "-c", f"cd /root && {INSTALL} {APT_FLAGS}", timeout=300)
    assert machine.run("systemctl", "is-enabled", "policyd", check=False).stdout.strip() == "disabled"
    assert machine.run("systemctl", "is-active", "policyd", check=False).stdout.strip() == "inactive"
    assert machine.run("policyd", "--version").stdout.strip() == f"policyd, version {__version__}"
    assert machine.run("sh", "-c", "command -v policyd").stdout.strip() == "/usr/bin/policyd"
    passwd = machine.run("getent", "passwd", "policyd").stdout.strip().split(":")
    assert passwd[5:] == ["/nonexistent", "/usr/sbin/nologin"], passwd
    stat = "stat -c '%U:%G %a' /etc/postfix/policyd.cfg /var/lib/policyd"
    assert machine.run("sh", "-c", stat).stdout.split("\n")[:2] == ["root:policyd 640", "policyd:policyd 750"]
    assert "configuration OK" in machine.run("policyd", "check-config").stdout
    assert machine.run("dpkg-query", "-W", "-f=${Conffiles}", PACKAGE).stdout.split()[0] == (
        "/etc/postfix/policyd.cfg"
    )
    # The unit is contrib/'s, running the packaged command; systemd accepts it.
    unit = (machine.root / "lib/systemd/system/policyd.service").read_text()
    contrib = (ROOT / "contrib" / "policyd.service").read_text()
    assert unit == contrib.replace("ExecStart=/usr/local/bin/policyd ", "ExecStart=/usr/bin/policyd ")
    # (--man=no: Documentation= names postfix(1) too, and Postfix is only recommended.)
    machine.run("systemd-analyze", "verify", "--man=no", "/lib/systemd/system/policyd.service")

    # The admin says so: it runs as policyd, answers on 9093 and writes to /var/lib/policyd.
    machine.run("systemctl", "enable", "--now", "policyd")
    wait_active(machine)
    pid = main_pid(machine)
    assert machine.run("stat", "-c", "%U", f"/proc/{pid}").stdout.strip() == "policyd"
    assert ask(machine, "alice", 3) == "action=DUNNO"
    assert ask(machine, "alice", 1500) == "action=HOLD quota exceeded"
    for _ in range(50):
        if events_in_database(machine) == 2:
            break
        machine.run("sleep", "0.2")
    assert events_in_database(machine) == 2
    owners = machine.run("sh", "-c", "stat -c '%U %n' /var/lib/policyd/*").stdout
    assert "policyd /var/lib/policyd/policyd.sqlite" in owners, owners

    # systemctl reload: the same process, the new quota at once.
    assert ask(machine, "carol", 11) == "action=DUNNO"
    machine.run("sed", "-i", "s/^defaultquota = 1500$/defaultquota = 10/", "/etc/postfix/policyd.cfg")
    machine.run("systemctl", "reload", "policyd")
    wait_active(machine)
    assert main_pid(machine) == pid
    assert ask(machine, "dave", 11) == "action=HOLD quota exceeded"

    # An upgrade (here: the same version again) keeps the changed conffile and restarts it.
    machine.run("apt-get", "install", "--yes", "--reinstall", deb, timeout=300)
    assert "defaultquota = 10" in machine.run("cat", "/etc/postfix/policyd.cfg").stdout
    wait_active(machine)
    assert main_pid(machine) != pid
    assert machine.run("systemctl", "is-enabled", "policyd").stdout.strip() == "enabled"

    # The manual and the completion are installed.
    man = {"MANPAGER": "cat", "MANWIDTH": "100"}
    env = [f"{key}={value}" for key, value in man.items()]
    page = normalized(machine.run("env", *env, "man", "policyd").stdout)
    assert "policyd serve [OPTIONS]" in page and "policyd config-keys [OPTIONS]" in page
    assert "defaultquota" in normalized(machine.run("env", *env, "man", "5", "policyd.cfg").stdout)
    machine.run("test", "-s", "/usr/share/bash-completion/completions/policyd")

    # remove keeps the data and the configuration; purge removes them.
    machine.run("apt-get", "remove", "--yes", PACKAGE)
    assert machine.run("systemctl", "is-active", "policyd", check=False).stdout.strip() != "active"
    machine.run("test", "-e", "/var/lib/policyd/policyd.sqlite")
    machine.run("test", "-e", "/etc/postfix/policyd.cfg")
    machine.run("apt-get", "purge", "--yes", PACKAGE)
    for path in (
        "/var/lib/policyd",
        "/etc/postfix/policyd.cfg",
        "/usr/lib/policyd-rcpt-quota",
        "/usr/bin/policyd",
    ):
        assert machine.run("test", "-e", path, check=False).returncode == 1, f"{path} is left after purge"
    left = machine.run("sh", "-c", "ls /etc/systemd/system/*/policyd.service 2>/dev/null", check=False).stdout
    assert left == "", left
    assert machine.run("dpkg-query", "-W", PACKAGE, check=False).returncode != 0
    # The system user stays, as Debian does (README.Debian).
    machine.run("getent", "passwd", "policyd")

    # A go-policyd host (docs/install.md): its policyd.cfg, in go-policyd's own style, is
    # kept (--force-confold answers dpkg's question as N does), and read as it is.
    go_policyd = "port=9093\nbind=127.0.0.1\ndefaultquota=5\n# usesyslog=yes\nwhitelist=nobody\n"
    machine.run("mkdir", "-p", "/etc/postfix")
    machine.run("tee", "/etc/postfix/policyd.cfg", input=go_policyd)
    machine.run("sh", "-c", f"cd /root && {GO_POLICYD_HOST_INSTALL} {APT_FLAGS}", timeout=300)
    assert machine.run("cat", "/etc/postfix/policyd.cfg").stdout == go_policyd
    assert (
        machine.run("stat", "-c", "%U:%G %a", "/etc/postfix/policyd.cfg").stdout.strip() == "root:policyd 640"
    )
    machine.run("test", "-s", "/etc/postfix/policyd.cfg.dpkg-dist")
    machine.run("systemctl", "enable", "--now", "policyd")
    wait_active(machine)
    assert ask(machine, "erin", 5) == "action=HOLD quota exceeded"
