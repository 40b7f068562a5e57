"""The shipped alert rules: every expression parses (promtool), names only metrics the app's
registry exports, and links a runbook section that says what it means and what to do."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from bc_proxy.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
METRIC = re.compile(r"\bbc_proxy_[a-z0-9_]+")
REQUIRED = {
    "legacy 5xx ratio": r'bc_proxy_legacy_requests_total\{status=~"5\.\."\}',
    "send latency p99": r"histogram_quantile\(0\.99,.*bc_proxy_legacy_request_duration_seconds_"
    r'bucket\{route="/api/1/sms/out"\}',
    "token health per tenant": r"max by \(tenant\) \(bc_proxy_token_failing\)",
    "absent(up)": r'absent\(up\{job="bc-proxy"\}\)',
    "backlog age": r"bc_proxy_records_oldest_age_seconds",
    "dead letters": r"bc_proxy_dead_letters",
}


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [r for g in data["groups"] for r in g["rules"]]


def exported_names() -> set[str]:
    """Every sample name the registry exports (with the suffixes its metric types add)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    return {
        fam.name + suffix
        for fam in Metrics(process=False).registry.collect()
        for suffix in suffixes.get(fam.type, ("",))
    }


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^a-z0-9 -]", "", heading.strip().lower()).replace(" ", "-")


def runbook_sections() -> dict[str, str]:
    sections: dict[str, str] = {}
    current = None
    for line in RUNBOOK.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            current = slug(line[3:])
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool missing in CI: .ci/run installs the prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return promtool


def test_promtool_accepts_the_rules() -> None:
    """`promtool check rules` parses every alert expression (Debian's prometheus package)."""
    res = subprocess.run(
        [_promtool(), "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(rules())} rules found" in res.stdout


def test_a_removed_tenants_records_alert_for_a_day_then_stop(tmp_path: Path) -> None:
    """Records of a removed tenant are kept for good (it may come back): the alert's condition
    holds once they appear, and no more a day later, so a removal that was meant does not
    alert for ever (promtool evaluates the shipped expression over a series)."""
    (rule,) = [r for r in rules() if r["alert"] == "BcProxyRecordsForRemovedTenant"]
    test = {
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {  # none for an hour, then 5 records for two days
                        "series": 'bc_proxy_records_unconfigured_tenant{tenant="gone"}',
                        "values": "0x59 5x2940",
                    }
                ],
                "promql_expr_test": [
                    {"expr": rule["expr"], "eval_time": "50m", "exp_samples": []},
                    {
                        "expr": rule["expr"],
                        "eval_time": "2h",
                        "exp_samples": [{"labels": '{tenant="gone"}', "value": 5}],
                    },
                    {"expr": rule["expr"], "eval_time": "1d2h", "exp_samples": []},
                ],
            }
        ],
    }
    path = tmp_path / "test.yml"
    path.write_text(yaml.safe_dump(test), encoding="utf-8")
    res = subprocess.run(
        [_promtool(), "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_alerts_name_only_exported_metrics() -> None:
    """Every bc_proxy_* name in an alert expression is a sample the registry exports."""
    exported = exported_names()
    for rule in rules():
        used = set(METRIC.findall(str(rule["expr"])))
        unknown = used - exported
        assert not unknown, f"{rule['alert']} uses {unknown}"


def test_every_alert_has_a_runbook_section() -> None:
    """Each alert's runbook_url points at a runbook section that says what it means and what
    to do."""
    sections = runbook_sections()
    for rule in rules():
        url = rule["annotations"].get("runbook_url", "")
        path, _, anchor = url.partition("#")
        assert path == "docs/runbook.md", rule["alert"]
        assert anchor in sections, f"{rule['alert']}: no section #{anchor}"
        body = sections[anchor]
        assert "**Means:**" in body, anchor
        assert "**Do:**" in body, anchor


@pytest.mark.parametrize("what", sorted(REQUIRED))
def test_required_alerts_exist(what: str) -> None:
    """The alerts the operations issue asks for are there (5xx ratio, send p99, token health
    per tenant, absent(up), backlog age, dead letters)."""
    exprs = [" ".join(str(r["expr"]).split()) for r in rules()]
    assert any(re.search(REQUIRED[what], e) for e in exprs), what
