"""Shared by the benchmark scripts: machine description and dated entries in ``RESULTS.md``."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().with_name("RESULTS.md")
RESULTS_HEADER = """# Benchmark results

Dated entries appended by the scripts in this folder (newest last).
"""


def git_commit() -> str:
    """The short commit of the checkout, flagged when the package has uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "align_lightning"], cwd=REPO).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit} (+ uncommitted changes in align_lightning/)" if dirty else commit


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or what the platform reports)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    return name or platform.processor() or platform.machine()


def memory_gib() -> float:
    """Physical memory in GiB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def append_entry(title: str, lines: list[str], table: list[str]) -> None:
    """Append a dated entry (title, bullet lines, the command that ran, a table) to ``RESULTS.md``; never rewrite."""
    if not RESULTS.exists():
        RESULTS.write_text(RESULTS_HEADER)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = f"- Command: `{shlex.join(['python', *sys.argv])}`"
    entry = [f"\n## {stamp} - {title}\n", *lines[:2], command, *lines[2:], "", *table]
    with RESULTS.open("a") as f:
        f.write("\n".join(entry) + "\n")
