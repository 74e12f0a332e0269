"""The embedded Prefect of a `ddpmseg` command: a temporary server that does not outlive the command, and a
console that leaves reporting errors to the command line (one line each, flows/cli.py).

Checked against prefect 3.8.8 (the pin is `prefect>=3.8,<3.9`):
- With no PREFECT_API_URL, Prefect starts a temporary API server as a subprocess (uvicorn,
  `prefect.server.api.server.SubprocessASGIServer`, one instance per port, the default one under the key None)
  and stops it at exit (atexit). A command killed with SIGKILL runs no atexit: the server (~225 MB) stayed,
  orphaned, for minutes. `bind_server_to_this_process` registers, under the key None, a server whose start also
  starts a watcher: a tiny process that waits for this process to end and then stops the server (SIGTERM, then
  SIGKILL after 5 s), and ends itself when the server ends first. Prefect's own test harness registers its
  server under the same key (prefect.testing.utilities), so Prefect finds and reuses it.
- Prefect logs a failed task or flow run at ERROR, with the traceback, to the console handler of the root
  logger (and to the API). `leave_errors_to_the_cli` filters those records out of the console only: the API
  and the UI keep them; the exception itself still reaches the caller, which reports it.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys

__all__ = ["bind_server_to_this_process", "leave_errors_to_the_cli", "WATCHER_GRACE_S"]

#: seconds between the watcher's SIGTERM to an orphaned server and its SIGKILL
WATCHER_GRACE_S = 5

# The watcher: argv = [parent pid, server pid]. Polls twice a second; stdlib only, so it starts in milliseconds.
_WATCHER = """
import os, signal, sys, time
parent, server = int(sys.argv[1]), int(sys.argv[2])
def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
while os.getppid() == parent and alive(server):
    time.sleep(0.5)
if alive(server) and os.getppid() != parent:
    os.kill(server, signal.SIGTERM)
    deadline = time.monotonic() + %d
    while alive(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(server):
        os.kill(server, signal.SIGKILL)
""" % WATCHER_GRACE_S


def _start_watcher(server_pid: int) -> None:
    subprocess.Popen([sys.executable, "-I", "-c", _WATCHER, str(os.getpid()), str(server_pid)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)  # a Ctrl-C to the command's process group does not stop the watcher


def bind_server_to_this_process() -> None:
    """Make Prefect's temporary server (when it starts one) end at most a few seconds after this process, however
    this process ends. Does nothing when an API URL is configured or a default server is already registered."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value() or SubprocessASGIServer._instances.get(None) is not None:
        return

    class ParentBoundServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            process = super()._run_uvicorn_command()
            _start_watcher(process.pid)
            return process

    ParentBoundServer()  # SubprocessASGIServer.__new__ registers the instance under its port, None


class _RunFailures(logging.Filter):
    """Drops ERROR records of Prefect's flow-run and task-run loggers (a failed run, with its traceback), and
    asyncio's "Task exception was never retrieved" (the requests a dropped S3 connection leaves unfinished, reported
    when they are collected): the CLI says the error that ended the run in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return False
        return not (record.name == "asyncio" and str(record.msg).startswith("Task exception was never retrieved"))


def leave_errors_to_the_cli() -> None:
    """Keep failed-run records (and their tracebacks) off Prefect's console handler; idempotent."""
    import prefect.main  # noqa: F401  (its import configures Prefect's logging: a console handler on the root logger)
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(isinstance(f, _RunFailures)
                                                                    for f in handler.filters):
            handler.addFilter(_RunFailures())
