"""Fixtures for end-to-end tests against a real Postfix (see postfix_rig.py).

``postfix_rig`` is a factory: call it with PostfixRig's arguments to get a
started rig; every rig it made is stopped after the test. When a test fails,
the tail of each rig's Postfix log is added to the report.

Skipped when Postfix/Dovecot are missing (or not root), except with CI=true,
where that is a failure: CI must run these tests, never silently skip them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest

try:
    from tests.e2e import postfix_rig as rig_mod
except ImportError:  # tests/e2e is not a package: pytest put tests/e2e on sys.path
    import postfix_rig as rig_mod  # type: ignore[no-redef,import-not-found]

_RIGS = pytest.StashKey[list[rig_mod.PostfixRig]]()


def require_postfix() -> None:
    """Skip if no rig can run here; fail instead when CI=true."""
    reason = rig_mod.unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"CI=true but the Postfix rig cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def postfix_rig(request: pytest.FixtureRequest) -> Iterator[Callable[..., rig_mod.PostfixRig]]:
    """Factory: ``postfix_rig(policy="inet:127.0.0.1:PORT", users={...})`` -> started PostfixRig."""
    require_postfix()
    rigs = request.node.stash.setdefault(_RIGS, [])

    def make(*args: Any, **kwargs: Any) -> rig_mod.PostfixRig:
        rig = rig_mod.PostfixRig(*args, **kwargs)
        rigs.append(rig)
        return rig.start()

    yield make
    for rig in rigs:
        rig.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and call.when == "call":
        for rig in item.stash.get(_RIGS, []):
            report.sections.append((f"postfix maillog ({rig.dir})", rig.log_tail(80)))
    return report
