"""The operator configuration file the Helm chart renders."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetrain.core.api import Pricing
from kubetrain.operator.config import ConfigError, OperatorConfig, effective_pricing, load_config


def test_defaults_without_a_file() -> None:
    cfg = load_config(None)
    assert cfg.poll_interval_seconds > 0 and cfg.termination_grace_seconds == 300


def test_camel_case_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "image: my/trainer:2\ngpuPrices: {h100: 1.9}\npollIntervalSeconds: 5\n"
        "stallTimeoutSeconds: 0\npue: 1.1\n"
    )
    cfg = load_config(str(path))
    assert cfg.image == "my/trainer:2" and cfg.gpu_prices == {"h100": 1.9}
    assert cfg.poll_interval_seconds == 5 and cfg.stall_timeout_seconds == 0


def test_units_spelled_as_in_the_trainingrun_api(tmp_path: Path) -> None:
    """Pricing fields carry the API's names (spec.pricing.energyUSDPerKWh), not
    pydantic's plain camelCase (energyUsdPerKwh)."""
    path = tmp_path / "config.yaml"
    path.write_text("energyUSDPerKWh: 0.2\ncarbonGramsPerKWh: 300\n")
    cfg = load_config(str(path))
    assert (cfg.energy_usd_per_kwh, cfg.carbon_grams_per_kwh) == (0.2, 300)
    pricing_names = {f.alias for f in Pricing.model_fields.values()}
    assert {"energyUSDPerKWh", "carbonGramsPerKWh"} <= pricing_names
    assert {f.alias for f in OperatorConfig.model_fields.values()} >= {
        "energyUSDPerKWh",
        "carbonGramsPerKWh",
    }
    path.write_text("energyUsdPerKwh: 0.2\n")
    with pytest.raises(ConfigError, match="energyUsdPerKwh"):
        load_config(str(path))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("pollIntervalSeconds: -1\n", "pollIntervalSeconds"),
        ("imagePullPolicy: Sometimes\n", "imagePullPolicy"),
        ("surprise: 1\n", "surprise"),
        ("- a list\n", "mapping"),
    ],
)
def test_invalid_file_names_the_field(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(str(path))


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config("/nonexistent/kubetrain.yaml")


def test_manifest_pricing_wins_over_operator_defaults() -> None:
    cfg = OperatorConfig(pue=1.5, carbon_grams_per_kwh=100, energy_usd_per_kwh=0.2)
    assert effective_pricing(Pricing(), cfg).pue == 1.5
    given = Pricing.model_validate({"pue": 1.1, "carbonGramsPerKWh": 50})
    out = effective_pricing(given, cfg)
    assert (out.pue, out.carbon_grams_per_kwh, out.energy_usd_per_kwh) == (1.1, 50, 0.2)


def test_operator_and_status_without_cluster_fail_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetrain.cli.main import main

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    assert main(["operator", "--kubeconfig", str(tmp_path / "missing-kubeconfig")]) == 2
    assert main(["status"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert all(line.startswith("kubetrain: no Kubernetes cluster configured") for line in err)


def test_operator_with_bad_config_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kubetrain.cli.main import main

    path = tmp_path / "c.yaml"
    path.write_text("pollIntervalSeconds: 0\n")
    assert main(["operator", "--config", str(path)]) == 2
    assert "pollIntervalSeconds" in capsys.readouterr().err
