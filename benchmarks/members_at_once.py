"""Independent members trained several at a time vs one after another (the segment flow without Dask).

    python benchmarks/members_at_once.py [--toy] [--members 4] [--at-once N]

On a synthetic store (the official 256x256 geometry, D = 8448; --toy: the tiny UNet's), `members` members of
`classifier.ensemble: independent` trained by flows.train.train_member (one torch thread each, as the stage does),
first one after another, then `at_once` at a time in threads (default: all cores), alternated over 2 repeats,
each with a classifier seed of its own. Prints one JSON line: seconds per path and the speedup; every member
trained concurrently is checked bit for bit against the same member trained alone.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/members_at_once.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run(toy: bool = False, members: int = 4, at_once: int | None = None, repeats: int = 2,
        labelled_pixels: int = 8192) -> dict[str, Any]:
    import torch

    from benchmarks.geometry import REAL, TOY
    from benchmarks.synthetic_store import write_synthetic_store
    from flows import train as train_stage
    from flows.stage_keys import members_key, train_key
    from storage import artifacts

    at_once = at_once or os.cpu_count() or 1
    geometry = TOY if toy else REAL
    with tempfile.TemporaryDirectory(prefix="ddpmseg-members-") as tmp:
        syn = write_synthetic_store(Path(tmp) / "synthetic", geometry, [labelled_pixels])
        refs, store = syn.refs[:1], syn.store()

        def train(seed: int, workers: int) -> tuple[float, Any]:
            cfg = syn.cfg(n_images=1, classifier={"seed": seed, "model_num": members, "max_epochs": 2,
                                                  "early_stopping": False, "device": "cpu"})
            key = train_key(cfg, refs)
            start = time.perf_counter()
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(lambda i: train_stage.train_member(cfg, store, refs, key, i, progress=False),
                              range(members)))
            return time.perf_counter() - start, (cfg, key)

        train(1, 1)  # warm-up
        seconds = {"one_after_another": 0.0, "at_once": 0.0}
        for repeat in range(repeats):
            seconds["one_after_another"] += train(10 + repeat, 1)[0]
            took, (cfg, key) = train(20 + repeat, at_once)
            seconds["at_once"] += took
        # the last concurrent members against the same members trained alone (a fresh key: another store path)
        alone_store = write_synthetic_store(Path(tmp) / "alone", geometry, [labelled_pixels]).store()
        for index in range(members):
            train_stage.train_member(cfg, alone_store, refs, key, index, progress=False)
            a = artifacts.read_member(store.location, members_key(key), index)[0]
            b = artifacts.read_member(alone_store.location, members_key(key), index)[0]
            if a != b:
                raise AssertionError(f"member {index} trained {at_once} at a time differs from the member alone")
        return {"geometry": geometry.name, "members": members, "at_once": at_once, "repeats": repeats,
                "labelled_pixels": labelled_pixels, "torch_threads_per_member": 1, "seconds": seconds,
                "members_at_once_speedup": seconds["one_after_another"] / seconds["at_once"],
                "bit_identical": True, "loadavg_1m": os.getloadavg()[0], "cpus": os.cpu_count(),
                "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toy", action="store_true", help="the tiny UNet's geometry: the code path in seconds")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--at-once", type=int, default=None, help="members at a time (default: all cores)")
    args = parser.parse_args(argv)
    if args.members < 1 or (args.at_once is not None and args.at_once < 1):
        parser.error("--members and --at-once must be >= 1")
    print(json.dumps(run(args.toy, args.members, args.at_once)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
