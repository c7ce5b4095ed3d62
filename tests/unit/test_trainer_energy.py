"""Energy integration with fake counters. NVML itself cannot run here (no GPU and no
driver in the test environment); its counter goes through the same WrappingCounter."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetrain_trainer.energy import (
    MAX_PACKAGE_WATTS,
    MAX_POLL_SECONDS,
    EstimateMeter,
    PowerIntegrator,
    RaplMeter,
    WrappingCounter,
    ZeroMeter,
    open_meter,
    rapl_zones,
)
from tests.support.wait import wait_for


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_wrapping_counter_adds_across_a_wraparound() -> None:
    values = iter([900, 990, 20, 70])
    counter = WrappingCounter(lambda: next(values), max_range=1000)
    assert counter.update() == 90
    assert counter.update() == 90 + 30  # 990 -> 1000 -> 20
    assert counter.update() == 170


def test_counter_reset_without_range_loses_one_interval_only() -> None:
    values = iter([500, 600, 10, 40])
    counter = WrappingCounter(lambda: next(values))
    assert [counter.update() for _ in range(3)] == [100, 100, 130]


def test_power_integrator_uses_the_trapezoid_rule() -> None:
    clock = FakeClock()
    watts = iter([100.0, 300.0, 300.0])
    p = PowerIntegrator(lambda: next(watts), clock)
    clock.t += 2
    assert p.update() == pytest.approx(400.0)  # mean 200 W for 2 s
    clock.t += 1
    assert p.update() == pytest.approx(700.0)


def _zone(root: Path, name: str, energy: int, max_range: int) -> Path:
    z = root / name
    z.mkdir(parents=True)
    (z / "energy_uj").write_text(f"{energy}\n")
    (z / "max_energy_range_uj").write_text(f"{max_range}\n")
    return z


def test_rapl_meter_sums_packages_and_handles_wraparound(tmp_path: Path) -> None:
    z0 = _zone(tmp_path, "intel-rapl:0", 999_000_000, 1_000_000_000)
    z1 = _zone(tmp_path, "intel-rapl:1", 5_000_000, 1_000_000_000)
    _zone(tmp_path, "intel-rapl:0:0", 0, 1_000_000_000)  # a sub-zone of package 0
    zones = rapl_zones(str(tmp_path))
    assert [z.name for z in zones] == ["intel-rapl:0", "intel-rapl:1"]
    clock = FakeClock()
    meter = RaplMeter(zones, clock, poll_seconds=3600)
    assert meter.source == "rapl"
    (z0 / "energy_uj").write_text("4000000\n")  # wrapped: +1 J +4 J
    (z1 / "energy_uj").write_text("15000000\n")  # +10 J
    clock.t += 5
    assert meter.read() == pytest.approx(15.0)
    assert meter.power_watts == pytest.approx(3.0)


def test_rapl_wraps_between_two_reads_are_counted(tmp_path: Path) -> None:
    """Progress records can be further apart than a RAPL counter takes to wrap twice:
    the meter's own sampler sees every wrap, so read() still counts all the energy."""
    zone = _zone(tmp_path, "intel-rapl:0", 0, 1_000_000_000)  # wraps every 1000 J
    meter = RaplMeter([zone], poll_seconds=0.005)
    try:
        # 2.5 wraps between two reads: 600 J, 1200 J, 1900 J, 2500 J.
        for value in (600_000_000, 200_000_000, 900_000_000, 500_000_000):
            seen = meter.samples
            (zone / "energy_uj").write_text(f"{value}\n")
            wait_for(
                lambda seen=seen: meter.samples >= seen + 2,
                timeout=10,
                what="the RAPL sampler reading the counter",
                interval=0.001,
            )
        assert meter.read() == pytest.approx(2500.0)
    finally:
        meter.close()


def test_the_sampler_reads_at_least_twice_per_wrap() -> None:
    # 262 kJ at 1 kW wraps in 262 s; the meter reads at least every 10 s anyway.
    assert MAX_POLL_SECONDS <= 262_143_328_850 / 1e6 / MAX_PACKAGE_WATTS / 2


def test_estimate_uses_configured_watts(tmp_path: Path) -> None:
    clock = FakeClock()
    meter = EstimateMeter(250.0, clock)
    clock.t += 4
    assert meter.read() == pytest.approx(1000.0)
    assert meter.source == "estimate" and meter.power_watts == pytest.approx(250.0)


def test_open_meter_labels_its_source_and_counts_a_node_once() -> None:
    main = open_meter(
        cuda_index=None, local_rank=0, default_watts=65.0, environ={"KUBETRAIN_POWER_WATTS": "80"}
    )
    assert main.source in ("rapl", "estimate")
    if isinstance(main, EstimateMeter):
        assert main.watts == 80.0
    other = open_meter(cuda_index=None, local_rank=1, default_watts=65.0, environ={})
    assert isinstance(other, ZeroMeter) and other.read() == 0.0
    assert other.source == main.source
