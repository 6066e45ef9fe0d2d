"""A clean Debian 12 root booted under a real systemd, for the package tests.

`make_root()` builds the root with mmdebstrap from Debian's package registry (systemd,
man-db and the apt cache of the packages a .deb depends on, so that `apt-get install
./x.deb` resolves them as on any host, without network inside the machine).
`BootedRoot` boots it with `systemd-nspawn --boot` in a private network namespace (only
its own loopback) and runs commands in it with nsenter.  Everything here needs root.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

SUITE = "bookworm"
TOOLS = {"mmdebstrap": "mmdebstrap", "systemd-nspawn": "systemd-container", "nsenter": "util-linux"}
# What a minimal Debian 12 server has, plus man-db to read the manual.
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "man-db")
CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def unavailable_reason() -> str | None:
    """Why a root cannot be built and booted here, or None."""
    if os.geteuid() != 0:
        return "building and booting a Debian root needs root"
    for tool, package in TOOLS.items():
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package: {package})"
    return None


def make_root(path: Path, download: list[str], timeout: float = 600) -> None:
    """A minbase Debian 12 with BASE_PACKAGES installed and `download` in the apt cache."""
    hook = 'chroot "$1" apt-get install --download-only --yes -qq ' + " ".join(download)
    subprocess.run(
        [
            "mmdebstrap",
            "--mode=root",
            "--variant=minbase",
            "--quiet",
            "--include=" + ",".join(BASE_PACKAGES),
            "--skip=cleanup/apt",
            f"--customize-hook={hook}",
            SUITE,
            str(path),
        ],
        check=True,
        timeout=timeout,
        env={**CLEAN_ENV, "DEBIAN_FRONTEND": "noninteractive"},
    )


class BootedRoot:
    """A root directory booted with systemd as its PID 1 (systemd-nspawn --boot)."""

    def __init__(self, root: Path, name: str, log: Path) -> None:
        self.root = root
        self.name = name
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.init_pid = 0

    def start(self, timeout: float = 90) -> None:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--quiet",
                    f"--directory={self.root}",
                    f"--machine={self.name}",
                    "--boot",
                    "--private-network",
                    # No machined/systemd on the host to register with: run in our own cgroup.
                    "--register=no",
                    "--keep-unit",
                    "--console=read-only",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=CLEAN_ENV,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited with {self.process.returncode}: {self.log_tail()}")
            self.init_pid = self.init_pid or _child_of(self.process.pid)
            if self.init_pid:
                state = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=timeout)
                if state.stdout.strip() in {"running", "degraded"}:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the machine did not boot in {timeout:.0f}s: {self.log_tail()}")

    def run(
        self, *command: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command as root inside the machine (its mount, pid and network namespaces)."""
        assert self.init_pid, "not booted"
        result = subprocess.run(
            [
                "nsenter",
                f"--target={self.init_pid}",
                "--mount",
                "--uts",
                "--ipc",
                "--net",
                "--pid",
                "--",
                "env",
                "-i",
                *(f"{key}={value}" for key, value in CLEAN_ENV.items()),
                "DEBIAN_FRONTEND=noninteractive",
                *command,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def stop(self, timeout: float = 60) -> None:
        """Shut the machine down (SIGTERM to nspawn halts it), killed if it takes too long."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _child_of(parent: int) -> int:
    """The pid of a child process of `parent` (nspawn has one: the machine's init), or 0."""
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return 0
    return int(children[0]) if children else 0
