"""CLI start-up: wall time of `ddpmseg --help` and of `ddpmseg status` on the demo-sized experiment, each in a
fresh process (interpreter start and imports included: what a user waits for), their CPU time (user + system:
what the wall time approaches on an idle machine), and which heavy modules each
command imports (`python -X importtime` totals; torch and Prefect should load only where a command needs them).

    python -m benchmarks.cli [--repeats 3]     prints one JSON object
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, child_env, emit, log
from benchmarks.noop import write_small_experiment

HEAVY = ("torch", "prefect", "zarr", "dask", "xarray", "guided_diffusion", "albumentations")
# imports the command, runs it, then reports which heavy top-level packages it loaded (on stderr, last line)
_PROBE = ("import sys; from flows.cli import main\n"
          "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as exit:\n    code = exit.code\n"
          f"print('HEAVY ' + ' '.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
          "sys.exit(code or 0)")


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished children: on a loaded machine, a bound on the
    wall time the same command takes on an idle one (single-threaded start-up)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _command(args: list[str]) -> list[str]:
    return [sys.executable, "-c", _PROBE, *args]


def time_command(args: list[str], repeats: int) -> dict[str, Any]:
    """Median wall time of `ddpmseg <args>` over `repeats` fresh processes, the heavy packages it imported and
    the total import time (`-X importtime`, cumulative over top-level imports)."""
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), _children_cpu_s()
        proc = subprocess.run(_command(args), cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True)
        walls.append(time.perf_counter() - start)
        cpus.append(_children_cpu_s() - cpu)
        if proc.returncode != 0:
            raise RuntimeError(f"ddpmseg {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    proc = subprocess.run([sys.executable, "-X", "importtime", *_command(args)[1:]], cwd=REPO_ROOT, env=child_env(),
                          capture_output=True, text=True)
    heavy = next((line.split()[1:] for line in proc.stderr.splitlines() if line.startswith("HEAVY")), None)
    if proc.returncode != 0 or heavy is None:
        raise RuntimeError(f"ddpmseg {' '.join(args)} under -X importtime exited {proc.returncode}: "
                           f"{proc.stderr[-2000:]}")
    top = [int(m.group(1)) for m in re.finditer(r"import time:\s+\d+ \|\s+(\d+) \| \S", proc.stderr)]
    return {"wall_s": statistics.median(walls), "walls_s": walls, "cpu_s": statistics.median(cpus),
            "heavy_imports": heavy,
            "import_time_s": sum(top) / 1e6}


def run_cli(workdir: Path, repeats: int = 3) -> dict[str, Any]:
    """{"cli_help_s", "cli_status_s", "details"}: see the module doc."""
    config = write_small_experiment(Path(workdir))
    log("cli: ddpmseg --help")
    help_ = time_command(["--help"], repeats)
    log("cli: ddpmseg status (demo-sized config)")
    time_command(["status", str(config)], 1)  # first call creates the empty store
    status = time_command(["status", str(config)], repeats)
    return {"cli_help_s": help_["wall_s"], "cli_status_s": status["wall_s"], "cli_help_cpu_s": help_["cpu_s"],
            "cli_status_cpu_s": status["cpu_s"],
            "details": {"help": help_, "status": status}}


def main(argv: list[str] | None = None) -> int:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ddpmseg-cli-") as tmp:
        emit(run_cli(Path(tmp), args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
