"""The README's install lines are what CI and benchmarks/install_time.sh run; the [test] pins that keep pip from
backtracking stay (parsed, nothing installed)."""
from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent


def readme_install_lines() -> list[str]:
    """README's `pip install torch…` lines without what runs after the install (the demo, the tests)."""
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("pip install torch")]
    return [re.sub(r" && (ddpmseg|python -m pytest).*", "", line) for line in lines[:2]]


def test_readme_installs_cpu_torch_first_then_the_package():
    assert readme_install_lines() == ['pip install torch==2.13.0 && pip install -e .',
                                      'pip install torch==2.13.0 && pip install -e ".[test]"']


def test_ci_runs_the_readme_test_install_line():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_install_lines()[1] in ci
    assert not [line for line in ci if "pip install" in line and line != readme_install_lines()[1]]


def test_the_install_benchmark_reads_the_same_lines():
    script = (ROOT / "benchmarks" / "install_time.sh").read_text()
    grep = re.search(r"mapfile -t lines < <\((.*)\)$", script, re.M).group(1).replace('"$repo/README.md"', "README.md")
    out = subprocess.run(["bash", "-c", grep], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == readme_install_lines()


def test_boto3_and_aiobotocore_stay_bounded_in_test_extra():
    """Unbounded, pip tries the newest boto3, whose botocore no aiobotocore accepts, and backtracks for most of an
    hour (issue 13). Both ends of the pair are bounded."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    spec = {re.match(r"[A-Za-z0-9_.\-\[\]]+", r).group(0): r for r in extra}
    for name in ("boto3", "aiobotocore"):
        assert "<" in spec[name], spec
