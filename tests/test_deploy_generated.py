"""Files generated from one source, held equal to it, and deploy artefacts held to the code.

* ``deploy/k8s/prometheusrule.yaml`` and ``deploy/helm/meter/files/prometheus-rules.yaml``
  come from the rules files of ``deploy/prometheus/`` (the observability issue owns those).
* The settings table of ``docs/operations.md`` comes from ``meter.config.settings_table()``.

After changing a source, regenerate with::

    .venv/bin/python tests/test_deploy_generated.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
K8S_RULE = ROOT / "deploy" / "k8s" / "prometheusrule.yaml"
CHART = ROOT / "deploy" / "helm" / "meter"
CHART_RULES = CHART / "files" / "prometheus-rules.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"
TABLE_BEGIN = "<!-- settings table: generated from meter.config.settings_table(); do not edit -->"
TABLE_END = "<!-- end of settings table -->"


# --- generators ------------------------------------------------------------------------


def _yaml() -> Any:
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with meter's ops extra")

    base: Any = yaml.SafeDumper

    class Dumper(base):
        def increase_indent(self, flow: bool = False, indentless: bool = False) -> Any:
            return super().increase_indent(flow, False)  # indented sequences, as yamllint wants

    def text(dumper: Any, value: str) -> Any:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return yaml, Dumper


def rule_files() -> list[Path]:
    """deploy/prometheus files holding rule groups (not the scrape config, not rule tests)."""
    yaml, _ = _yaml()
    found = []
    for path in sorted(PROMETHEUS.glob("*.y*ml")):
        doc = yaml.safe_load(path.read_text())
        if isinstance(doc, dict) and "groups" in doc and "tests" not in doc:
            found.append(path)
    return found


def rule_groups() -> list[dict[str, Any]]:
    yaml, _ = _yaml()
    groups: list[dict[str, Any]] = []
    for path in rule_files():
        groups.extend(yaml.safe_load(path.read_text())["groups"] or [])
    return groups


def _dump(doc: Any) -> str:
    yaml, dumper = _yaml()
    return str(yaml.dump(doc, Dumper=dumper, sort_keys=False, width=100, allow_unicode=True))


def k8s_prometheus_rule() -> str:
    sources = ", ".join(f"deploy/prometheus/{p.name}" for p in rule_files())
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "meter", "namespace": "meter", "labels": {"app.kubernetes.io/name": "meter"}},
        "spec": {"groups": rule_groups()},
    }
    header = (
        "---\n# Generated from " + (sources or "deploy/prometheus (no rules files yet)") + "\n"
        "# by tests/test_deploy_generated.py; edit those files, then regenerate.\n"
    )
    return header + _dump(doc)


def chart_rules() -> str:
    header = "---\n# Generated from deploy/prometheus by tests/test_deploy_generated.py; do not edit.\n"
    return header + _dump({"groups": rule_groups()})


def settings_markdown() -> str:
    from meter.config import settings_table

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for flag, env, default, help_text in settings_table():
        lines.append(f"| `{flag}` | `{env}` | `{cell(default)}` | {cell(help_text)} |")
    return "\n".join([TABLE_BEGIN, *lines, TABLE_END])


def operations_with_table(text: str) -> str:
    pattern = re.compile(re.escape(TABLE_BEGIN) + r".*?" + re.escape(TABLE_END), re.S)
    if not pattern.search(text):
        raise AssertionError(f"{OPERATIONS} lacks the settings table markers")
    return pattern.sub(lambda _: settings_markdown(), text)


def write_all() -> None:
    K8S_RULE.write_text(k8s_prometheus_rule())
    CHART_RULES.write_text(chart_rules())
    OPERATIONS.write_text(operations_with_table(OPERATIONS.read_text()))


# --- tests -------------------------------------------------------------------------------


def test_rules_files_exist() -> None:
    assert rule_files(), "deploy/prometheus has no rules files: the PrometheusRule would be empty"


def test_k8s_prometheus_rule_is_generated_from_deploy_prometheus() -> None:
    assert K8S_RULE.read_text() == k8s_prometheus_rule(), (
        "run: .venv/bin/python tests/test_deploy_generated.py"
    )


def test_chart_rules_are_generated_from_deploy_prometheus() -> None:
    assert CHART_RULES.read_text() == chart_rules(), "run: .venv/bin/python tests/test_deploy_generated.py"


def test_operations_doc_lists_every_setting() -> None:
    from meter.config import SETTINGS

    text = OPERATIONS.read_text()
    assert text == operations_with_table(text), "run: .venv/bin/python tests/test_deploy_generated.py"
    for setting in SETTINGS:
        assert f"`{setting.flag}`" in text and f"`{setting.env}`" in text, setting.name


def test_chart_version_is_meter_version() -> None:
    yaml, _ = _yaml()
    from meter._version import __version__

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__
    assert chart["version"] == __version__
    k8s_image = (ROOT / "deploy" / "k8s" / "statefulset.yaml").read_text()
    assert f"image: meter:{__version__}\n" in k8s_image


def test_changelog_names_the_version() -> None:
    from meter._version import __version__

    assert f"## {__version__}" in (ROOT / "CHANGELOG.md").read_text()


def _load_toml_config(text: str, tmp_path: Path, env: dict[str, str]) -> Any:
    from meter import config

    path = tmp_path / "meter.toml"
    path.write_text(text)
    return config.load(None, {"METER_CONFIG": str(path), **env})


def test_k8s_config_is_a_valid_meter_config(tmp_path: Path) -> None:
    yaml, _ = _yaml()
    doc = yaml.safe_load((ROOT / "deploy" / "k8s" / "configmap.yaml").read_text())
    settings = _load_toml_config(
        doc["data"]["meter.toml"],
        tmp_path,
        {"METER_INSTANCE_ID": "meter-0", "METER_KAFKA_SASL_PASSWORD": "s3cret"},
    )
    consumer = settings.consumer_settings()
    assert consumer["group.instance.id"] == "meter-0"
    assert consumer["session.timeout.ms"] == 6000
    assert consumer["sasl.password"] == "s3cret"
    assert "s3cret" not in repr(settings.redacted())
    assert settings.lake == "/lake" and settings.metrics_addr == "0.0.0.0:9464"


def test_systemd_config_example_is_a_valid_meter_config(tmp_path: Path) -> None:
    settings = _load_toml_config(
        (ROOT / "deploy" / "systemd" / "meter.toml").read_text(),
        tmp_path,
        {"METER_KAFKA_SASL_PASSWORD": "s3cret"},
    )
    assert settings.lake == "/srv/meter/lake"
    unit = (ROOT / "deploy" / "systemd" / "meter.service").read_text()
    assert f"ReadWritePaths={settings.lake}\n" in unit
    assert settings.consumer_settings()["group.instance.id"]


def test_systemd_env_example_names_only_meter_settings() -> None:
    from meter.config import SETTINGS

    known = {s.env for s in SETTINGS}
    for line in (ROOT / "deploy" / "systemd" / "meter.env").read_text().splitlines():
        line = line.lstrip("# ").strip()
        name = line.partition("=")[0]
        if re.fullmatch(r"METER_[A-Z0-9_]+", name):
            assert name in known or name.startswith("METER_KAFKA_"), name


def test_runbook_covers_every_alert() -> None:
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    alerts = [rule["alert"] for group in rule_groups() for rule in group["rules"] if "alert" in rule]
    assert alerts
    missing = [a for a in alerts if f"### {a}" not in runbook]
    assert not missing, f"docs/runbook.md has no section for {missing}"


if __name__ == "__main__":
    write_all()
    print(
        f"wrote {K8S_RULE.relative_to(ROOT)}, {CHART_RULES.relative_to(ROOT)}, {OPERATIONS.relative_to(ROOT)}"
    )
    sys.exit(0)
