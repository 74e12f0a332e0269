"""The shuffle measurement: the default 4-image shuffle buffer against the official global shuffle.

    python benchmarks/shuffle.py --out /tmp/shuffle --seeds 10 [--sets demo,demo64] [--members 10]

For each data set and each classifier seed, the same cached features train the paper's MLP ensemble twice:
`classifier.images_per_buffer: 4` (the buffered shuffle) and `images_per_buffer` = the training set (one pool of
all labelled pixels, shuffled per epoch: the official global shuffle). Official mIoU on the test split.

Data sets (pipeline/synthetic.py, the demo backbone, blocks 1-4, steps 50/150/250, flows/demo.py's settings):
- `demo`: the demo's data and config (32 px, 10 train, 50 test);
- `demo64`: the same generator at 64 px (10 train, 20 test), the demo backbone run at 64 px (same weights,
  attention kept at the same downsampling factor).

Stages are called directly (flows/prepare.py, extract.py, train.py; no Prefect): extraction runs once per data set, then only the
classifier changes. Each (set, setting, seed) result is appended to `<out>/results.jsonl` as soon as it is
measured and skipped on a re-run, so the run can be stopped and resumed; the summary (mean ± population std)
is printed and written to `<out>/summary.json`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SETTINGS = {"buffer4": 4, "global": None}  # None: the whole training set


def set_config(name: str, seed: int, buffer: int | None, members: int) -> tuple[dict[str, Any], dict[str, int]]:
    """(config mapping relative to the set's directory, data parameters) of data set `name`."""
    from flows.demo import demo_config

    if name == "demo":
        data = {"size": 32, "n_train": 10, "n_test": 50}
    elif name == "demo64":
        data = {"size": 64, "n_train": 10, "n_test": 20}
    else:
        raise ValueError(f"unknown data set {name!r}; expected demo or demo64")
    cfg = demo_config("ddpm", seed, data["n_train"], data["n_test"], members)
    if data["size"] != 32:  # attention_resolutions is in pixels: keep attention at downsampling factor 2
        flags = cfg["model"]["flags"]
        factor = flags["image_size"] // int(flags["attention_resolutions"])
        cfg["model"]["flags"] = {**flags, "image_size": data["size"],
                                 "attention_resolutions": str(data["size"] // factor)}
    cfg["classifier"]["images_per_buffer"] = buffer or data["n_train"]
    cfg["output_dir"] = f"runs/s{seed}-b{cfg['classifier']['images_per_buffer']}"
    return cfg, data


def measure(out: Path, name: str, setting: str, seed: int, members: int) -> dict[str, Any]:
    from flows.extract import extract_split
    from flows.prepare import prepare
    from flows.stage_keys import train_key
    from flows.train import load_members, train_member
    from pipeline import synthetic
    from pipeline.config import parse_config
    from storage.features import FeatureStore
    from storage.location import StoreLocation

    raw, data = set_config(name, seed, SETTINGS[setting], members)
    directory = out / name
    synthetic.write_dataset(directory / "data", n_train=data["n_train"], n_test=data["n_test"], n_unlabelled=0,
                            size=data["size"], seed=0)
    cfg = parse_config(raw, base_dir=directory, source=f"{name}/{setting}/s{seed}")
    store = FeatureStore(StoreLocation.parse(cfg.store))
    started = time.perf_counter()
    train = prepare(cfg, store, "train")
    test = prepare(cfg, store, "test")
    forwards = 0
    for split, refs in (("train", train), ("test", test)):
        forwards += extract_split(cfg, store, refs.extraction(cfg, split), progress=False)["unet_forwards"]
    train_refs = train.extraction(cfg, "train")
    key = train_key(cfg, train_refs)
    infos = [train_member(cfg, store, train_refs, key, i, progress=False) for i in range(members)]
    scores = score_members(cfg, store, test.base, load_members(store.location, key, members))
    return {"set": name, "setting": setting, "images_per_buffer": cfg.classifier.images_per_buffer, "seed": seed,
            "miou": 100 * scores.official_miou, "miou_standard": 100 * scores.standard_miou, "members": members,
            "members_trained": sum(int(i["ran"]) for i in infos), "unet_forwards": forwards,
            "epochs": [i.get("epochs") for i in infos], "wall_s": time.perf_counter() - started}


_TEST_SET: dict[str, tuple[list, list]] = {}  # store url -> (each test image's (H*W, D) features, ground truths)


def score_members(cfg, store, refs, members):
    """The scores flows.evaluate.evaluate computes (no test-time views, no closing): each member's logits per pixel,
    mode vote, official and standard mIoU. The test features are built once per data set and kept for every
    seed (pipeline.predict.predict_maps builds them again for each evaluation)."""
    import torch

    from flows.train import map_reader
    from pipeline import features, metrics, predict

    if store.location.url not in _TEST_SET:
        maps_of = map_reader(cfg, store, cache_size=1)
        size = cfg.image_size
        ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        feats = [features.sample_pixel_features(maps_of(r.entry), ys.reshape(-1), xs.reshape(-1), size)
                 for r in refs]
        gts = [store.read_view_label(r.view, r.image_id, r.label_hash) for r in refs]
        _TEST_SET[store.location.url] = (feats, gts)
    feats, gts = _TEST_SET[store.location.url]
    masks = [predict.mode_vote(predict.member_logits(members, f).argmax(-1)).reshape(gt.shape).numpy()
             .astype("uint8") for f, gt in zip(feats, gts)]
    return metrics.score(masks, gts, cfg.dataset.number_class, cfg.dataset.ignore_label)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """{set: {setting: {mean, std, n, per_seed}}}; std is the population std over seeds."""
    out: dict[str, Any] = {}
    for row in rows:
        out.setdefault(row["set"], {}).setdefault(row["setting"], {})[row["seed"]] = row["miou"]
    summary: dict[str, Any] = {}
    for name, settings in out.items():
        summary[name] = {}
        for setting, per_seed in settings.items():
            values = [per_seed[s] for s in sorted(per_seed)]
            summary[name][setting] = {"mean": statistics.fmean(values),
                                      "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
                                      "n": len(values), "per_seed": {str(s): per_seed[s] for s in sorted(per_seed)}}
    return summary


def main(argv: list[str] | None = None) -> int:
    import torch

    torch.set_num_threads(1)  # a shared machine: one thread per process (members train on one thread anyway)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="shuffle-measurement")
    parser.add_argument("--sets", default="demo,demo64")
    parser.add_argument("--seeds", type=int, default=10, help="classifier seeds 0..N-1")
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--reverse", action="store_true", help="seeds from the last (a second process's share)")
    parser.add_argument("--start", type=int, default=None, help="begin at this seed (a third process's share)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"

    def done() -> set[tuple[str, str, int, int]]:  # read before each measurement: processes can share the work
        rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
        return {(r["set"], r["setting"], r["seed"], r["members"]) for r in rows}

    seeds = list(range(args.seeds))[::-1 if args.reverse else 1]
    seeds = seeds[seeds.index(args.start):] if args.start is not None else seeds
    for name in args.sets.split(","):
        for seed in seeds:
            for setting in SETTINGS:  # alternate settings: a stopped run leaves balanced results
                if (name, setting, seed, args.members) in done():
                    continue
                row = measure(out, name, setting, seed, args.members)
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{name} {setting:<8} seed {seed:2d}: mIoU {row['miou']:.2f} ({row['wall_s']:.0f} s)",
                      flush=True)
    rows = [json.loads(line) for line in results.read_text().splitlines()]  # with other processes' rows
    summary = summarise([r for r in rows if r["members"] == args.members])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(markdown_table(summary))
    return 0


def markdown_table(summary: dict[str, Any]) -> str:
    """The README table: one row per data set, mean ± population std (n seeds) per setting and the difference."""
    lines = ["| data set | `images_per_buffer: 4` | global shuffle | global − 4 | seeds |", "|---|---|---|---|---|"]
    for name, settings in summary.items():
        cells = [f"{settings[k]['mean']:.2f} ± {settings[k]['std']:.2f}" if k in settings else "—" for k in SETTINGS]
        diff = (f"{settings['global']['mean'] - settings['buffer4']['mean']:+.2f}"
                if len(settings) == len(SETTINGS) else "—")
        seeds = "/".join(str(settings[k]["n"]) for k in SETTINGS if k in settings)
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {diff} | {seeds} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
