"""CPU seconds and memory of a process, read from /proc (Linux only).

- CPU: ``utime + stime`` of /proc/PID/stat (every thread of the process), in seconds.
- Memory: ``VmRSS`` (resident now) and ``VmHWM`` (peak resident) of /proc/PID/status.
  Writing ``5`` to /proc/PID/clear_refs resets the peak to the current RSS (Linux 4.0+),
  so a phase's peak is read as: reset, run the phase, read ``VmHWM``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
KIB = 1024
MIB = 1024 * 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLOCK_TICKS


def memory_kib(pid: int, field: str) -> int:
    """A ``Vm*`` line of /proc/PID/status (``VmRSS``, ``VmHWM``), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(f"no {field} in /proc/{pid}/status")


def rss_bytes(pid: int) -> int:
    return memory_kib(pid, "VmRSS") * KIB


def peak_rss_bytes(pid: int) -> int:
    return memory_kib(pid, "VmHWM") * KIB


def reset_peak(pid: int) -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS; False if the kernel refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class CpuMeter:
    """CPU seconds of several processes between ``start`` and ``stop``."""

    pids: dict[str, int]

    def start(self) -> None:
        self._before = {label: cpu_seconds(pid) for label, pid in self.pids.items()}
        self.used: dict[str, float] = {}

    def stop(self) -> dict[str, float]:
        self.used = {label: cpu_seconds(pid) - self._before[label] for label, pid in self.pids.items()}
        return self.used


@dataclass
class PeakMeter:
    """Peak RSS growth of several processes over a phase: ``VmHWM`` after it, less
    ``VmRSS`` before it (the peak reset to the RSS at ``start``)."""

    pids: dict[str, int]

    def start(self) -> None:
        self._before = {label: rss_bytes(pid) for label, pid in self.pids.items()}
        self.reset = all(reset_peak(pid) for pid in self.pids.values())

    def stop(self) -> dict[str, dict[str, int]]:
        """Per process: ``rss_before``, ``peak``, ``growth`` (bytes)."""
        out = {}
        for label, pid in self.pids.items():
            peak = peak_rss_bytes(pid)
            out[label] = {
                "rss_before": self._before[label],
                "peak": peak,
                "growth": peak - self._before[label],
            }
        return out
