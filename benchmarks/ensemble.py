"""Figure 6: training the ensemble, batched vs members one after another vs the official loop (issue 15).

At the real geometry (256x256, D = 8448) on fully labelled images of the synthetic store, a fixed number of
iterations per member (no early stop), every path on all cores (torch threads = os.cpu_count()):

- batched: flows.train.train_members' pass (pipeline.ensemble.train_members) over `members` members, fed by the
  stage's slice sampler from the store (the maps read, each slice sampled once for all members);
- independent: the same members one after another, each as flows.train.train_member trains it (its own sampler,
  reading the maps and sampling its own slices; pipeline.classifier.train_member);
- official: the official loop, members one after another, on the image's upsampled features held in memory
  (benchmarks.official.prepare_data) through DataLoader(FeatureDataset, batch 64, shuffle=True).

Both store-backed paths build only the slices their iterations use (pixels.epoch_slices max_pixels, as the
stage does for an epoch cut at a number of batches): a prefetched slice that no step reads is not timed.

Figures are member-pixels per second (members x iterations x 64 / wall s). The timed runs alternate
(independent, batched, official, then again) so that a change of the machine's load hits every path alike; each
path's time is the sum over its repeats. `mlp_flops_utilisation`: the batched training step alone (in-memory
features, no sampling, the members' init not timed) in FLOP/s (pipeline.ensemble.training_step_flops) over the
FLOP/s of a plain torch.matmul of the first layer's shape, (64, D) @ (D, 128), on the same threads. On a CPU
where torch's float32 matmul runs through MKL's AVX2 kernels (AMD) and the step's first layer through oneDNN's
AVX-512 ones, this is above 1; `onednn_linear_flop_per_s` gives oneDNN's FLOP/s at that shape beside it.
"""
from __future__ import annotations

import itertools
import os
import time
from typing import Any

import torch

from benchmarks import official
from benchmarks.common import log
from benchmarks.synthetic_store import SyntheticStore
from flows import train as train_stage
from flows.stage_keys import BASE_VIEW, unit_for
from pipeline import classifier as clf
from pipeline import ensemble, pixels
from pipeline.threads import torch_threads

ENSEMBLE_SEED = 104729  # classifier seed of this figure: train keys of its own


def _threads() -> int:
    return os.cpu_count() or 1


def matmul_flops(dim: int, width: int, batch: int, seconds: float = 1.0) -> float:
    """FLOP/s of torch.matmul (batch, dim) @ (dim, width) float32 on the current threads (best of repeated
    timings over about `seconds`)."""
    x, w = torch.randn(batch, dim), torch.randn(dim, width)
    return _best_flops(lambda: x @ w, 2.0 * batch * dim * width, seconds)


def onednn_linear_flops(dim: int, width: int, batch: int, seconds: float = 1.0) -> float | None:
    """FLOP/s of oneDNN's linear at the same shape (the kernel the batched step's first layer uses on the CPU;
    pipeline.ensemble), or None where torch has none."""
    linear = ensemble._onednn_linear()
    if linear is None:
        return None
    x, w = torch.randn(batch, dim), torch.randn(width, dim)
    return _best_flops(lambda: linear(x, w, None, "none", [], ""), 2.0 * batch * dim * width, seconds)


def _best_flops(run, flop: float, seconds: float) -> float:
    for _ in range(3):
        run()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(10):
            run()
        best = min(best, (time.perf_counter() - start) / 10)
    return flop / best


def batched_step_flops(settings: clf.TrainSettings, members: int, iterations: int,
                       device: str | torch.device = "cpu") -> dict[str, float]:
    """Achieved FLOP/s of the batched training step alone: one in-memory slice (random features) feeding
    `members` members. The steps are timed apart from the members' init and stacking: a pass of `iterations`
    steps minus a pass of 2, divided by iterations - 2 (best of two such pairs)."""
    if iterations <= 2:
        raise ValueError(f"batched_step_flops: iterations must be > 2, got {iterations}")
    features = torch.randn(iterations * settings.batch_size, settings.dim, device=device)
    labels = torch.randint(0, settings.number_class, (len(features),), device=device)
    one_epoch = clf.TrainSettings(**{**settings.__dict__, "max_epochs": 1,
                                     "early_stop_start_epoch": settings.max_epochs + 1})
    seeds = list(range(members))

    def timed(steps: int) -> float:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        ensemble.train_members(one_epoch, seeds, lambda epoch: iter([(features, labels)]), device=device,
                               iterations_per_epoch=steps)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(2)  # warm-up
    step_seconds = min(max(timed(iterations) - timed(2), 1e-9) / (iterations - 2) for _ in range(2))
    flops = ensemble.training_step_flops(settings.number_class, settings.dim, settings.batch_size)
    return {"step_seconds": step_seconds, "flop_per_s": flops * members / step_seconds}


def run_ensemble(syn: SyntheticStore, first: int, n_images: int, members: int = 10, iterations: int = 48,
                 repeats: int = 2) -> dict[str, Any]:
    """Train on images first .. first + n_images - 1 of the synthetic store (fully labelled)."""
    with torch_threads(_threads()):
        return {**_run(syn, first, n_images, members, iterations, repeats), "torch_threads": _threads()}


def _run(syn: SyntheticStore, first: int, n_images: int, members: int, iterations: int,
         repeats: int) -> dict[str, Any]:
    refs = syn.refs[first:first + n_images]
    cfg = syn.cfg(n_images=n_images, classifier={"seed": ENSEMBLE_SEED, "model_num": members, "max_epochs": 1,
                                                 "early_stopping": False, "device": "cpu"})
    store = syn.store()
    d, c = cfg.dataset, cfg.classifier
    seeds = [train_stage.member_seed(cfg, i) for i in range(members)]
    member_pixels = members * iterations * c.batch_size

    def batched() -> float:
        data = train_stage.training_data(cfg, store, refs)
        shared = train_stage.ensemble_seed(cfg)

        def epoch_slices(epoch: int):
            return pixels.epoch_slices(data.entries, data.labels.__getitem__, data.slice_features,
                                       d.ignore_label, epoch, shared, images_per_buffer=c.images_per_buffer,
                                       max_pixels=iterations * c.batch_size)

        start = time.perf_counter()
        ensemble.train_members(data.settings, seeds, epoch_slices, iterations_per_epoch=iterations)
        return time.perf_counter() - start

    def independent() -> float:
        start = time.perf_counter()
        for seed in seeds:  # as the stage trains a member: its own sampler and maps
            data = train_stage.training_data(cfg, store, refs)

            def epoch_batches(epoch: int, data=data, seed=seed):
                return pixels.epoch_batches(
                    data.entries, data.labels.__getitem__, data.slice_features, d.ignore_label, c.batch_size,
                    epoch, seed, images_per_buffer=c.images_per_buffer, max_batches=iterations)

            clf.train_member(data.settings, epoch_batches, seed=seed)
        return time.perf_counter() - start

    log(f"ensemble: the official in-memory features of {n_images} image(s)")
    units = [unit_for(cfg, t) for t in cfg.features.steps]
    image_ids = [r.image_id for r in refs]
    labels = {r.image_id: store.read_view_label(BASE_VIEW, r.image_id, r.label_hash) for r in refs}
    X, y = official.prepare_data(
        image_ids, lambda i: [torch.from_numpy(m) for m in store.read_maps(units, i, cfg.sorted_blocks)],
        labels.__getitem__, cfg.image_size, train_stage.feature_dim(cfg, store, refs[0].image_id), d.ignore_label)
    settings = clf.train_settings(cfg, X.shape[1])

    def official_loop() -> float:
        start = time.perf_counter()
        for seed in seeds:
            loader = official.official_loader_batches(X, y, c.batch_size)
            clf.train_member(settings, lambda epoch, loader=loader: itertools.islice(loader(epoch), iterations),
                             seed=seed)
        return time.perf_counter() - start

    # warm-up: one-off costs (first optimizer step, first store read) outside every timed path
    ensemble.train_members(settings, seeds[:2], lambda epoch: iter([(X[:256], y[:256].long())]),
                           iterations_per_epoch=2)
    clf.train_member(settings, lambda epoch: itertools.islice(official.in_memory_batches(X, y, 64, 0)(epoch), 2),
                     seed=0)
    times = {"independent": 0.0, "batched": 0.0, "official": 0.0}
    for repeat in range(repeats):
        for name, run in (("independent", independent), ("batched", batched), ("official", official_loop)):
            log(f"ensemble: {name}, {members} members x {iterations} iterations (repeat {repeat + 1}/{repeats})")
            times[name] += run()
    del X, y
    rates = {name: repeats * member_pixels / seconds for name, seconds in times.items()}

    log("ensemble: FLOP/s of the batched step and of a plain matmul")
    step = batched_step_flops(settings, members, iterations)
    first_width = clf.hidden_widths(d.number_class)[0]
    reference = matmul_flops(settings.dim, first_width, c.batch_size)
    onednn = onednn_linear_flops(settings.dim, first_width, c.batch_size)
    return {
        "images": n_images, "members": members, "iterations_per_member": iterations, "repeats": repeats,
        "dim": settings.dim, "number_class": d.number_class, "seconds": times,
        "member_px_per_s": rates,
        "ensemble_speedup_batched_vs_independent": rates["batched"] / rates["independent"],
        "ensemble_speedup_vs_official": rates["batched"] / rates["official"],
        "batched_step_flop_per_s": step["flop_per_s"], "matmul_flop_per_s": reference,
        "matmul_shape": [c.batch_size, settings.dim, first_width], "onednn_linear_flop_per_s": onednn,
        "batched_step_ms": 1e3 * step["step_seconds"],
        "mlp_flops_utilisation": step["flop_per_s"] / reference,
    }
