"""deploy/prometheus and deploy/grafana hold together: promtool accepts the rules and the
scrape config, the rules' unit tests (tests/deploy/alerts_test.yml) fire every alert and
fail when a rule is broken, and the dashboards are well-formed Grafana JSON."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.deploy.formats import DEPLOY
from tests.deploy.promql import DASHBOARDS, RULES, dashboard_exprs, metric_names, promtool

pytestmark = pytest.mark.timeout(120)

ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = Path(__file__).parent / "alerts_test.yml"
# What the operations issue asks an alert for, by the alert that covers it.
REQUIRED_ALERTS = {
    "GpuplaneHostLost",
    "GpuplaneGpuQuarantined",
    "GpuplaneOutboxLag",
    "GpuplaneSchedulerNotLeading",
    "GpuplaneLedgerCheckFailing",
    "GpuplaneTenantBudgetThreshold",
}


def alert_names(path: Path) -> set[str]:
    groups = yaml.safe_load(path.read_text())["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}


def test_promtool_checks_the_rules_and_the_scrape_config() -> None:
    assert RULES == [ALERTS]
    checked = promtool("check", "rules", *map(str, RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_names(ALERTS))} rules found" in checked.stdout
    assert REQUIRED_ALERTS <= alert_names(ALERTS)
    config = promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    assert "SUCCESS: 1 rule files found" in config.stdout


def test_promtool_unit_tests_fire_every_alert() -> None:
    tested = promtool("test", "rules", str(ALERTS_TEST))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
    # Every alert has a case where it fires (an empty exp_alerts only proves it is quiet).
    cases = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in cases
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert fired == alert_names(ALERTS)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (
            "max(gpuplane_outbox_oldest_unpublished_seconds) > 60",
            "max(gpuplane_outbox_oldest_unpublished_seconds) > 600",
        ),
        ("sum(gpuplane_scheduler_leader) != 1", "sum(gpuplane_scheduler_leader) > 1"),
        ('max(gpuplane_hosts{state="lost"}) > 0', 'sum(gpuplane_hosts{state="lost"}) > 0'),
    ],
)
def test_the_unit_tests_fail_a_broken_rule(tmp_path: Path, old: str, new: str) -> None:
    """The rules' unit tests have teeth: a threshold raised, a condition narrowed or a
    replicas' sum for a max each make them fail."""
    broken = tmp_path / "deploy" / "prometheus"
    broken.mkdir(parents=True)
    text = ALERTS.read_text()
    assert old in text
    (broken / "alerts.yml").write_text(text.replace(old, new))
    tests = tmp_path / "tests" / "deploy"
    tests.mkdir(parents=True)
    shutil.copy(ALERTS_TEST, tests / "alerts_test.yml")
    tested = promtool("test", "rules", str(tests / "alerts_test.yml"))
    assert tested.returncode != 0, tested.stdout
    assert "FAILED" in tested.stdout + tested.stderr


def test_dashboards_are_grafana_json_with_unique_uids() -> None:
    names = {path.stem for path in DASHBOARDS}
    assert names == {"fleet", "queue-and-scheduler", "money", "host-gpus"}
    uids = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        uids.append(board["uid"])
        assert board["title"].startswith("gpuplane / ")
        assert board["panels"], path.name
        for panel in board["panels"]:
            assert panel["targets"], f"{path.name}: {panel['title']} has no query"
            assert panel["datasource"]["uid"] == "${datasource}"
            ids = [target["refId"] for target in panel["targets"]]
            assert len(ids) == len(set(ids))
    assert len(uids) == len(set(uids))
    assert all(metric_names(expr) for _, expr in dashboard_exprs())


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            "histogram_quantile(0.99, sum by (le, grpc_method) "
            '(rate(grpc_server_handling_seconds_bucket{grpc_type="unary"}[$__rate_interval])))',
            {"grpc_server_handling_seconds_bucket"},
        ),
        (
            'sum by (grpc_method) (grpc_server_started_total{grpc_type!="unary"}) '
            "- on(grpc_method) group_left(x) grpc_server_handled_total",
            {"grpc_server_started_total", "grpc_server_handled_total"},
        ),
        (
            "max(abs(gpuplane_ledger_imbalance_micro_credits)) > 0",
            {"gpuplane_ledger_imbalance_micro_credits"},
        ),
        (
            "gpuplane_a / 1e6 > bool 2.5 or absent(gpuplane_b offset 5m)",
            {"gpuplane_a", "gpuplane_b"},
        ),
        ("label_values(gpuplane_daemon_build_info, instance)", {"gpuplane_daemon_build_info"}),
    ],
)
def test_metric_names_of_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
