#!/usr/bin/env bash
# Install time of the README's two install lines, each in a fresh venv with nothing cached (PIP_NO_CACHE_DIR=1).
# Prints one JSON line: install_s (line 1: the package), install_test_s (line 2: the package with [test]), the
# CPU seconds of each (user + system: what the load does not change), how many
# versions pip fetched and for which projects it fetched more than one (the resolver backtracked on them), pip and
# python versions, and the load average before and after (the machine is shared: read the seconds with it).
#
#   bash benchmarks/install_time.sh            # from anywhere; PYTHON=python3.12 to use another interpreter
#   INSTALL_LOG_DIR=/tmp/logs bash benchmarks/install_time.sh   # keep pip's output of each line there
#
# The lines are read from README.md (the first two `pip install torch…` lines, without what runs after the install),
# so this measures what a new user types. torch comes from wherever pip finds it (here: a local wheel).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/ddpmseg-install-XXXXXX")
trap 'rm -rf "$work"' EXIT
logs=${INSTALL_LOG_DIR:-$work/logs}
mkdir -p "$logs"

mapfile -t lines < <(grep -m2 '^pip install torch' "$repo/README.md" | sed -E 's/ && (ddpmseg|python -m pytest).*//')
if [[ ${#lines[@]} -ne 2 || ${lines[1]} != *'[test]'* ]]; then
    echo "install_time.sh: expected two 'pip install torch…' lines in $repo/README.md, the second with [test]" >&2
    exit 2
fi

export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
load() { cut -d' ' -f1-3 /proc/loadavg | tr ' ' ','; }
load_before=$(load)

# run_line NAME LINE: a fresh venv, the line run in the repository with that venv first on PATH; writes
# "wall_s cpu_s" (cpu: user + system of every process the line ran) to $work/NAME.time.
run_line() {
    local name=$1 line=$2 venv="$work/venv-$1" start end
    "$python" -m venv "$venv"
    start=$(date +%s.%N)
    if ! (cd "$repo" && PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv" bash -c "$line" || exit
          times >"$work/$name.cpu") >"$logs/$name.log" 2>&1; then
        echo "install_time.sh: '$line' failed; last lines of its output:" >&2
        tail -20 "$logs/$name.log" >&2
        exit 1
    fi
    end=$(date +%s.%N)
    # times, line 2: "0m12.340s 0m3.210s" (children's user, system)
    awk -v s="$start" -v e="$end" 'NR == 2 { split($1, u, /[ms]/); split($2, y, /[ms]/)
        printf "%.1f %.1f\n", e - s, u[1] * 60 + u[2] + y[1] * 60 + y[2] }' "$work/$name.cpu" >"$work/$name.time"
}

run_line main "${lines[0]}"
run_line test "${lines[1]}"
read -r install_s install_cpu_s <"$work/main.time"
read -r install_test_s install_test_cpu_s <"$work/test.time"
load_after=$(load)
pip_version=$("$work/venv-test/bin/python" -m pip --version | cut -d' ' -f2)

"$python" - "$logs" "$install_s" "$install_test_s" "$install_cpu_s" "$install_test_cpu_s" "$pip_version" \
    "$load_before" "$load_after" "${lines[@]}" <<'EOF'
import collections, json, os, platform, re, sys

(logs, install_s, install_test_s, install_cpu_s, install_test_cpu_s, pip_version, load_before, load_after, line_main,
 line_test) = sys.argv[1:11]
fetched = {}
for name in ("main", "test"):
    versions = collections.defaultdict(set)
    for text in open(os.path.join(logs, f"{name}.log"), errors="replace"):
        # "Downloading boto3-1.44.8-py3-none-any.whl (140 kB)" / "Processing /opt/…/numpy-2.4.6-cp311-….whl"
        m = re.search(r"(?:Downloading|Processing|Using cached) (?:\S*/)?([A-Za-z0-9_.]+?)-(\d[0-9A-Za-z.+!]*?)"
                      r"(?:-py|-cp|\.tar\.gz|\.zip)", text)
        if m:
            versions[re.sub(r"[-_.]+", "-", m.group(1)).lower()].add(m.group(2))
    fetched[name] = {"projects": len(versions), "versions": sum(map(len, versions.values())),
                     "more_than_one": {k: len(v) for k, v in sorted(versions.items()) if len(v) > 1}}
print(json.dumps({
    "install_s": float(install_s), "install_test_s": float(install_test_s),
    "install_cpu_s": float(install_cpu_s), "install_test_cpu_s": float(install_test_cpu_s),
    "fetched": fetched, "pip": pip_version, "python": platform.python_version(), "nproc": os.cpu_count(),
    "load_before": [float(x) for x in load_before.split(",")], "load_after": [float(x) for x in load_after.split(",")],
    "lines": [line_main, line_test],
}))
EOF
