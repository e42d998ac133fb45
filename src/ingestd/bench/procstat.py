"""Reading another process's CPU time, scheduling delay and memory from /proc (Linux)."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_seconds(pid: int, proc: str | Path = "/proc") -> float:
    """utime + stime of ``pid`` (and its waited-for children are not counted), in seconds."""
    text = Path(proc, str(pid), "stat").read_text()
    # The command name (field 2) is in parentheses and may contain spaces.
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    utime, stime = int(rest[11]), int(rest[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def runqueue_wait_seconds(pid: int | str, proc: str | Path = "/proc") -> float | None:
    """Seconds ``pid``'s main thread (a broker's event loop) has been runnable but
    waiting for a CPU, or None where the kernel keeps no scheduler statistics.

    ``/proc/<pid>/schedstat`` is "time on CPU, time waiting on a run queue (both
    ns), time slices". On a shared host the wait is what other processes cost
    this one: a stall that is waiting here is not the process's own work.
    """
    try:
        text = Path(proc, str(pid), "schedstat").read_text()
    except FileNotFoundError:
        return None
    return int(text.split()[1]) / 1e9


def tree_cpu_seconds(pid: int, proc: str | Path = "/proc") -> float:
    """CPU seconds of ``pid``, its exited children it has waited for, and its live children.

    For a PostgreSQL postmaster this is the server's CPU: every backend is a
    child, and an exited backend's time moves into the postmaster's cutime and
    cstime when it is reaped. (A backend older than the first reading that exits
    before the second is counted whole: read around an interval in which the
    connections of interest are opened, or stay open.)
    """
    text = Path(proc, str(pid), "stat").read_text()
    rest = text[text.rindex(")") + 2 :].split()
    ticks = sum(int(x) for x in rest[11:15])  # utime, stime, cutime, cstime
    for child in _children(pid, proc):
        try:
            t = Path(proc, str(child), "stat").read_text()
        except OSError:
            continue  # gone (its time is in our cutime once reaped)
        r = t[t.rindex(")") + 2 :].split()
        ticks += int(r[11]) + int(r[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _children(pid: int, proc: str | Path) -> list[int]:
    """Live children of ``pid``: the kernel's per-thread lists (fast), else a scan of
    every process's parent (kernels without /proc/<pid>/task/<tid>/children)."""
    task = Path(proc, str(pid), "task")
    try:
        return [
            int(c)
            for tid in os.listdir(task)
            for c in (task / tid / "children").read_text().split()
        ]
    except FileNotFoundError:
        pass
    kids = []
    for d in os.listdir(proc):
        if not d.isdigit() or d == str(pid):
            continue
        try:
            t = Path(proc, d, "stat").read_text()
        except OSError:
            continue
        if int(t[t.rindex(")") + 2 :].split()[1]) == pid:  # ppid
            kids.append(int(d))
    return kids


def rss_bytes(pid: int, proc: str | Path = "/proc") -> int:
    """Resident set size (VmRSS) of ``pid`` in bytes."""
    for line in Path(proc, str(pid), "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            parts = line.split()
            return int(parts[1]) * 1024  # always kB
    raise ValueError(f"no VmRSS in /proc/{pid}/status")


def tree_rss_bytes(pid: int, proc: str | Path = "/proc") -> int:
    """VmRSS of ``pid`` plus that of its live children, in bytes: a broker that runs
    ``--workers N`` holds its connections in its children (one process with no
    children: its own RSS). Pages a child shares with its parent since the fork
    are counted in both; measure growth (a difference of two readings), in which
    they cancel out."""
    total = rss_bytes(pid, proc)
    for child in _children(pid, proc):
        try:
            total += rss_bytes(child, proc)
        except (OSError, ValueError):
            continue  # gone, or a zombie (no VmRSS)
    return total


def threads(pid: int, proc: str | Path = "/proc") -> int:
    for line in Path(proc, str(pid), "status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


# The broker's worst event-loop stall since the previous scrape (ingestd's /metrics).
LOOP_LAG_MAX = "ingestd_event_loop_lag_max_seconds"


def scrape_metric(url: str, name: str, timeout: float = 5.0) -> float:
    """The value of the unlabelled sample ``name`` on the Prometheus text page at ``url``.

    Raises ValueError when the page has no such sample, OSError when it cannot be read.
    """
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode("utf-8", "replace")
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
            return float(line.rsplit(None, 1)[-1])
    raise ValueError(f"no {name} sample at {url}")
