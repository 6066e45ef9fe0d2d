"""contrib/prometheus and contrib/grafana: promtool accepts the rules, the alerts fire
when they should (promtool test rules), and every metric they name is one a running
daemon exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import http_get, make_settings, run_daemon, skip_or_fail

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
RULES = CONTRIB / "prometheus" / "policyd-alerts.yml"
RULE_TESTS = CONTRIB / "prometheus" / "policyd-alerts.test.yml"
DASHBOARD = CONTRIB / "grafana" / "policyd-dashboard.json"
METRIC_NAME = re.compile(r"\b(policyd_[a-z_]+)\b")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        skip_or_fail("promtool is missing (apt-get install prometheus)")
    assert path is not None
    return path


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout + result.stderr


def test_the_alerts_fire_when_they_should() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name], capture_output=True, text=True, cwd=RULE_TESTS.parent
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    expressions += [variable["definition"] for variable in dashboard["templating"]["list"]]
    return expressions


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The series names a running daemon exposes (histograms with their _bucket/_sum/_count)."""
    import asyncio

    tmp = tmp_path_factory.mktemp("metrics")

    async def scrape() -> str:
        settings = make_settings(f"sqlite://{tmp}/p.sqlite", http_listen=("127.0.0.1", 0))
        async with run_daemon(settings) as running:
            client = await running.client()
            await client.ask()  # a request: the per-stage series appear
            await client.close()
            return (await http_get(running.web_url + "/metrics")).text

    text = asyncio.run(scrape())
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_rules_and_dashboard_name_only_exposed_metrics(exposed: set[str]) -> None:
    named = set(METRIC_NAME.findall(RULES.read_text()))
    for expression in dashboard_expressions():
        named.update(METRIC_NAME.findall(expression))
    assert len(named) >= 15, named
    assert named - exposed == set(), f"not exposed by policyd: {sorted(named - exposed)}"


def test_dashboard_is_importable_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "policyd"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
    assert [item["name"] for item in dashboard["__inputs"]] == ["DS_PROMETHEUS"]


# ---------------------------------------------------------------------------
# docs/operations.md: what it says about the metrics and the scrape job is true
# ---------------------------------------------------------------------------

OPERATIONS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def metrics_section() -> str:
    text = OPERATIONS.read_text()
    start = text.index("### Metrics")
    return text[start : text.index("### Alert rules", start)]


def test_every_metric_is_documented_and_every_documented_one_exists(exposed: set[str]) -> None:
    documented = set(METRIC_NAME.findall(metrics_section()))
    # A histogram is documented by its name; it is exposed as _bucket, _sum and _count.
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in exposed} | exposed
    assert documented - families == set(), f"documented, not exposed: {sorted(documented - families)}"
    undocumented = {
        name
        for name in exposed
        if name not in documented and re.sub(r"_(bucket|sum|count)$", "", name) not in documented
    }
    assert undocumented == set(), f"exposed, not documented: {sorted(undocumented)}"


def test_the_documented_scrape_job_passes_promtool(tmp_path: Path) -> None:
    [yaml] = [body for kind, body in FENCE.findall(metrics_section()) if kind.strip() == "yaml"]
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.replace("/etc/prometheus/rules/policyd-alerts.yml", str(RULES)))
    result = subprocess.run([promtool(), "check", "config", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_the_documented_healthz_answer_is_the_real_one(tmp_path: Path) -> None:
    text = OPERATIONS.read_text()
    section = text[text.index("### /healthz") : text.index("### Metrics")]
    [(_, shown)] = FENCE.findall(section)
    settings = make_settings(f"sqlite://{tmp_path}/p.sqlite", http_listen=("127.0.0.1", 0))
    async with run_daemon(settings) as running:
        real = (await http_get(running.web_url + "/healthz")).text
    assert [line.split(" ")[0] for line in real.splitlines()] == [
        line.split(" ")[0] for line in shown.splitlines()
    ]
    assert real.splitlines()[:2] == shown.splitlines()[:2]
