"""What the benchmarks read about processes and samples: /proc CPU and RSS, percentiles."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (nginx forks workers)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _stat_seconds(path: Path) -> float:
    f = path.read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of ``pids`` (all their threads)."""
    total = 0.0
    for p in pids:
        with contextlib.suppress(OSError):
            total += _stat_seconds(Path(f"/proc/{p}/stat"))
    return total


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """utime + stime of each thread of ``pid``, summed by thread name (``comm``)."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, IndexError, ValueError):
                name = (task / "comm").read_text().strip()
                out[name] = out.get(name, 0.0) + _stat_seconds(task / "stat")
    return out


def machine_cpu_seconds() -> dict[str, float]:
    """CPU seconds of the whole machine since boot, all cores (/proc/stat): ``busy`` (user,
    system, interrupts), ``steal`` (taken by the hypervisor from this VM), ``idle``."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already counted in user)
    return {
        "busy": (f[0] + f[1] + f[2] + f[5] + f[6]) / TICK,
        "steal": f[7] / TICK,
        "idle": (f[3] + f[4]) / TICK,
    }


def _status_mb(pids: list[int], key: str) -> float:
    total = 0
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(key):
                    total += int(line.split()[1])
    return total / 1024


def rss_mb(pids: list[int]) -> float:
    return _status_mb(pids, "VmRSS:")


def peak_rss_mb(pids: list[int]) -> float:
    """The largest RSS each process ever had (VmHWM), summed."""
    return _status_mb(pids, "VmHWM:")


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``values``."""
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]
