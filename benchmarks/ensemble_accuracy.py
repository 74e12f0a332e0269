"""Accuracy of `classifier.ensemble: batched` against `independent` on the demo (issue 15).

    python benchmarks/ensemble_accuracy.py [--out DIR] [--seeds 0,1,2,3,4] [--members 10]
                                           [--modes independent,batched] [--images-per-buffer N]

The demo's data and `ddpm` config (flows/demo.py: the bundled demo backbone, 10 training and 50 test
images, --members members), the stages run per (ensemble mode, classifier seed), all on one feature store (the
features are extracted once; members already in the store are reused). Prints one JSON object: per mode the
official mIoU of each seed, their mean and standard deviation (population, as the demo table), and whether the
means agree within the larger deviation. --images-per-buffer sets classifier.images_per_buffer (default: the
demo's, 4) for every mode run; --modes runs only some modes (the comparison then needs both in one JSON).
--modes batched-own-slices: a diagnostic, the batched step with each member in a pass of its own whose slices
come from its member seed (README: what sharing the slices costs).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/ensemble_accuracy.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = ("independent", "batched")
DIAGNOSTIC_MODES = ("batched-own-slices",)  # the batched step, each member with a slice stream of its own


def _train_own_slices(cfg, store, refs, key, members: int) -> None:
    """batched-own-slices: each member in a batched pass of its own whose slices are drawn from its member seed
    (the stream structure of an independent member) instead of the shared ensemble seed: what sharing the slices
    costs, apart from the batched step's arithmetic. Written under the batched train key, in a store of its own."""
    from unittest import mock

    from flows import train as train_stage

    for index in range(members):
        with mock.patch.object(train_stage, "ensemble_seed", lambda c, index=index: train_stage.member_seed(c, index)):
            train_stage.train_members(cfg, store, refs, key, [index], progress=False)


def run_accuracy(out: Path, seeds: list[int], members: int = 10, modes: tuple[str, ...] = MODES,
                 images_per_buffer: int | None = None) -> dict[str, Any]:
    """The stages called directly (flows/prepare, extract, train, evaluate: what the segment flow runs, without
    Prefect's per-run overhead), on one store under `out`."""
    import yaml

    from flows import train as train_stage
    from flows.evaluate import evaluate
    from flows.extract import extract_split
    from flows.prepare import prepare
    from flows.stage_keys import evaluate_key, train_key
    from flows.demo import demo_config
    from pipeline import synthetic
    from pipeline.config import load_config
    from storage.features import FeatureStore
    from storage.location import StoreLocation

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    synthetic.write_dataset(out / "data", n_train=10, n_test=50, n_unlabelled=0, size=32, seed=0)
    results: dict[str, Any] = {"seeds": seeds, "members": members, "modes": {}}
    if images_per_buffer is not None:
        results["images_per_buffer"] = images_per_buffer
    suffix = "" if images_per_buffer is None else f"-ipb{images_per_buffer}"
    for seed in seeds:  # modes interleaved: an interrupted run still compares them on the same seeds
        for mode in modes:
            config = demo_config("ddpm", seed, members=members)
            config["classifier"].update(ensemble="batched" if mode in DIAGNOSTIC_MODES else mode, device="cpu")
            if mode in DIAGNOSTIC_MODES:
                config["store"] = f"store-{mode}"  # its members sit under the batched key: never mixed with those
            if images_per_buffer is not None:
                config["classifier"]["images_per_buffer"] = images_per_buffer
            config["evaluation"] = {"gallery": 0, "save_png": False}  # the scores only: no report, no PNGs
            config["output_dir"] = f"runs/ddpm-{mode}{suffix}/s{seed}"
            path = out / f"config-ddpm-{mode}{suffix}-s{seed}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            cfg = load_config(path)
            store = FeatureStore(StoreLocation.parse(cfg.store))
            start = time.perf_counter()
            splits = {split: prepare(cfg, store, split) for split in ("train", "test")}
            train_refs = splits["train"].extraction(cfg, "train")
            for split, refs in splits.items():
                extract_split(cfg, store, refs.extraction(cfg, split), progress=False)
            train = train_key(cfg, train_refs)
            if mode == "batched-own-slices":
                _train_own_slices(cfg, store, train_refs, train, members)
            elif mode == "batched":
                train_stage.train_members(cfg, store, train_refs, train, list(range(members)), progress=False)
            else:
                for index in range(members):
                    train_stage.train_member(cfg, store, train_refs, train, index, progress=False)
            trained = time.perf_counter()
            scores = evaluate(cfg, store, splits["test"].base, train, evaluate_key(cfg, train, splits["test"].base),
                              progress=False)
            entry = results["modes"].setdefault(mode, {"miou_per_seed": [], "train_s_per_seed": []})
            entry["miou_per_seed"].append(float(scores["miou"]))
            entry["train_s_per_seed"].append(trained - start)
            entry["miou"] = statistics.fmean(entry["miou_per_seed"])
            entry["miou_std"] = statistics.pstdev(entry["miou_per_seed"])
            print(f"{mode} seed {seed}: mIoU {entry['miou_per_seed'][-1]:.2f} (train {trained - start:.0f} s, "
                  f"evaluate {time.perf_counter() - trained:.0f} s)", file=sys.stderr, flush=True)
            partial = out / f"ensemble-accuracy{suffix}.partial-{'-'.join(map(str, seeds))}.json"
            partial.write_text(json.dumps(results, indent=1))
    if not all(mode in results["modes"] for mode in MODES):
        return results
    a, b = (results["modes"][m] for m in MODES)
    results["mean_difference"] = b["miou"] - a["miou"]
    results["agree_within_larger_std"] = abs(b["miou"] - a["miou"]) <= max(a["miou_std"], b["miou_std"])
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("ensemble-accuracy"))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated subset of {MODES + DIAGNOSTIC_MODES} (batched-own-slices: a "
                             "diagnostic, the batched step with each member's own slice stream)")
    parser.add_argument("--images-per-buffer", type=int, default=None)
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if len(seeds) < 1:
        parser.error("--seeds: give at least one seed")
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes or set(modes) - set(MODES + DIAGNOSTIC_MODES):
        parser.error(f"--modes: expected some of {MODES + DIAGNOSTIC_MODES}, got {args.modes!r}")
    if args.images_per_buffer is not None and args.images_per_buffer < 1:
        parser.error(f"--images-per-buffer must be >= 1, got {args.images_per_buffer}")
    results = run_accuracy(args.out, seeds, args.members, modes, args.images_per_buffer)
    suffix = "" if args.images_per_buffer is None else f"-ipb{args.images_per_buffer}"
    (Path(args.out) / f"ensemble-accuracy{suffix}-{'-'.join(map(str, seeds))}.json").write_text(
        json.dumps(results, indent=1))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
