"""torch's CPU thread count: fixed for a block of work, or one thread for a helper thread."""
from __future__ import annotations

import contextlib
import threading

import torch


@contextlib.contextmanager
def torch_threads(n: int):
    """Run torch CPU ops on exactly `n` threads. CPU float results depend on the thread count (reduction order),
    so fixing it makes a Dask worker (which limits its threads) compute the same bits as a local run."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_thread_here() -> None:
    """Run torch's CPU ops of the calling thread on one thread: for a helper thread that works beside the main
    loop (a prefetching slice builder), as a ThreadPoolExecutor initializer.

    A second thread that runs torch ops on several threads gets an OpenMP thread team of its own, kept while the
    thread lives. With more OpenMP threads than cores, libgomp stops spinning at its barriers, so every parallel
    region of the main thread then waits for its threads to wake up: measured on 2 cores, the batched ensemble's
    step went from 17 to 28 ms while an idle prefetch thread that had once built a slice on 2 threads was alive.
    torch.set_num_threads also sets the count that threads started later begin with; that is put back at once,
    from a thread of its own (whose own count does not matter)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    restore = threading.Thread(target=torch.set_num_threads, args=(before,), name="torch-threads-default")
    restore.start()
    restore.join()
