"""Reading another process's CPU time and memory from /proc (Linux)."""

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


def rss_bytes(pid: int, proc: str | Path = "/proc") -> int:
    """Resident set size (VmRSS) of ``pid`` in bytes."""
    for line in Path(proc, str(pid), "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            parts = line.split()
            return int(parts[1]) * 1024  # always kB
    raise ValueError(f"no VmRSS in /proc/{pid}/status")


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
