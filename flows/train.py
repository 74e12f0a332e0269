"""The train stage: each ensemble member trained from the store, pixels sampled lazily from the native maps of
a few images at a time; a member is written (one file, commit-last) under the members key of its train key.

classifier.ensemble independent: one member per call (train_member: parallel tasks); batched: every member not
yet committed in one pass (train_members, pipeline/ensemble.py). classifier.device: where the maps, the
sampling and the MLP steps live."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from pipeline import classifier as clf
from pipeline import ensemble, features, memory, pixels
from pipeline.config import ExperimentConfig
from pipeline.progress import labelled
from pipeline.threads import torch_threads
from storage import artifacts
from storage.features import FeatureStore, StoreError
from storage.keys import Key, digest
from storage.location import StoreLocation
from flows.stage_keys import BASE_VIEW, ImageRef, members_key, unit_for

def _read_entry_maps(cfg: ExperimentConfig, store: FeatureStore, entry: str) -> list[torch.Tensor]:
    """entry '<view>/<image_id>' -> that image's maps in the official order (float16, as stored)."""
    view, image_id = entry.split("/")
    units = [unit_for(cfg, t, view) for t in cfg.features.steps]
    return [torch.from_numpy(m) for m in store.read_maps(units, image_id, cfg.sorted_blocks)]


def map_reader(cfg: ExperimentConfig, store: FeatureStore, cache_size: int,
               device: torch.device = torch.device("cpu")) -> Callable[[str], list[torch.Tensor]]:
    """entry '<view>/<image_id>' -> that image's maps in the official order, a few images cached, as float32
    channels-last (features.sampling_maps: sampled in place, 2x the float16 size) on `device` (copied there as
    float16)."""
    cache: dict[str, list[torch.Tensor]] = {}

    def maps_of(entry: str) -> list[torch.Tensor]:
        if entry not in cache:
            if len(cache) >= cache_size:
                cache.pop(next(iter(cache)))
                memory.release_free_memory()  # the evicted maps' pages, wherever the heaps hold them
            cache[entry] = features.sampling_maps([m.to(device) for m in _read_entry_maps(cfg, store, entry)])
        return cache[entry]

    return maps_of


def _slice_sampler(cfg: ExperimentConfig, store: FeatureStore, slots: int,
                   device: torch.device = torch.device("cpu")) -> Callable[[pixels.PixelSlice], torch.Tensor]:
    """slice -> (n, D) features of its pixels. The images of the slice's buffer are held in one set of
    features.MapTables (`slots` images, allocated once, float32 channels-last), each read from the store when a
    slice first needs it; each slice is then sampled with one fused op per map, in slice order, into one of two
    full-size slice buffers (allocated once: no page faults per slice, a footprint that does not grow with the
    number of images or epochs). On a GPU the tables and slice buffers live there: each map crosses once, as
    float16, and sampling runs on the device."""
    tables: features.MapTables | None = None
    slot_of: dict[str, int] = {}  # entry '<view>/<image_id>' -> its slot
    outputs: list[torch.Tensor | None] = [None, None]  # two slice buffers used in turn (epoch_batches allows it)
    calls = 0

    def slice_features(part: pixels.PixelSlice) -> torch.Tensor:
        nonlocal tables, calls
        if any(entry not in slot_of for entry in part.images):  # a new buffer: keep what it shares, load the rest
            kept = {entry: slot for entry, slot in slot_of.items() if entry in part.images}
            free = [slot for slot in range(slots) if slot not in kept.values()]
            for entry in part.images:
                if entry not in kept:
                    maps = _read_entry_maps(cfg, store, entry)
                    if tables is None:
                        tables = features.map_tables([tuple(m.shape) for m in maps], slots, device)
                    kept[entry] = free.pop(0)
                    features.load_maps(tables, kept[entry], maps)
            slot_of.clear()
            slot_of.update(kept)
        slots_of_images = torch.tensor([slot_of[entry] for entry in part.images], dtype=torch.long)
        ring, calls = calls % 2, calls + 1
        if outputs[ring] is None or outputs[ring].shape[0] < len(part.labels):  # full size at once: a flat peak
            rows = max(len(part.labels), pixels.SLICE_PIXELS)
            outputs[ring] = torch.empty((rows, tables.dim), dtype=torch.float32, device=device)
        return features.sample_tables(tables, slots_of_images[part.image], part.ys, part.xs, cfg.image_size,
                                      out=outputs[ring])

    return slice_features


def feature_dim(cfg: ExperimentConfig, store: FeatureStore, image_id: str, view: str = BASE_VIEW) -> int:
    units = [unit_for(cfg, t, view) for t in cfg.features.steps]
    return sum(int(a.shape[0]) for u in units for a in store.feature_arrays(u, image_id, cfg.sorted_blocks))


def member_seed(cfg: ExperimentConfig, index: int) -> int:
    """Each member's seed derives from (classifier.seed, index) so members can train independently, in parallel."""
    return int(digest(["member", cfg.classifier.seed, index])[:8], 16)


@dataclass
class TrainingData:
    """What every member of a training reads: the settings, labels, entries, the slice sampler (on the
    settings' device) and the batches per epoch."""

    settings: clf.TrainSettings
    entries: list[str]
    labels: dict[str, np.ndarray]
    slice_features: Callable[[pixels.PixelSlice], torch.Tensor]
    per_epoch: int | None  # at most this many batches per epoch (None: all)


def training_data(cfg: ExperimentConfig, store: FeatureStore, refs: list[ImageRef]) -> TrainingData:
    c, d = cfg.classifier, cfg.dataset
    settings = clf.train_settings(cfg, feature_dim(cfg, store, refs[0].image_id, refs[0].view))
    memory.fix_malloc_thresholds()  # freed maps leave the process: the peak stays flat in the number of images
    # the images of the current buffer (a buffer never holds more than the training set)
    slice_features = _slice_sampler(cfg, store, slots=min(c.images_per_buffer, len(refs)),
                                    device=torch.device(settings.device))
    labels = {r.entry: store.read_view_label(r.view, r.image_id, r.label_hash) for r in refs}
    per_epoch = None  # the study keeps the paper's iterations per epoch on the enlarged set
    if cfg.augmentation.keep_iterations and any(r.view != BASE_VIEW for r in refs):
        base = [labels[r.entry] for r in refs if r.view == BASE_VIEW]
        per_epoch = max(1, pixels.count_labelled(base, d.ignore_label) // c.batch_size)
    return TrainingData(settings, [r.entry for r in refs], labels, slice_features, per_epoch)


def _member_meta(cfg: ExperimentConfig, key: Key, dim: int, index: int, info: dict[str, Any]) -> dict[str, Any]:
    return {"number_class": cfg.dataset.number_class, "dim": dim, "dropout": cfg.classifier.dropout,
            "seed": member_seed(cfg, index), "index": index, "train_key": key.value,
            **{k: v for k, v in info.items() if isinstance(v, (int, float, bool, str))}}


def train_member(cfg: ExperimentConfig, store: FeatureStore, refs: list[ImageRef], key: Key, index: int,
                 progress: bool = True, prefetch: bool = True, label: str = "") -> dict[str, Any]:
    """Train ensemble member `index` from the store (skipped when committed); returns its info.

    prefetch: read and sample the next slice of pixels in a second thread while the MLP trains (same result).
    label: which run the progress bar belongs to (e.g. "ddpm s0").
    classifier.ensemble batched: the member trains as a pass of one (train_members), the same member a larger
    pass gives it."""
    if cfg.classifier.ensemble == "batched":
        infos = train_members(cfg, store, refs, key, [index], progress=progress, prefetch=prefetch, label=label)
        return infos[0] if infos else {"member": index, "ran": False}
    loc = store.location
    if artifacts.member_committed(loc, members_key(key), index):
        return {"member": index, "ran": False}
    c, d = cfg.classifier, cfg.dataset
    data = training_data(cfg, store, refs)
    seed = member_seed(cfg, index)

    def epoch_batches(epoch: int):
        return pixels.epoch_batches(data.entries, data.labels.__getitem__, data.slice_features, d.ignore_label,
                                    c.batch_size, epoch, seed, images_per_buffer=c.images_per_buffer,
                                    prefetch=prefetch, device=data.settings.device, max_batches=data.per_epoch)

    with torch_threads(1):  # identical numerics wherever a member trains; small MLPs are fastest on one thread
        model, info = clf.train_member(data.settings, epoch_batches, seed=seed, device=data.settings.device,
                                       progress=progress, desc=labelled(label, f"member {index + 1}/{c.model_num}"))
    artifacts.write_member(loc, members_key(key), index, model.state_dict(),
                           _member_meta(cfg, key, data.settings.dim, index, info))
    return {"member": index, "ran": True, **info}


def ensemble_seed(cfg: ExperimentConfig) -> int:
    """Seed of a batched pass's shared slices (image order, buffers, slice contents), from classifier.seed."""
    return int(digest(["ensemble", cfg.classifier.seed])[:8], 16)


def train_members(cfg: ExperimentConfig, store: FeatureStore, refs: list[ImageRef], key: Key,
                  indices: list[int], progress: bool = True, prefetch: bool = True,
                  label: str = "") -> list[dict[str, Any]]:
    """Train the members `indices` not yet committed in one batched pass (pipeline.ensemble.train_members);
    each is written as soon as it stops, under the same members key and index as an independent member.
    Returns the infos of the members trained, by index (empty when all were committed)."""
    loc = store.location
    todo = [i for i in indices if not artifacts.member_committed(loc, members_key(key), i)]
    if not todo:
        return []
    c, d = cfg.classifier, cfg.dataset
    data = training_data(cfg, store, refs)
    shared_seed = ensemble_seed(cfg)
    infos: list[dict[str, Any]] = []

    def epoch_slices(epoch: int):
        return pixels.epoch_slices(data.entries, data.labels.__getitem__, data.slice_features, d.ignore_label,
                                   epoch, shared_seed, images_per_buffer=c.images_per_buffer, prefetch=prefetch,
                                   device=data.settings.device,
                                   max_pixels=None if data.per_epoch is None else data.per_epoch * c.batch_size)

    def write(position: int, model: torch.nn.Module, info: dict[str, Any]) -> None:
        index = todo[position]
        artifacts.write_member(loc, members_key(key), index, model.state_dict(),
                               _member_meta(cfg, key, data.settings.dim, index, {**info, "ensemble": "batched"}))
        infos.append({"member": index, "ran": True, **info})

    on_cpu = torch.device(data.settings.device).type == "cpu"
    # one task on every core: the batched products use them all (independent members use one each, in parallel)
    with torch_threads((cfg.features.cpu_threads or os.cpu_count() or 1) if on_cpu else 1):
        ensemble.train_members(data.settings, [member_seed(cfg, i) for i in todo], epoch_slices,
                               device=data.settings.device, iterations_per_epoch=data.per_epoch,
                               on_member_done=write, progress=progress, desc=labelled(label, f"{len(todo)} members (batched)"))
    return sorted(infos, key=lambda info: info["member"])


def load_members(loc: StoreLocation, key: Key, model_num: int) -> list[torch.nn.Module]:
    members = []
    for i in range(model_num):
        payload, _ = artifacts.read_member(loc, members_key(key), i)  # bytes checked against their checksum
        what = f"member {loc.path(artifacts.member_key(members_key(key), i))}"
        try:
            model, _ = clf.load_member(io.BytesIO(payload), what=what)
        except ValueError as err:  # refused (code or objects) or not a member: the store holds something else
            raise StoreError(f"{err}; run `ddpmseg store verify {loc.url} --repair` to remove it") from None
        members.append(model)
    return members
