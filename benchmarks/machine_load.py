"""How busy the machine was while a benchmark measured (a helper of the benchmarks, not one).

Times measured on a shared machine are only comparable with the load they were measured under,
so every benchmark prints, next to its numbers: the 1-minute load average (as ``uptime`` shows
it) before and after each timed section, and the share of all CPUs that *other* processes used
meanwhile (Linux ``/proc/stat`` busy time minus this process's and its reaped children's CPU
time).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass, field


def maxrss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB, macOS bytes)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def current_rss_mib() -> float:
    """Resident set size now, MiB (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return maxrss_mib()


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have used since boot (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as fh:
            ticks = [int(t) for t in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(ticks[:3]) + sum(ticks[5:8])  # user nice system . . irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def load_average() -> float:
    """The 1-minute load average (0.0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def cpu_name() -> str:
    """The CPU's model name (Linux), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


@dataclass
class LoadMeter:
    """Context manager around a timed section: load averages and other processes' CPU share.

    ``other_share`` is the fraction of all ``os.cpu_count()`` CPUs that other processes kept
    busy (0.5 on a 2-core machine: one core's worth), None where ``/proc/stat`` is missing.
    """

    load_before: float = 0.0
    load_after: float = 0.0
    other_share: float | None = None
    seconds: float = 0.0
    _start: tuple[float | None, float, float] = field(default=(None, 0.0, 0.0), repr=False)

    def __enter__(self) -> LoadMeter:
        self.load_before = load_average()
        self._start = (busy_cpu_seconds(), own_cpu_seconds(), time.monotonic())
        return self

    def __exit__(self, *exc: object) -> None:
        busy0, own0, t0 = self._start
        busy1, own1, t1 = busy_cpu_seconds(), own_cpu_seconds(), time.monotonic()
        self.load_after = load_average()
        self.seconds = t1 - t0
        if busy0 is not None and busy1 is not None and t1 > t0:
            other = (busy1 - busy0) - (own1 - own0)
            self.other_share = max(0.0, other) / ((t1 - t0) * (os.cpu_count() or 1))

    def text(self) -> str:
        """E.g. "load 3.41 -> 3.52, other processes 61 % of 2 CPUs"."""
        other = "?" if self.other_share is None else f"{100 * self.other_share:.0f} %"
        return (
            f"load {self.load_before:.2f} -> {self.load_after:.2f}, other processes {other} "
            f"of {os.cpu_count()} CPUs"
        )

    def as_dict(self) -> dict[str, float | None]:
        return {
            "load_before": self.load_before,
            "load_after": self.load_after,
            "other_processes_cpu_share": self.other_share,
            "seconds": self.seconds,
        }
