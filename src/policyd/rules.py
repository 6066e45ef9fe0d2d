"""Run-time rules: allow / block entries, per-user limit overrides, resets.  Pure, time passed in.

The entries come from two places: the configuration file (``whitelist`` / ``blacklist``,
go-policyd's keys) and the database (``policyd allow`` / ``block`` / ``quota set`` /
``reset``, read by every daemon sharing it, see sync.py).  Both are matched here, by
what the entry is, never as plain text:

``192.0.2.7``, ``2001:db8::1``
    the client address, compared as an address (``2001:DB8:0::1`` is ``2001:db8::1``;
    an IPv4-mapped IPv6 client ``::ffff:192.0.2.7`` is ``192.0.2.7``);
``192.0.2.0/24``, ``2001:db8::/32``
    a network of client addresses;
``@example.org``
    the envelope sender's domain (exactly that domain, not its subdomains);
``jdoe@example.org``
    the SASL user of that name, or the envelope sender (see below);
``jdoe``
    the SASL user.

Anything else (``*spam*``, ``192.0.2.0/33``, spaces) is refused, so no entry is kept that
could never match.

A sender is chosen by whoever sends the mail.  An *allow* entry naming a sender (or a
sender domain) exempts a message only together with the SASL user it names (``policyd
allow news@example.org --user newsletter``): otherwise a phished account could dodge
its quota by picking that envelope sender.  Without ``--user`` an allow entry
``jdoe@example.org`` names the SASL user only.  go-policyd's ``whitelist`` in the
configuration file keeps its old meaning (user *or* sender) for compatibility, and
``check-config`` warns about every such entry.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from policyd.quota import QuotaRules

ALLOW = "allow"
BLOCK = "block"
BLOCK_ACTIONS = ("HOLD", "REJECT")

_NEVER = 2**62
_MS = timedelta(milliseconds=1)
# Looks like an address or a network: refused if it does not parse as one.
_IPV4_LIKE = re.compile(r"^[0-9.]+(/[0-9]*)?$")
_IPV6_LIKE = re.compile(r"^[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(/[0-9]*)?$")
_DOMAIN = re.compile(r"^[^\s@*?\[\]]+$")
_FORBIDDEN = re.compile(r"[\s*?\[\]]")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class EntryError(ValueError):
    """An entry that could never match (or is ambiguous)."""


@dataclass(frozen=True, slots=True)
class Target:
    """What an entry names: kind is 'network', 'domain', 'address' or 'user'; `text` its
    normal form (lower case; a network in ipaddress's compressed form)."""

    kind: str
    text: str
    network: IPNetwork | None = None


def parse_target(text: str) -> Target:
    """The normal form of an entry, or EntryError saying why it can never match."""
    raw = text.strip()
    if not raw:
        raise EntryError("an empty entry matches nothing")
    if _FORBIDDEN.search(raw):
        raise EntryError(
            f"{raw!r}: wildcards and spaces are not supported (use a user, a sender, "
            "@domain, an IP address or a network like 192.0.2.0/24)"
        )
    if (_IPV4_LIKE.match(raw) and "." in raw) or _IPV6_LIKE.match(raw):
        try:
            network = ipaddress.ip_network(raw, strict=False)
        except ValueError as error:
            raise EntryError(f"{raw!r} is not a valid IP address or network: {error}") from None
        network = _unmapped_network(network)
        text_form = str(network.network_address) if _single(network) else str(network)
        return Target("network", text_form, network)
    lowered = raw.lower()
    if lowered.startswith("@"):
        domain = lowered[1:]
        if not domain or not _DOMAIN.match(domain) or domain.startswith(".") or ".." in domain:
            raise EntryError(f"{raw!r} is not a sender domain like @example.org")
        return Target("domain", lowered)
    if "@" in lowered:
        local, _, domain = lowered.rpartition("@")
        if not local or not domain:
            raise EntryError(f"{raw!r} is not an address like jdoe@example.org")
        return Target("address", lowered)
    return Target("user", lowered)


def _single(network: IPNetwork) -> bool:
    return network.prefixlen == network.max_prefixlen


def _unmapped_network(network: IPNetwork) -> IPNetwork:
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
    return network


# Parsing an address costs 4 µs, a cache hit 0.1 µs: a relay sees the same clients again.
@functools.lru_cache(maxsize=8192)
def client_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client address as an address (None when Postfix sent none: 'unknown', '')."""
    try:
        address = ipaddress.ip_address(text.strip().split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True, slots=True)
class ListEntry:
    """One allow or block entry.

    `user`: the entry applies only to this SASL user ("" for any user).  `action`: what a
    block answers (HOLD or REJECT).  `until_ms`: when it stops applying (None: never).
    `source`: "database" (policyd allow/block) or "config" (whitelist/blacklist).
    """

    kind: str
    target: str
    user: str = ""
    action: str = "HOLD"
    until_ms: int | None = None
    reason: str = ""
    created_ms: int = 0
    source: str = "database"
    entry_id: int = 0

    @property
    def matches_sender(self) -> bool:
        """Whether an address or domain entry is compared with the envelope sender: not
        for an allow entry of the database without a user (see the module docstring)."""
        return self.source == "config" or self.kind == BLOCK or bool(self.user)

    def active(self, now_ms: int) -> bool:
        return self.until_ms is None or now_ms < self.until_ms

    def describe(self) -> str:
        words = [self.kind, self.target]
        if self.user:
            words.append(f"for user {self.user}")
        if self.kind == BLOCK:
            words.append(f"({self.action})")
        if self.source == "config":
            words.append("[config file]")
        return " ".join(words)


def make_entry(
    kind: str,
    text: str,
    *,
    user: str = "",
    action: str = "HOLD",
    until_ms: int | None = None,
    reason: str = "",
    created_ms: int = 0,
    source: str = "database",
    entry_id: int = 0,
) -> ListEntry:
    """A checked entry (EntryError when it could never match, or would let any user
    dodge the quota: an allow entry for a sender domain without a user)."""
    if kind not in {ALLOW, BLOCK}:
        raise EntryError(f"kind must be {ALLOW} or {BLOCK}, not {kind!r}")
    target = parse_target(text)
    if action.upper() not in BLOCK_ACTIONS:
        raise EntryError(f"a block answers HOLD or REJECT, not {action!r}")
    user = user.strip().lower()
    if user and parse_target(user).kind not in {"user", "address"}:
        raise EntryError(f"--user {user!r} is not a SASL user name")
    if kind == ALLOW and source == "database" and target.kind == "domain" and not user:
        raise EntryError(
            f"allow {target.text} would let any user dodge the quota by using such a sender: "
            "name the user it is for (--user)"
        )
    return ListEntry(kind, target.text, user, action.upper(), until_ms, reason, created_ms, source, entry_id)


class Matcher:
    """Entries compiled for matching: a dict lookup per kind, one per network prefix length."""

    def __init__(self, entries: Iterable[ListEntry]) -> None:
        self.users: dict[str, list[ListEntry]] = {}
        self.senders: dict[str, list[ListEntry]] = {}
        self.domains: dict[str, list[ListEntry]] = {}
        # (version, prefix length) -> network address as an integer -> entries
        self.networks: dict[tuple[int, int], dict[int, list[ListEntry]]] = {}
        self.entries = tuple(entries)
        self._ranks = {id(entry): rank for rank, entry in enumerate(self.entries)}
        for entry in self.entries:
            target = parse_target(entry.target)
            if target.kind == "network":
                assert target.network is not None
                key = (target.network.version, target.network.prefixlen)
                by_address = self.networks.setdefault(key, {})
                by_address.setdefault(int(target.network.network_address), []).append(entry)
            elif target.kind == "domain":
                if entry.matches_sender:
                    self.domains.setdefault(target.text[1:], []).append(entry)
            else:
                self.users.setdefault(target.text, []).append(entry)
                if target.kind == "address" and entry.matches_sender:
                    self.senders.setdefault(target.text, []).append(entry)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def match(self, user: str, sender: str, client_address: str) -> ListEntry | None:
        """The first entry (in the order given) that matches the message, or None."""
        found: list[ListEntry] = []
        user = user.lower()
        if self.users:
            found += self.users.get(user, ())
        if sender and (self.senders or self.domains):
            lowered = sender.lower()
            found += self.senders.get(lowered, ())
            if "@" in lowered:
                found += self.domains.get(lowered.rpartition("@")[2], ())
        if self.networks and client_address:
            address = client_ip(client_address)
            if address is not None:
                number = int(address)
                for (version, prefix), by_address in self.networks.items():
                    if version != address.version:
                        continue
                    shift = address.max_prefixlen - prefix
                    found += by_address.get(number >> shift << shift, ())
        best: ListEntry | None = None
        best_rank = len(self.entries)
        for entry in found:
            if entry.user and entry.user != user:
                continue
            rank = self._rank(entry)
            if rank < best_rank:
                best, best_rank = entry, rank
        return best

    def _rank(self, entry: ListEntry) -> int:
        return self._ranks[id(entry)]


@dataclass(frozen=True, slots=True)
class Override:
    """A user's own thresholds for the limit of window `window_ms` (until `until_ms`)."""

    sasl_username: str
    window_ms: int
    hold: int
    reject: int
    until_ms: int | None = None
    reason: str = ""
    created_ms: int = 0

    def active(self, now_ms: int) -> bool:
        return self.until_ms is None or now_ms < self.until_ms


@dataclass(frozen=True, slots=True)
class Reset:
    """The user's events before `before_ms` are forgotten (they stay in the table)."""

    reset_id: int
    sasl_username: str
    before_ms: int
    reason: str = ""
    created_ms: int = 0


def apply_overrides(rules: QuotaRules, overrides: Sequence[Override], now_ms: int) -> QuotaRules:
    """The rules with the user's active overrides in place of the configured thresholds
    of the limits of the same window (an override for a window no limit has is ignored)."""
    by_window = {override.window_ms: override for override in overrides if override.active(now_ms)}
    if not by_window:
        return rules
    limits = []
    for limit in rules.limits:
        override = by_window.get(limit.window // _MS)
        limits.append(
            limit if override is None else replace(limit, hold=override.hold, reject=override.reject)
        )
    primary, *extra = limits
    return replace(rules, quota=primary.hold, reject_quota=primary.reject, extra_limits=tuple(extra))


@dataclass
class RuntimeRules:
    """What the database says, as the decision uses it: built once per change."""

    overrides: dict[str, tuple[Override, ...]] = field(default_factory=dict)
    entries: tuple[ListEntry, ...] = ()
    resets: tuple[Reset, ...] = ()
    _blocks: Matcher = field(init=False, repr=False)
    _allows: Matcher = field(init=False, repr=False)
    _next_expiry: int = field(init=False, repr=False, default=0)
    # user -> (the configured rules it was made from, the effective rules, valid until ms)
    _effective: dict[str, tuple[object, QuotaRules, int]] = field(
        init=False, repr=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        self._compile(0)

    @classmethod
    def build(
        cls, overrides: Iterable[Override], entries: Iterable[ListEntry], resets: Iterable[Reset]
    ) -> RuntimeRules:
        by_user: dict[str, list[Override]] = {}
        for override in overrides:
            by_user.setdefault(override.sasl_username, []).append(override)
        return cls({user: tuple(items) for user, items in by_user.items()}, tuple(entries), tuple(resets))

    def _compile(self, now_ms: int) -> None:
        active = [entry for entry in self.entries if entry.active(now_ms)]
        self._blocks = Matcher(entry for entry in active if entry.kind == BLOCK)
        self._allows = Matcher(entry for entry in active if entry.kind == ALLOW)
        self._next_expiry = min(
            (entry.until_ms for entry in active if entry.until_ms is not None), default=_NEVER
        )

    @property
    def has_lists(self) -> bool:
        return bool(self.entries)

    def _fresh(self, now_ms: int) -> None:
        if now_ms >= self._next_expiry:
            self._compile(now_ms)

    def blocked(self, user: str, sender: str, client_address: str, now_ms: int) -> ListEntry | None:
        self._fresh(now_ms)
        return self._blocks.match(user, sender, client_address) if self._blocks else None

    def allowed(self, user: str, sender: str, client_address: str, now_ms: int) -> ListEntry | None:
        self._fresh(now_ms)
        return self._allows.match(user, sender, client_address) if self._allows else None

    def rules_for(self, user: str, rules: QuotaRules, now_ms: int) -> QuotaRules:
        """The rules that apply to `user` (their overrides in place), cached per user."""
        overrides = self.overrides.get(user)
        if not overrides:
            return rules
        cached = self._effective.get(user)
        if cached is not None and cached[0] is rules and now_ms < cached[2]:
            return cached[1]
        effective = apply_overrides(rules, overrides, now_ms)
        valid_until = min(
            (o.until_ms for o in overrides if o.until_ms is not None and o.until_ms > now_ms), default=_NEVER
        )
        self._effective[user] = (rules, effective, valid_until)
        return effective

    def summary(self) -> str:
        allows = sum(1 for entry in self.entries if entry.kind == ALLOW)
        return (
            f"{sum(len(items) for items in self.overrides.values())} overrides, "
            f"{allows} allow and {len(self.entries) - allows} block entries, {len(self.resets)} resets"
        )


def config_entries(whitelist: Iterable[str], blacklist: Iterable[str]) -> list[ListEntry]:
    """The configuration file's entries, shown beside the database's (`policyd lists`)."""
    entries = [make_entry(ALLOW, text, source="config") for text in sorted(whitelist)]
    entries += [make_entry(BLOCK, text, source="config") for text in sorted(blacklist)]
    return entries
