"""deploy/prometheus checked by Prometheus' own tool: the config, the rule files, and the rules' unit
tests (rules/tests/*.yml: SLO burn-rate alerts and GPU alerts on synthetic series)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness.fixtures import REQUIRE_PROMETHEUS_ENV, prometheus_required

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULES = sorted((DEPLOY / "rules").glob("*.yml"))
RULE_TESTS = sorted((DEPLOY / "rules" / "tests").glob("*.yml"))


@pytest.fixture(scope="module")
def promtool() -> str:
    """The promtool binary; skipped locally without it, an error where Prometheus is required (CI)."""
    binary = shutil.which("promtool")
    if binary is None:
        message = "promtool not found (it comes with Debian's prometheus package: apt-get install prometheus)"
        if prometheus_required():
            pytest.fail(f"{message}; {REQUIRE_PROMETHEUS_ENV} is set, so this is an error", pytrace=False)
        pytest.skip(message)
    return binary


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=DEPLOY, capture_output=True, text=True, timeout=60, check=False)


def test_the_files_are_there() -> None:
    assert [p.name for p in RULES] == ["stacklens-alerts.yml", "stacklens-recording.yml"]
    assert RULE_TESTS


def test_config_is_valid_and_loads_both_rule_files(promtool: str) -> None:
    r = _run(promtool, "check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 2 rule files found" in r.stdout + r.stderr


def test_rules_are_valid(promtool: str) -> None:
    r = _run(promtool, "check", "rules", *(str(p) for p in RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (r.stdout + r.stderr).count("SUCCESS") == len(RULES)


def test_rule_unit_tests_pass(promtool: str) -> None:
    r = _run(promtool, "test", "rules", *(str(p) for p in RULE_TESTS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAILED" not in r.stdout + r.stderr
