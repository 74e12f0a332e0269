"""Terminal output: plain progress lines off a terminal, the demo's text table."""
from __future__ import annotations

import io

import pytest

from flows.demo import format_table
from pipeline import synthetic
from pipeline.progress import QUARTERS, PlainProgress, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_off_a_terminal_is_a_few_plain_lines():
    stream = io.StringIO()
    for _ in progress_bar(range(1000), desc="ddpm s0 extract train", unit="fwd", stream=stream):
        pass
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == len(QUARTERS)
    assert lines[0].startswith("ddpm s0 extract train: 250/1000 fwd (25%)")
    assert lines[-1].startswith("ddpm s0 extract train: 1000/1000 fwd (100%)")


def test_progress_of_unknown_length_off_a_terminal_is_one_line_with_its_postfix():
    stream = io.StringIO()
    bar = progress_bar(desc="rgb s1 member 2/10", unit="it", stream=stream)
    for i in range(500):
        bar.update(1)
        if i % 50 == 0:
            bar.set_postfix(epoch=i // 100, loss="0.1234")
    bar.close()
    bar.close()  # closing twice writes nothing more
    assert stream.getvalue() == "rgb s1 member 2/10: 500 it, 0 s, epoch=4, loss=0.1234\n"


def test_progress_interval_adds_lines_while_a_long_loop_runs(monkeypatch):
    clock = iter(range(0, 10_000, 10))  # every call to time.monotonic advances 10 s
    monkeypatch.setattr("pipeline.progress.time.monotonic", lambda: next(clock))
    stream = io.StringIO()
    bar = PlainProgress(desc="evaluate", total=100, unit="img", stream=stream, interval=30)
    for _ in range(10):  # 10 % in ~100 s: no quarter reached, lines from the interval
        bar.update(1)
    assert 2 <= len(stream.getvalue().splitlines()) <= 4
    bar.close()
    assert stream.getvalue().splitlines()[-1].startswith("evaluate: 10/100 img (10%)")


def test_progress_on_a_terminal_is_a_tqdm_bar_and_disabled_writes_nothing():
    terminal = _Terminal()
    for _ in progress_bar(range(3), desc="ddpm s0 evaluate", unit="img", stream=terminal):
        pass
    assert "\r" in terminal.getvalue() and "ddpm s0 evaluate" in terminal.getvalue()
    quiet = io.StringIO()
    for _ in progress_bar(range(3), desc="x", enabled=False, stream=quiet):
        pass
    assert quiet.getvalue() == ""


def _entry(per_seed: dict[str, float], std: float) -> dict:
    return {"miou": 40.93, "miou_std": std, "per_seed": per_seed, "pixel_accuracy": 90.7,
            "per_class_iou": dict(zip(synthetic.CLASS_NAMES, [98.3, 23.9, 9.6, 10.0, 62.7]))}


def test_demo_table_one_seed_has_no_spread_and_full_class_names():
    text = format_table({"ddpm": _entry({"0": 40.93}, 0.0), "random-unet": _entry({"0": 26.1}, 0.0)})
    head, rule, *rows = text.splitlines()
    assert head.split()[5:] == synthetic.CLASS_NAMES  # features mIoU ± pix acc, then every full name
    assert "± 0.0" not in text and " 0.0 " not in rows[0]
    assert rows[0].split()[:4] == ["ddpm", "40.9", "–", "90.7"]
    assert len({len(line) for line in [head, rule, *rows]}) == 1  # columns line up


@pytest.mark.parametrize("std", [0.0, 0.31])
def test_demo_table_several_seeds_states_the_spread(std):
    text = format_table({"ddpm": _entry({"0": 40.6, "1": 41.2}, std)})
    assert text.splitlines()[2].split()[:3] == ["ddpm", "40.9", f"{std:.1f}"]


_SPAWN_IMPORT = """
import multiprocessing, sys
{setup}
if __name__ == "__main__":
    child = multiprocessing.get_context("spawn").Process(target=__import__, args=("guided_diffusion.nn",))
    child.start()
    child.join()
    sys.exit(child.exitcode)
"""


@pytest.mark.parametrize("quiet", [True, False])
def test_cli_keeps_guided_diffusion_future_warnings_out_of_spawned_workers(tmp_path, quiet):
    """A process pool (the sweep's workers) spawns fresh interpreters that import guided_diffusion; the CLI's
    warning setup must reach them. The control run (no setup) shows the warning is real."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    setup = "from flows.cli import _quiet_dependency_warnings; _quiet_dependency_warnings()" if quiet else ""
    script = tmp_path / "spawn_import.py"
    script.write_text(_SPAWN_IMPORT.format(setup=setup))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("PYTHONWARNINGS", None)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ("FutureWarning" in done.stderr) is not quiet, done.stderr


def test_cli_run_off_a_terminal_writes_a_few_labelled_plain_lines(tiny_experiment, prefect_server):
    """`ddpmseg run` with stderr to a pipe: no carriage returns, no FutureWarning, a bounded number of lines,
    each naming the run (the config's stem) and the stage."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from prefect.settings import PREFECT_API_URL

    # 4 train images (one batch) x 2 steps, 3 test images, 2 members (trained 2 at a time: one bar for both)
    config = tiny_experiment(features={"cpu_threads": 2})
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("PYTHONWARNINGS", None)
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(config)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "\r" not in done.stderr and "Warning" not in done.stderr, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    bars = ["config extract train: ", "config extract test: ", "config train 2 members, 2 at a time: ",
            "config evaluate: "]
    for bar in bars:
        count = sum(line.startswith(bar) for line in lines)
        assert 1 <= count <= len(QUARTERS) + 1, (bar, lines)  # + 1: a line after 60 s on a very busy machine
    assert all(any(line.startswith(bar) for bar in bars) for line in lines), lines
    assert [line for line in lines if line.startswith("config evaluate: ")][-1].startswith(
        "config evaluate: 3/3 img (100%), ")
    assert "mIoU" in done.stdout


def test_progress_of_an_empty_loop_off_a_terminal_writes_nothing():
    stream = io.StringIO()
    for _ in progress_bar([], desc="sweep train", unit="member", stream=stream):
        pass
    assert stream.getvalue() == ""
