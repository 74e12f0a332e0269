"""Shared helpers: the machine, peak memory of a process, child processes, logging."""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
MB = 1024 * 1024


class BenchmarkError(RuntimeError):
    """A benchmark step that failed (a child process that crashed, a result that makes no sense)."""


def log(message: str) -> None:
    """Progress line on stderr (stdout carries the results)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _proc_status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB.

    VmHWM of /proc/self/status (the high-water mark of this process image's own memory). ru_maxrss is only a
    fallback: on Linux it also keeps the RSS of the process image replaced by exec, so a child spawned by a big
    parent would report the parent's size.
    """
    hwm = _proc_status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    rss = _proc_status_mb("VmRSS")
    return rss if rss is not None else float("nan")


def mem_available_mb() -> float:
    """MemAvailable of /proc/meminfo in MB (inf where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return float("nan")


def machine_info() -> dict[str, Any]:
    """nproc, RAM, CPU model, torch / Python versions and the load average (the machine may be shared)."""
    import torch

    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gb": _mem_total_gb(),
        "cpu_model": _cpu_model(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cuda": torch.cuda.is_available(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def emit(result: dict[str, Any]) -> None:
    """A child's result: one JSON object, the last line of stdout."""
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def run_child(module: str, args: list[str], timeout: float = 1800) -> dict[str, Any]:
    """Run `python -m <module> <args>` in a fresh process from the repository root; returns the JSON object on
    the last line of its stdout, plus "wall_s" (the child's whole wall time, interpreter start included)."""
    cmd = [sys.executable, "-m", module, *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise BenchmarkError(f"{' '.join(cmd[1:])} exited with status {proc.returncode}; stderr tail:\n"
                             f"{proc.stderr[-3000:]}")
    try:
        result = json.loads(lines[-1])
    except ValueError as err:
        raise BenchmarkError(f"{' '.join(cmd[1:])}: last stdout line is not JSON: {lines[-1][:300]!r}") from err
    result["wall_s"] = wall
    return result


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of ys against xs (at least two distinct xs)."""
    if len(set(xs)) < 2:
        raise ValueError(f"a slope needs at least two distinct x values, got {xs}")
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


def dir_bytes(path: Path) -> int:
    """Sum of the sizes of the files under `path` (apparent bytes: what an object store would hold)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(root, name))
    return total
