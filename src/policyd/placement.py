"""Telling the admin the check is misplaced: requests policyd answers without counting.

policyd counts a message at END-OF-MESSAGE (or DATA), from a Postfix policy request
(``request=smtpd_access_policy``) carrying ``recipient_count``.  A check_policy_service
in smtpd_recipient_restrictions asks at RCPT, where nothing can be counted: the answer
is DUNNO and every message passes whatever the quota.  That is a mistake in main.cf, not
in the request, so it is said in the log - once an hour for each cause, naming the client
and what to change - rather than answered differently.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from policyd.logs import log, printable
from policyd.protocol import PolicyRequest
from policyd.quota import COUNTING_STAGES

# At most one warning per cause in this time: the first request says it all.
WARN_EVERY_SECONDS = 3600.0

# The main.cf restriction list a check_policy_service sits in, by the stage it asks at.
_RESTRICTIONS_BY_STAGE = {
    "CONNECT": "smtpd_client_restrictions",
    "EHLO": "smtpd_helo_restrictions",
    "HELO": "smtpd_helo_restrictions",
    "MAIL": "smtpd_sender_restrictions",
    "RCPT": "smtpd_recipient_restrictions (or smtpd_relay_restrictions)",
    "VRFY": "smtpd_recipient_restrictions",
    "ETRN": "smtpd_etrn_restrictions",
}
_ASK = "is this client Postfix, with check_policy_service in smtpd_end_of_data_restrictions in main.cf?"


class PlacementWarnings:
    """Checks each request for the signs of a misplaced check; warns once per cause per
    WARN_EVERY_SECONDS (with how many such requests came meanwhile)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._last: dict[str, float] = {}  # cause -> when it was last said
        self._unsaid: dict[str, int] = {}  # cause -> requests since then

    def check(self, request: PolicyRequest, peer: str) -> None:
        attributes = request.attributes
        kind = attributes.get("request")
        state = attributes.get("protocol_state", "").upper()
        if kind != "smtpd_access_policy" and self._due("request"):
            shown = "no request attribute" if kind is None else f"request={printable(kind[:60])!r}"
            self._say(
                "request",
                f"client {peer}: {shown}, not request=smtpd_access_policy: not a Postfix policy "
                f"request (decided as one all the same); {_ASK}",
            )
        if state not in COUNTING_STAGES:
            if not self._due("stage"):
                return
            stage = printable(state[:40]) or "no protocol_state"
            listed = _RESTRICTIONS_BY_STAGE.get(state, "a restriction list before the end of the message")
            self._say(
                "stage",
                f"client {peer}: asked at the {stage} stage, where recipients cannot be counted: "
                "answered DUNNO and nothing counted, so the quota never holds this mail; in main.cf, "
                f"move check_policy_service from {listed} to smtpd_end_of_data_restrictions",
            )
        elif "recipient_count" not in attributes and self._due("recipient_count"):
            self._say(
                "recipient_count",
                f"client {peer}: a request at {printable(state)} without recipient_count, counted as "
                "0 recipients, so the quota never holds this mail; Postfix's smtpd always sends it: "
                f"{_ASK}",
            )

    def _due(self, cause: str) -> bool:
        """Whether `cause` is to be said now (else it is counted for the next time)."""
        last = self._last.get(cause)
        if last is not None and self.clock() - last < WARN_EVERY_SECONDS:
            self._unsaid[cause] = self._unsaid.get(cause, 0) + 1
            return False
        return True

    def _say(self, cause: str, text: str) -> None:
        self._last[cause] = self.clock()
        since = self._unsaid.pop(cause, 0)
        more = f" ({since} more such requests since the last time)" if since else ""
        log.warning("%s; said once an hour%s", text, more)
