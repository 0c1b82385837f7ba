"""deploy/prometheus: the alert rules pass `promtool check rules` and their unit tests (`promtool test rules`), the
example Prometheus config passes `promtool check config`, and every rule only uses metrics m1serve exports.

Also the helpers the Prometheus end-to-end test (test_prometheus.py) shares: the exported metric names, a PromQL
metric-name extractor, and the installation of Debian's `prometheus` package (prometheus + promtool 2.42)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.metrics import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "deploy" / "prometheus"
RULES = PROM_DIR / "m1serve-alerts.yaml"
RULE_TESTS = PROM_DIR / "m1serve-alerts.test.yaml"
EXAMPLE_CONFIG = PROM_DIR / "prometheus.example.yml"


# ---- shared helpers -----------------------------------------------------------------------------------------------
def exported_names() -> set[str]:
    """The series names Prometheus sees for cluster.metrics.FAMILIES when they come out of Ray's metrics agent:
    Ray's `ray_` prefix, `_total` on counters, `_bucket/_sum/_count` on histograms."""
    names = set()
    for f in FAMILIES:
        base = "ray_" + f.name
        if f.kind == "counter":
            names.add(base + "_total")
        elif f.kind == "gauge":
            names.add(base)
        else:
            names |= {base + s for s in ("_bucket", "_sum", "_count")}
    return names


# Functions, aggregations and keywords our PromQL uses. An identifier outside this set is taken for a metric name
# (so a new function must be added here: the test then fails loudly rather than letting a typo through).
PROMQL_WORDS = {
    "sum", "avg", "max", "min", "count", "rate", "irate", "increase", "histogram_quantile", "max_over_time",
    "min_over_time", "avg_over_time", "clamp_min", "clamp_max", "vector", "scalar", "absent", "topk", "bottomk",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: its identifiers minus strings, label matchers, label lists, range
    selectors, numbers and PromQL's own words."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges, subqueries
    words = set(re.findall(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", e))
    words = {w for w in words if not re.fullmatch(r"(?i)(inf|nan|e\d*)", w)}
    return words - PROMQL_WORDS


@functools.cache
def ensure_prometheus() -> tuple[str, str]:
    """Paths of `prometheus` and `promtool`. When missing, installs Debian's `prometheus` package (as root, with
    apt-get: `apt-get update` once, then the package without recommends). Skips only where that is impossible."""
    found = shutil.which("prometheus"), shutil.which("promtool")
    if all(found):
        return found  # type: ignore[return-value]
    if not shutil.which("apt-get"):
        pytest.skip("prometheus/promtool are not installed and apt-get is not available to install them")
    if os.geteuid() != 0:
        pytest.skip("prometheus/promtool are not installed and installing Debian's package needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    found = shutil.which("prometheus"), shutil.which("promtool")
    assert all(found), f"the prometheus package did not provide prometheus and promtool: {found}"
    return found  # type: ignore[return-value]


@pytest.fixture(scope="session")
def promtool() -> str:
    return ensure_prometheus()[1]


def run_promtool(promtool: str, *args: str, stdin: str | None = None, cwd: Path | None = None):
    return subprocess.run([promtool, *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=cwd)


def load_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for g in groups for rule in g["rules"]]


# ---- promtool ------------------------------------------------------------------------------------------------------
def test_promtool_check_rules(promtool):
    r = run_promtool(promtool, "check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in r.stdout


def test_promtool_rule_unit_tests(promtool):
    r = run_promtool(promtool, "test", "rules", RULE_TESTS.name, cwd=PROM_DIR)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout and "FAILED" not in r.stdout


def test_promtool_check_example_config(promtool):
    r = run_promtool(promtool, "check", "config", str(EXAMPLE_CONFIG))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "is valid prometheus config file syntax" in r.stdout
    assert "m1serve-alerts.yaml" in r.stdout  # the rule file is loaded (and checked) through the config


# ---- the rule files themselves -------------------------------------------------------------------------------------
def test_rules_use_only_exported_metrics_and_are_labelled():
    exported = exported_names()
    rules = load_rules()
    assert len(rules) >= 6
    for rule in rules:
        used = metric_names(rule["expr"])
        assert used, (rule["alert"], "selects no metric")
        assert used <= exported, (rule["alert"], used - exported)
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert "for" in rule, rule["alert"]
        assert "by (application" in rule["expr"], (rule["alert"], "must aggregate per Serve application")


def test_every_alert_has_firing_and_quiet_unit_tests():
    """Each alert is evaluated at least once where it must fire and once where it must not."""
    alerts = {rule["alert"] for rule in load_rules()}
    fired, quiet = set(), set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for t in case.get("alert_rule_test", []):
            (fired if t.get("exp_alerts") else quiet).add(t["alertname"])
    assert fired == alerts, alerts - fired
    assert quiet == alerts, alerts - quiet


def test_metric_names_extractor():
    expr = ('sum by (application, le) (rate(ray_m1serve_x_bucket{code=~"5..|INTERNAL",le!="+Inf"}[5m])) > '
            'on (application) group_left 3 * avg(ray_m1serve_y) or vector(0) > 1e-3 unless absent(z:rec)')
    assert metric_names(expr) == {"ray_m1serve_x_bucket", "ray_m1serve_y", "z:rec"}
    assert "ray_m1serve_generation_tokens_total" in exported_names()
    assert "ray_m1serve_time_to_first_token_seconds_bucket" in exported_names()
    assert "ray_m1serve_state_slots_total" in exported_names()  # a gauge, despite the name
