"""Energy of this process's device: measured where possible, estimated otherwise.

Sources, best first, always reported with the number:
- ``nvml``: the GPU's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``,
  millijoules, Volta and newer); on older GPUs the power reading integrated over time.
- ``rapl``: on CPU, the package energy counters
  ``/sys/class/powercap/intel-rapl:<n>/energy_uj`` (they wrap at
  ``max_energy_range_uj``, so a background thread reads them often enough to see every
  wrap); only one process per node reads them, so DDP ranks sharing a node do not count
  the same joules twice.
- ``estimate``: configured watts (``KUBETRAIN_POWER_WATTS``, else the accelerator
  table's board power) × wall time.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kubetrain.core import contract

log = logging.getLogger("kubetrain_trainer.energy")

Clock = Callable[[], float]
# The most a CPU package draws (RAPL's counters wrap soonest at this power), and the
# longest the meter waits between two reads of them.
MAX_PACKAGE_WATTS = 1000.0
MAX_POLL_SECONDS = 10.0


class WrappingCounter:
    """Accumulates a hardware counter that wraps around at ``max_range``.

    ``read`` returns the raw counter; each ``update`` adds the increase since the last
    one, assuming at most one wrap between updates (RAPL wraps after minutes to hours,
    updates come every few seconds).
    """

    def __init__(self, read: Callable[[], int], max_range: int | None = None):
        self.read = read
        self.max_range = max_range
        self.last = read()
        self.total = 0

    def update(self) -> int:
        now = self.read()
        delta = now - self.last
        if delta < 0:
            delta += self.max_range if self.max_range else 0
            if delta < 0 or not self.max_range:
                delta = 0  # a counter reset (driver reload): lose one interval, not more
        self.total += delta
        self.last = now
        return self.total


class PowerIntegrator:
    """Energy from power samples (watts), trapezoid rule over time."""

    def __init__(self, read_watts: Callable[[], float], clock: Clock = time.monotonic):
        self.read_watts, self.clock = read_watts, clock
        self.t = clock()
        self.w = read_watts()
        self.joules = 0.0

    def update(self) -> float:
        t, w = self.clock(), self.read_watts()
        self.joules += 0.5 * (w + self.w) * (t - self.t)
        self.t, self.w = t, w
        return self.joules


class EnergyMeter:
    """Joules since the meter started, and the mean power over the last interval."""

    source: str = "estimate"

    def __init__(self, clock: Clock = time.monotonic):
        self.clock = clock
        self._t = clock()
        self._j = 0.0
        self.power_watts = 0.0

    def _joules(self) -> float:
        raise NotImplementedError

    def read(self) -> float:
        """Update from the counters; joules since start."""
        j, t = self._joules(), self.clock()
        if t > self._t:
            self.power_watts = (j - self._j) / (t - self._t)
        self._t, self._j = t, j
        return j


class EstimateMeter(EnergyMeter):
    source = "estimate"

    def __init__(self, watts: float, clock: Clock = time.monotonic):
        super().__init__(clock)
        self.watts = watts
        self.start = clock()

    def _joules(self) -> float:
        return self.watts * (self.clock() - self.start)


class RaplMeter(EnergyMeter):
    """Package energy from RAPL counters, sampled by a background thread.

    The counters wrap at ``max_energy_range_uj`` (typically 262 kJ: about 12 minutes
    of a 350 W package), and a wrap is only seen as such when no second one comes
    before the next read. Progress records can be many minutes apart (``logEvery``
    steps of a large model), so the meter does not wait for them: it reads the counters
    at least twice per the shortest wrap period at :data:`MAX_PACKAGE_WATTS`.
    """

    source = "rapl"

    def __init__(
        self,
        zones: list[Path],
        clock: Clock = time.monotonic,
        *,
        poll_seconds: float | None = None,
    ):
        super().__init__(clock)

        def reader(path: Path) -> Callable[[], int]:
            return lambda: int(path.joinpath("energy_uj").read_text())

        ranges = [int(z.joinpath("max_energy_range_uj").read_text()) for z in zones]
        self.counters = [WrappingCounter(reader(z), r) for z, r in zip(zones, ranges, strict=True)]
        self.poll_seconds = poll_seconds or min(
            MAX_POLL_SECONDS, min(ranges, default=0) / 1e6 / MAX_PACKAGE_WATTS / 2
        )
        self.samples = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="rapl-sampler", daemon=True)
        self._thread.start()

    def sample(self) -> float:
        """Read every counter now; joules since the meter started."""
        with self._lock:
            total = sum(c.update() for c in self.counters)
            self.samples += 1
        return total / 1e6

    def _poll(self) -> None:
        warned = False
        while not self._stop.wait(self.poll_seconds):
            try:
                self.sample()
            except (OSError, ValueError) as exc:  # unreadable for now: try again next time
                if not warned:
                    log.warning("reading the RAPL counters failed (will retry): %s", exc)
                    warned = True

    def close(self) -> None:
        self._stop.set()

    def _joules(self) -> float:
        return self.sample()


class NvmlMeter(EnergyMeter):
    source = "nvml"

    def __init__(self, index: int, clock: Clock = time.monotonic):
        import pynvml

        super().__init__(clock)
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.counter: WrappingCounter | None = None
        self.integrator: PowerIntegrator | None = None
        try:
            # Millijoules since the driver loaded; a 64-bit counter that does not wrap.
            self.counter = WrappingCounter(
                lambda: int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
            )
        except pynvml.NVMLError:
            self.integrator = PowerIntegrator(
                lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0, clock
            )

    def _joules(self) -> float:
        if self.counter is not None:
            return self.counter.update() / 1000.0
        assert self.integrator is not None
        return self.integrator.update()


def rapl_zones(root: str = "/sys/class/powercap") -> list[Path]:
    """Readable top-level RAPL package zones (sub-zones are contained in them)."""
    zones = []
    for z in sorted(glob.glob(os.path.join(root, "intel-rapl:*"))):
        path = Path(z)
        if path.name.count(":") != 1:
            continue
        try:
            int(path.joinpath("energy_uj").read_text())
            int(path.joinpath("max_energy_range_uj").read_text())
        except (OSError, ValueError):
            continue  # root-only on most kernels since 2020 (CVE-2020-8694)
        zones.append(path)
    return zones


class ZeroMeter(EnergyMeter):
    """A rank whose node's energy another rank of the same node already counts."""

    def __init__(self, source: str, clock: Clock = time.monotonic):
        super().__init__(clock)
        self.source = source

    def _joules(self) -> float:
        return 0.0


def open_meter(
    *,
    cuda_index: int | None,
    local_rank: int,
    default_watts: float,
    environ: dict[str, str] | None = None,
) -> EnergyMeter:
    """The best meter this process can have (see the module docstring)."""
    env = os.environ if environ is None else environ
    configured = env.get(contract.ENV_POWER_WATTS)
    watts = float(configured) if configured else default_watts
    if cuda_index is not None:
        try:
            return NvmlMeter(cuda_index)
        except Exception as exc:  # no driver library, old GPU, container without NVML
            log.warning("NVML unavailable (%s): energy is estimated from %.0f W", exc, watts)
            return EstimateMeter(watts)
    # CPU: one meter per node, on local rank 0.
    zones = rapl_zones()
    if zones:
        return RaplMeter(zones) if local_rank == 0 else ZeroMeter("rapl")
    return EstimateMeter(watts) if local_rank == 0 else ZeroMeter("estimate")
