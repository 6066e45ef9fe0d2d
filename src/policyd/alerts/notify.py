"""Sending a notice: a mail through the local MTA (SMTP, no authentication: the relay's
own Postfix on localhost) and/or a JSON POST to a webhook (Slack and Mattermost read
its `text`).  Blocking calls, made from a thread; each raises NotifyError with a message
that holds no secret (a webhook URL's path often is one: only its host is shown)."""

from __future__ import annotations

import json
import smtplib
import urllib.error
import urllib.parse
import urllib.request
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

TIMEOUT_SECONDS = 10.0


class NotifyError(Exception):
    """A notice could not be sent (the message says where and why)."""


def send_mail(server: str, sender: str, recipients: list[str], subject: str, text: str) -> None:
    """One plain-text mail through the SMTP server at `server` (host:port)."""
    host, _, port = server.rpartition(":")
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=True)
    message["Message-ID"] = make_msgid(domain="policyd.invalid")
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies to it
    message.set_content(text)
    try:
        with smtplib.SMTP(host or "localhost", int(port or 25), timeout=TIMEOUT_SECONDS) as smtp:
            smtp.send_message(message)
    except (OSError, smtplib.SMTPException, ValueError) as error:
        raise NotifyError(f"mail to {', '.join(recipients)} through {server}: {error}") from None


def webhook_host(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}"


def post_webhook(url: str, payload: dict[str, object]) -> None:
    """POST `payload` as JSON to `url`; any answer but 2xx is a failure."""
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "policyd"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        raise NotifyError(f"webhook {webhook_host(url)}: HTTP {error.code}") from None
    except (OSError, ValueError) as error:
        raise NotifyError(f"webhook {webhook_host(url)}: {getattr(error, 'reason', error)}") from None
    if not 200 <= status < 300:
        raise NotifyError(f"webhook {webhook_host(url)}: HTTP {status}")
