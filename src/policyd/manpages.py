"""The man pages policyd(8) and policyd.cfg(5), written from the code itself.

policyd(8) is made from the click commands (their help and options, as `--help` shows
them) and policyd.cfg(5) from the key table that `policyd config-keys` prints, so the
pages cannot say something the program does not.  The Debian package runs
``python -m policyd.manpages DIR`` at build time; so can anyone with a wheel, e.g.
``python -m policyd.manpages /usr/local/share/man``.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import click

from policyd import __version__, config
from policyd.cli import main as cli_main

PAGE_NAMES = ("policyd.8", "policyd.cfg.5")


def roff_text(text: str) -> str:
    """Text made safe for roff: backslashes and minus signs escaped, no line starting a request."""
    escaped = text.replace("\\", "\\e").replace("-", "\\-")
    lines = escaped.split("\n")
    return "\n".join("\\&" + line if line[:1] in {".", "'"} else line for line in lines)


def bold(text: str) -> str:
    return f"\\fB{roff_text(text)}\\fR"


def help_paragraphs(text: str) -> list[str]:
    """Click help text as roff: paragraphs reflowed, blocks marked with click's \\b kept as they are."""
    out = []
    for block in inspect.cleandoc(text).split("\n\n"):  # a docstring's indentation off
        if block.startswith("\b\n"):
            out.append(".PP\n.nf\n" + roff_text(block[2:]) + "\n.fi")
        else:
            out.append(".PP\n" + roff_text(" ".join(line.strip() for line in block.splitlines())))
    return out


def _header(name: str, section: int, title: str) -> list[str]:
    return [
        f'.TH "{name.upper()}" "{section}" "" "policyd {__version__}" "{title}"',
        ".nh",  # no hyphenation: paths and option names stay whole
        ".ad l",
        ".SH NAME",
        f"{roff_text(name)} \\- {roff_text(_NAME_LINES[name])}",
    ]


_NAME_LINES = {
    "policyd": "Postfix policy daemon limiting recipients per SASL user per 24 hours",
    "policyd.cfg": "configuration file of policyd(8)",
}


def _options(command: click.Command, context: click.Context) -> list[str]:
    lines = []
    for param in command.get_params(context):
        record = param.get_help_record(context)
        if record is None:
            continue
        names, description = record
        lines += [".TP", bold(names), roff_text(description) if description else ""]
    return lines


def policyd_page() -> str:
    """policyd(8): every command of the `policyd` command, with its options."""
    root = click.Context(cli_main, info_name="policyd", **cli_main.context_settings)
    lines = _header("policyd", 8, "System Administration")
    lines += [
        ".SH SYNOPSIS",
        f"{bold('policyd')} [{bold('-V')}] [{bold('-h')}] \\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
        ".SH DESCRIPTION",
        *help_paragraphs(cli_main.help or ""),
        ".SH OPTIONS",
        *_options(cli_main, root),
        ".SH COMMANDS",
    ]
    for name in cli_main.list_commands(root):
        command = cli_main.get_command(root, name)
        assert command is not None
        context = click.Context(command, info_name=name, parent=root, **command.context_settings)
        lines += [
            f'.SS "policyd {roff_text(name)} [OPTIONS]"',
            *help_paragraphs(command.help or ""),
            *_options(command, context),
        ]
    lines += [
        ".SH ENVIRONMENT",
        ".TP",
        bold("POLICYD_CONFIG"),
        roff_text(f"The configuration file, when -c is not given (default {config.DEFAULT_CONFIG_PATH})."),
        ".SH FILES",
        ".TP",
        bold(config.DEFAULT_CONFIG_PATH),
        "The configuration, see policyd.cfg(5).",
        ".TP",
        bold("/var/lib/policyd"),
        roff_text(
            "The state directory of the systemd unit: the SQLite database and the spool of events "
            "waiting for the database."
        ),
        '.SH "SHELL COMPLETION"',
        roff_text(
            "The Debian package installs bash completion for policyd. Elsewhere, add this to ~/.bashrc:"
        ),
        ".PP",
        ".nf",
        roff_text('eval "$(_POLICYD_COMPLETE=bash_source policyd)"'),
        ".fi",
        ".PP",
        roff_text("(zsh: zsh_source, fish: fish_source)."),
        ".SH SIGNALS",
        roff_text(
            "SIGHUP (systemctl reload policyd) re-reads the configuration; SIGTERM (systemctl stop) "
            "lets the requests in flight finish, writes what is queued and exits."
        ),
        '.SH "SEE ALSO"',
        "policyd.cfg(5), postconf(5), systemctl(1)",
    ]
    return "\n".join(lines) + "\n"


def config_page() -> str:
    """policyd.cfg(5): the file format and every key."""
    lines = _header("policyd.cfg", 5, "File Formats")
    format_text = (config.__doc__ or "").split("\n\n", 1)[-1].replace("``", '"')
    lines += [
        ".SH DESCRIPTION",
        *help_paragraphs(
            f"policyd(8) reads its settings from {config.DEFAULT_CONFIG_PATH} (or the file given "
            "with -c), go-policyd's format."
        ),
        *help_paragraphs(format_text),
        ".SH KEYS",
    ]
    for key, (_, description) in config.KEYS.items():
        lines += [".TP", bold(key), roff_text(description)]
    lines += [
        '.SH "IGNORED KEYS"',
        roff_text(
            "Accepted for go-policyd's sample file, with a warning: "
            + ", ".join(sorted(config.IGNORED_LEGACY_KEYS))
            + "."
        ),
        ".SH EXAMPLE",
        ".nf",
        roff_text(
            "port = 9093\n"
            "defaultquota = 1500\n"
            "database = sqlite:///var/lib/policyd/policyd.sqlite\n"
            "whitelist = newsletter@example.org\n"
            "whitelist_hours = Mon-Fri 07:00-20:00"
        ),
        ".fi",
        ".PP",
        roff_text("policyd check-config prints the effective settings; policyd config-keys lists the keys."),
        '.SH "SEE ALSO"',
        "policyd(8)",
    ]
    return "\n".join(lines) + "\n"


def write_pages(directory: Path) -> list[Path]:
    """Write both pages under `directory` as man expects them (man8/policyd.8, man5/policyd.cfg.5)."""
    written = []
    for name, text in zip(PAGE_NAMES, (policyd_page(), config_page()), strict=True):
        path = directory / f"man{name.rsplit('.', 1)[1]}" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m policyd.manpages DIRECTORY")
    for page in write_pages(Path(sys.argv[1])):
        print(page)
