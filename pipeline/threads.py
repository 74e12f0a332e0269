"""torch's CPU thread count, fixed for a block of work."""
from __future__ import annotations

import contextlib

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
