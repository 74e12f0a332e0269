"""The three stages as plain functions over (config, store): prepare views, extract, train, evaluate.

Each stage is addressed by a key (storage.keys) over exactly its inputs and is skipped when its record is
committed in the store. Prefect tasks (flows/segment.py) are thin wrappers around these functions; tests call
them directly. Arrays never cross a stage boundary: stages exchange image ids and keys.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline import backbone as bb
from pipeline import classifier as clf
from pipeline import augment, datasets, features, memory, metrics, pixels, predict
from pipeline.config import ExperimentConfig, config_to_dict
from storage import artifacts
from storage.features import FeatureStore, StoreError, UnitSpec, to_float16
from storage.maintenance import References
from storage.keys import Key, array_digest, digest, file_digest
from storage.location import StoreLocation

BASE_VIEW = "base"


@dataclass(frozen=True)
class ImageRef:
    """One image of a split as the stages see it: a content id, its label's hash and a display name."""

    image_id: str  # content hash of the base image (the same in every view of it)
    label_hash: str  # hash of the label in this view
    stem: str
    view: str = BASE_VIEW

    @property
    def entry(self) -> str:
        """'<view>/<image_id>': one row of training data."""
        return f"{self.view}/{self.image_id}"


# -- fingerprints --------------------------------------------------------------------------------------------------
def backbone_fingerprint(cfg: ExperimentConfig) -> dict[str, Any]:
    if cfg.model.kind == "rgb":
        return {"kind": "rgb", "image_size": cfg.image_size}
    flags = cfg.model.full_flags()
    if cfg.model.checkpoint is None:
        weights = {"random_init_seed": cfg.model.init_seed, "zero_convs_redrawn": True}
    else:
        path = Path(cfg.model.checkpoint)
        if not path.is_file():
            raise bb.BackboneError(f"{path}: checkpoint not found (model.checkpoint)")
        weights = {"checkpoint_sha256": file_digest(path)}
    return {"weights": weights, "flags": flags}


def backbone_tag(cfg: ExperimentConfig) -> str:
    if cfg.model.kind == "rgb":
        name = "rgb"
    else:
        name = Path(cfg.model.checkpoint).stem if cfg.model.checkpoint else f"random{cfg.model.init_seed}"
    return f"{name}-{digest(backbone_fingerprint(cfg))[:12]}"


def feature_spec(cfg: ExperimentConfig) -> dict[str, Any]:
    f = cfg.features
    return {"share_noise": f.share_noise, "noise_seed": f.seed, "noise_generator": f.noise_generator,
            "input_activations": f.input_activations, "image_size": cfg.image_size}


def train_views(cfg: ExperimentConfig) -> list[tuple[str, int, list]]:
    """(tag, view index, transform specs) of each train-time augmented view."""
    a = cfg.augmentation
    spec = [t.model_dump() for t in a.transforms]
    tag = digest({"transforms": spec, "seed": a.seed})[:8]
    return [(f"aug-{tag}-v{i:02d}", i, list(a.transforms)) for i in range(1, a.views + 1)]


def tta_views(cfg: ExperimentConfig) -> list[tuple[str, int, list]]:
    """(tag, view index, transform specs) of each test-time view (the original image is the base view)."""
    out = []
    for i, specs in enumerate(cfg.tta.specs(), start=1):
        tag = digest({"transforms": [t.model_dump() for t in specs], "seed": cfg.tta.seed})[:8]
        out.append((f"tta-{tag}", i, specs))
    return out


def unit_for(cfg: ExperimentConfig, t: int, view: str = BASE_VIEW) -> UnitSpec:
    return UnitSpec(backbone=backbone_tag(cfg), view=view, t=t, spec=digest(feature_spec(cfg))[:8])


def image_id_of(image: torch.Tensor) -> str:
    """Content id of an image: hash of the exact model input (after the base transform)."""
    return array_digest(image.numpy())[:20]


def train_key(cfg: ExperimentConfig, refs: list[ImageRef]) -> Key:
    """refs: the base training images and their augmented views."""
    c = cfg.classifier
    hyper = {k: v for k, v in c.model_dump().items() if k != "model_num"}
    base = [[r.image_id, r.label_hash] for r in refs if r.view == BASE_VIEW]
    views = sorted({r.view for r in refs if r.view != BASE_VIEW})
    augmented = [[r.view, r.image_id, r.label_hash] for r in refs if r.view != BASE_VIEW]
    return Key("train", {
        "backbone": backbone_fingerprint(cfg), "features": feature_spec(cfg),
        "steps": list(cfg.features.steps), "blocks": cfg.sorted_blocks,
        "images": base, "augmentation": {"views": views, "keep_iterations": cfg.augmentation.keep_iterations,
                                         "labels": digest(augmented)[:16]},
        "classifier": hyper, "model_num": c.model_num,
        "number_class": cfg.dataset.number_class, "ignore_label": cfg.dataset.ignore_label,
    })


def members_key(train: Key) -> str:
    """Where a train key's members live: its inputs without model_num, so growing the ensemble reuses members."""
    return digest({k: v for k, v in train.inputs.items() if k != "model_num"})[:32]


def evaluate_key(cfg: ExperimentConfig, train: Key, refs: list[ImageRef]) -> Key:
    """refs: the base test images (test-time views are named by the tta settings)."""
    return Key("evaluate", {"train": train.value,
                            "images": [[r.image_id, r.label_hash] for r in refs if r.view == BASE_VIEW],
                            "evaluation": cfg.evaluation.model_dump(),
                            "tta": {**cfg.tta.model_dump(), "views": [v[0] for v in tta_views(cfg)]},
                            "postprocess": cfg.postprocess.model_dump()})


# -- prepare: load a split, write its views ------------------------------------------------------------------------
def prepare_split(cfg: ExperimentConfig, store: FeatureStore, split: str, write: bool = True) -> list[ImageRef]:
    """Load a split from disk (validating it), store each image's model input and label; return the refs.

    With write=False nothing is written (for read-only questions such as `ddpmseg status`)."""
    d = cfg.dataset
    root, number = (d.train_dir, d.training_number) if split == "train" else (d.test_dir, d.testing_number)
    samples = datasets.load_split(root, number, cfg.image_size, d.number_class, d.ignore_label,
                                  train=(split == "train"))
    refs = []
    for s in samples:
        image_id, label_hash = image_id_of(s.image), array_digest(s.label)[:20]
        if write and not store.view_committed(BASE_VIEW, image_id, label_hash):
            store.write_view(BASE_VIEW, image_id, s.image.numpy(), s.label, label_hash,
                             {"image_size": cfg.image_size})
        refs.append(ImageRef(image_id, label_hash, s.image_path.stem))
    return refs


def prepare_views(cfg: ExperimentConfig, store: FeatureStore, base: list[ImageRef],
                  views: list[tuple[str, int, list]], write: bool = True) -> list[ImageRef]:
    """Derive each view of each base image (deterministic from spec, seed, view index, image id) and store it."""
    refs = []
    for ref in base:
        if views and not store.view_committed(BASE_VIEW, ref.image_id, ref.label_hash):
            if not write:
                continue
            raise StoreError(f"view {BASE_VIEW} image {ref.image_id} ({ref.stem}) is not in the store: "
                             f"prepare the base split first")
        image = label = None
        for tag, index, specs in views:
            if image is None:
                image = augment.to_uint8(store.read_view_input(BASE_VIEW, ref.image_id))
                label = store.read_view_label(BASE_VIEW, ref.image_id, ref.label_hash)
            seed = cfg.augmentation.seed if tag.startswith("aug-") else cfg.tta.seed
            aug_image, aug_label = augment.apply_view(image, label, specs, seed, index, ref.image_id,
                                                      cfg.dataset.ignore_label)
            label_hash = array_digest(aug_label)[:20]
            if write and not store.view_committed(tag, ref.image_id, label_hash):
                store.write_view(tag, ref.image_id, augment.from_uint8(aug_image), aug_label, label_hash,
                                 {"image_size": cfg.image_size, "view_index": index, "base_label": ref.label_hash})
            refs.append(ImageRef(ref.image_id, label_hash, ref.stem, tag))
    return refs


@dataclass(frozen=True)
class SplitRefs:
    """A split's base images and their derived views (augmented views for train, test-time views for test)."""

    base: list[ImageRef]
    views: list[ImageRef]

    def extraction(self, cfg: ExperimentConfig, split: str) -> list[ImageRef]:
        """The refs whose features this split needs."""
        if split == "test" and not cfg.tta.include_original:
            return list(self.views)
        return self.base + self.views


def prepare(cfg: ExperimentConfig, store: FeatureStore, split: str, write: bool = True) -> SplitRefs:
    base = prepare_split(cfg, store, split, write)
    views = train_views(cfg) if split == "train" else tta_views(cfg)
    return SplitRefs(base, prepare_views(cfg, store, base, views, write))


# -- extract -------------------------------------------------------------------------------------------------------
def _noise_for(cfg: ExperimentConfig, image_ids: list[str], t: int, device: torch.device) -> torch.Tensor | None:
    f = cfg.features
    if f.share_noise:
        return bb.make_noise(f.seed, cfg.image_size, device, mode=f.noise_generator)
    # Not shared: still deterministic, from (seed, image, t), so a re-run or a teammate gets the same features.
    seeds = [int(digest([f.seed, i, t])[:8], 16) for i in image_ids]
    return torch.cat([bb.make_noise(s, cfg.image_size, device) for s in seeds])


def extract_key(cfg: ExperimentConfig, refs: list[ImageRef]) -> Key:
    """Key of extracting a split: backbone, feature spec, steps, blocks and the images' content ids."""
    return Key("extract", {"backbone": backbone_fingerprint(cfg), "features": feature_spec(cfg),
                           "steps": list(cfg.features.steps), "blocks": cfg.sorted_blocks,
                           "images": sorted({r.entry for r in refs})})


@dataclass(frozen=True)
class ForwardJob:
    """One UNet forward: a batch of images at one timestep, and the blocks they still lack."""

    t: int
    view: str
    image_ids: tuple[str, ...]
    blocks: tuple[int, ...]


def extract_plan(cfg: ExperimentConfig, store: FeatureStore, refs: list[ImageRef]) -> list[ForwardJob]:
    """The forwards still needed: for each t, images grouped by the set of blocks they lack, in batches; a
    batch's jobs for all t are consecutive.

    Reads only the commit markers, so a killed run resumes at exactly the unfinished (image, t) pairs.
    """
    blocks = set(cfg.sorted_blocks)
    jobs: list[ForwardJob] = []
    views = list(dict.fromkeys(r.view for r in refs))
    for t in cfg.features.steps:
        for view in views:
            unit = unit_for(cfg, t, view)
            by_missing: dict[tuple[int, ...], list[str]] = {}
            for image_id in dict.fromkeys(r.image_id for r in refs if r.view == view):
                missing = tuple(sorted(blocks - store.committed_blocks(unit, image_id)))
                if missing:
                    by_missing.setdefault(missing, []).append(image_id)
            for missing, ids in by_missing.items():
                for i in range(0, len(ids), cfg.features.batch_size):
                    jobs.append(ForwardJob(t, view, tuple(ids[i:i + cfg.features.batch_size]), missing))
    # batch-major: a batch's forwards at every t run back to back (t ascending), so its inputs are read once
    first_seen: dict[tuple[str, tuple[str, ...]], int] = {}
    for job in jobs:
        first_seen.setdefault((job.view, job.image_ids), len(first_seen))
    return sorted(jobs, key=lambda job: first_seen[(job.view, job.image_ids)])


def extract_split(cfg: ExperimentConfig, store: FeatureStore, refs: list[ImageRef], progress: bool = True,
                  desc: str = "extract") -> dict[str, int]:
    """Run the UNet only for the (image, timestep) pairs whose blocks are missing; write them to the store.

    One forward per (batch of images, t); returns {"unet_forwards", "images_written"}.
    """
    jobs = extract_plan(cfg, store, refs)
    counts = {"unet_forwards": 0, "images_written": 0}
    if not jobs:
        return counts
    device = bb.resolve_device(cfg.features.device)
    with torch_threads(cfg.features.cpu_threads or os.cpu_count() or 1):
        _extract_jobs(cfg, store, jobs, device, counts, progress, desc)
    return counts


def _extract_jobs(cfg: ExperimentConfig, store: FeatureStore, jobs: list[ForwardJob], device: torch.device,
                  counts: dict[str, int], progress: bool, desc: str) -> None:
    """Forwards in this thread; each forward's writes (compression, checksums, store I/O, commit markers) in one
    writer thread, so they overlap the next forward. At most one batch waits to be written (bounded memory); a
    write error stops the loop and is raised here, and an image counts as written only once its commit is done."""
    model, diffusion = _load_backbone(cfg, device) if cfg.model.kind == "ddpm" else (None, None)
    provenance = {"backbone": backbone_fingerprint(cfg), "features": feature_spec(cfg)}

    def write(unit: UnitSpec, ids: list[str], acts: dict[int, np.ndarray], blocks: list[int]) -> None:
        for j, image_id in enumerate(ids):
            store.write_features(unit, image_id, {b: acts[b][j] for b in blocks})
            counts["images_written"] += 1

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddpmseg-write") as writer:
        pending = None
        inputs_of = None  # (view, image ids) whose inputs x0 holds
        try:
            for job in tqdm(jobs, desc=desc, unit="fwd", disable=not progress):
                unit = unit_for(cfg, job.t, job.view)
                store.ensure_unit(unit, {**provenance, "t": job.t, "view": job.view})
                ids = list(job.image_ids)
                if inputs_of != (job.view, job.image_ids):  # a batch's jobs are consecutive: read once per batch
                    x0 = torch.stack([torch.from_numpy(store.read_view_input(job.view, i)) for i in ids]).to(device)
                    inputs_of = (job.view, job.image_ids)
                if cfg.model.kind == "rgb":
                    acts = {0: rgb_features(x0.cpu())}
                else:
                    noise = _noise_for(cfg, ids, job.t, device)
                    acts = bb.extract_blocks(model, diffusion, x0, job.t, noise, list(job.blocks),
                                             cfg.features.input_activations)
                    counts["unet_forwards"] += 1
                # float16 here, on the forward's threads: the writer only checks, encodes and stores
                acts = {b: to_float16(a, f"{unit.path} images {', '.join(ids)} block {b}") for b, a in acts.items()}
                if pending is not None:
                    pending.result()  # the previous batch is committed (or its error raised) before queueing more
                pending = writer.submit(write, unit, ids, acts, list(job.blocks))
            if pending is not None:
                pending.result()
        except BaseException:
            if pending is not None:
                pending.result()  # an earlier failure (a write that could not finish) is the one to report
            raise

def rgb_features(x0: torch.Tensor) -> torch.Tensor:
    """The rgb baseline's map: (B, 3, H, W) images in [-1, 1] -> (B, 5, H, W): r, g, b, y, x (coordinates in [-1, 1])."""
    b, _, h, w = x0.shape
    ys = torch.linspace(-1, 1, h).view(1, 1, h, 1).expand(b, 1, h, w)
    xs = torch.linspace(-1, 1, w).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([x0.float(), ys, xs], dim=1)


_BACKBONE_CACHE: dict[tuple[str, str], tuple[Any, Any]] = {}


def _load_backbone(cfg: ExperimentConfig, device: torch.device):
    """Build (or reuse: one per process, e.g. a Dask worker running many extraction batches) the backbone."""
    key = (digest(backbone_fingerprint(cfg)), str(device))
    if key not in _BACKBONE_CACHE:
        _BACKBONE_CACHE.clear()
        _BACKBONE_CACHE[key] = _build_backbone(cfg, device)
    return _BACKBONE_CACHE[key]


def _build_backbone(cfg: ExperimentConfig, device: torch.device):
    torch.manual_seed(cfg.model.init_seed)
    model, diffusion = bb.build_backbone(cfg.model.full_flags(), device)
    if cfg.model.checkpoint is not None:
        bb.load_checkpoint(model, cfg.model.checkpoint)
    else:
        bb.redraw_zero_initialised_convs(model)
    return model, diffusion


# -- train ---------------------------------------------------------------------------------------------------------
def _read_entry_maps(cfg: ExperimentConfig, store: FeatureStore, entry: str) -> list[torch.Tensor]:
    """entry '<view>/<image_id>' -> that image's maps in the official order (float16, as stored)."""
    view, image_id = entry.split("/")
    units = [unit_for(cfg, t, view) for t in cfg.features.steps]
    return [torch.from_numpy(m) for m in store.read_maps(units, image_id, cfg.sorted_blocks)]


def _map_reader(cfg: ExperimentConfig, store: FeatureStore, cache_size: int) -> Callable[[str], list[torch.Tensor]]:
    """entry '<view>/<image_id>' -> that image's maps in the official order, a few images cached, as float32
    channels-last (features.sampling_maps: sampled in place, 2x the float16 size)."""
    cache: dict[str, list[torch.Tensor]] = {}

    def maps_of(entry: str) -> list[torch.Tensor]:
        if entry not in cache:
            if len(cache) >= cache_size:
                cache.pop(next(iter(cache)))
                memory.release_free_memory()  # the evicted maps' pages, wherever the heaps hold them
            cache[entry] = features.sampling_maps(_read_entry_maps(cfg, store, entry))
        return cache[entry]

    return maps_of


def _slice_sampler(cfg: ExperimentConfig, store: FeatureStore, slots: int) -> Callable[[pixels.PixelSlice],
                                                                                   torch.Tensor]:
    """slice -> (n, D) features of its pixels. The images of the slice's buffer are held in one set of
    features.MapTables (`slots` images, allocated once, float32 channels-last), each read from the store when a
    slice first needs it; each slice is then sampled with one fused op per map, in slice order, into one of two
    full-size slice buffers (allocated once: no page faults per slice, a footprint that does not grow with the
    number of images or epochs)."""
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
                        tables = features.map_tables([tuple(m.shape) for m in maps], slots)
                    kept[entry] = free.pop(0)
                    features.load_maps(tables, kept[entry], maps)
            slot_of.clear()
            slot_of.update(kept)
        slots_of_images = torch.tensor([slot_of[entry] for entry in part.images], dtype=torch.long)
        ring, calls = calls % 2, calls + 1
        if outputs[ring] is None or outputs[ring].shape[0] < len(part.labels):  # full size at once: a flat peak
            rows = max(len(part.labels), pixels.SLICE_PIXELS)
            outputs[ring] = torch.empty((rows, tables.dim), dtype=torch.float32)
        return features.sample_tables(tables, slots_of_images[part.image], part.ys, part.xs, cfg.image_size,
                                      out=outputs[ring])

    return slice_features


def feature_dim(cfg: ExperimentConfig, store: FeatureStore, image_id: str, view: str = BASE_VIEW) -> int:
    units = [unit_for(cfg, t, view) for t in cfg.features.steps]
    return sum(int(a.shape[0]) for u in units for a in store.feature_arrays(u, image_id, cfg.sorted_blocks))


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


def member_seed(cfg: ExperimentConfig, index: int) -> int:
    """Each member's seed derives from (classifier.seed, index) so members can train independently, in parallel."""
    return int(digest(["member", cfg.classifier.seed, index])[:8], 16)


def train_member(cfg: ExperimentConfig, store: FeatureStore, refs: list[ImageRef], key: Key, index: int,
                 progress: bool = True, prefetch: bool = True) -> dict[str, Any]:
    """Train ensemble member `index` from the store (skipped when committed); returns its info.

    prefetch: read and sample the next slice of pixels in a second thread while the MLP trains (same result)."""
    loc = store.location
    if artifacts.member_committed(loc, members_key(key), index):
        return {"member": index, "ran": False}
    c, d = cfg.classifier, cfg.dataset
    dim = feature_dim(cfg, store, refs[0].image_id, refs[0].view)
    start = c.early_stop_start_epoch if c.early_stopping else c.max_epochs + 1
    settings = clf.TrainSettings(number_class=d.number_class, dim=dim, lr=c.lr, batch_size=c.batch_size,
                                 max_epochs=c.max_epochs, optimizer=c.optimizer, weight_decay=c.weight_decay,
                                 dropout=c.dropout, early_stop_start_epoch=start, patience=c.patience)
    memory.fix_malloc_thresholds()  # freed maps leave the process: the peak stays flat in the number of images
    # the images of the current buffer (a buffer never holds more than the training set)
    slice_features = _slice_sampler(cfg, store, slots=min(c.images_per_buffer, len(refs)))
    labels = {r.entry: store.read_view_label(r.view, r.image_id, r.label_hash) for r in refs}
    entries = [r.entry for r in refs]
    seed = member_seed(cfg, index)
    per_epoch = None  # the study keeps the paper's iterations per epoch on the enlarged set
    if cfg.augmentation.keep_iterations and any(r.view != BASE_VIEW for r in refs):
        base = [labels[r.entry] for r in refs if r.view == BASE_VIEW]
        per_epoch = max(1, pixels.count_labelled(base, d.ignore_label) // c.batch_size)

    def epoch_batches(epoch: int):
        batches = pixels.epoch_batches(entries, labels.__getitem__, slice_features, d.ignore_label, c.batch_size,
                                       epoch, seed, images_per_buffer=c.images_per_buffer, prefetch=prefetch)
        return batches if per_epoch is None else itertools.islice(batches, per_epoch)

    with torch_threads(1):  # identical numerics wherever a member trains; small MLPs are fastest on one thread
        model, info = clf.train_member(settings, epoch_batches, seed=seed, progress=progress,
                                       desc=f"member {index + 1}/{c.model_num}")
    meta = {"number_class": d.number_class, "dim": dim, "dropout": c.dropout, "seed": seed, "index": index,
            "train_key": key.value, **{k: v for k, v in info.items() if isinstance(v, (int, float, bool, str))}}
    artifacts.write_member(loc, members_key(key), index, model.state_dict(), meta)
    return {"member": index, "ran": True, **info}


def load_members(loc: StoreLocation, key: Key, model_num: int) -> list[torch.nn.Module]:
    members = []
    for i in range(model_num):
        state, meta = artifacts.read_member(loc, members_key(key), i)
        model = clf.build_classifier(meta["number_class"], meta["dim"], meta.get("dropout", 0.0))
        model.load_state_dict(state)
        members.append(model.eval())
    return members


# -- evaluate ------------------------------------------------------------------------------------------------------
@dataclass
class Prediction:
    mask: np.ndarray  # (H, W) uint8: mode over members
    probs: np.ndarray  # (C, H, W) float32: members' mean softmax
    uncertainty: float  # mean of the top 10% JS values


def predict_maps(members: list[torch.nn.Module], maps: list[torch.Tensor], size: int,
                 pixels_per_chunk: int = 16384) -> Prediction:
    """Predict one image from its native maps, building features chunk by chunk (bounded memory)."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    labels, js, probs = [], [], []
    for i in range(0, ys.numel(), pixels_per_chunk):
        feats = features.sample_pixel_features(maps, ys[i:i + pixels_per_chunk], xs[i:i + pixels_per_chunk], size)
        logits = predict.member_logits(members, feats)
        labels.append(predict.mode_vote(logits.argmax(-1)))
        js.append(predict.js_uncertainty(logits))
        probs.append(torch.softmax(logits, -1).mean(0))
    mask = torch.cat(labels).reshape(size, size).numpy().astype(np.uint8)
    prob = torch.cat(probs).T.reshape(-1, size, size).numpy()
    return Prediction(mask, prob, predict.image_uncertainty(torch.cat(js)))


def merge_views(predictions: list[Prediction], how: str) -> np.ndarray:
    """Per-pixel merge of (geometry-undone) view predictions: majority vote (ties -> smallest label) or mean prob."""
    if len(predictions) == 1:
        return predictions[0].mask
    if how == "vote":
        return predict.mode_vote(torch.from_numpy(np.stack([p.mask for p in predictions]).astype(np.int64)
                                                  .reshape(len(predictions), -1))).reshape(
            predictions[0].mask.shape).numpy().astype(np.uint8)
    return np.mean([p.probs for p in predictions], axis=0).argmax(0).astype(np.uint8)


def _undo(pred: Prediction, specs: list) -> Prediction:
    return Prediction(augment.undo_geometry(pred.mask, specs), augment.undo_geometry(pred.probs, specs),
                      pred.uncertainty)


def save_palette_png(mask: np.ndarray, palette: list[tuple[int, int, int]] | None, path: Path) -> None:
    from PIL import Image

    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    flat = [v for rgb in (palette or []) for v in rgb]
    if not flat:  # a generic palette: distinct colours per class id
        rng = np.random.default_rng(0)
        flat = rng.integers(0, 256, size=256 * 3).tolist()
    img.putpalette(flat + [0] * (768 - len(flat)))
    img.save(path)


def evaluate(cfg: ExperimentConfig, store: FeatureStore, refs: list[ImageRef], train: Key, key: Key,
             progress: bool = True) -> dict[str, Any]:
    """Predict every test image (each test-time view, merged), score it, persist masks and metrics.

    refs: the base test refs; test-time views are derived from cfg.tta (their features must be extracted)."""
    loc = store.location
    members = load_members(loc, train, cfg.classifier.model_num)
    maps_of = _map_reader(cfg, store, cache_size=1)
    d = cfg.dataset
    views = ([(BASE_VIEW, [])] if cfg.tta.include_original else []) + [(t, s) for t, _, s in tta_views(cfg)]
    masks, gts, uncertainties = [], [], []
    for r in tqdm(refs, desc="evaluate", unit="img", disable=not progress):
        preds = [_undo(predict_maps(members, maps_of(f"{view}/{r.image_id}"), cfg.image_size), specs)
                 for view, specs in views]
        mask = merge_views(preds, cfg.tta.merge)
        if cfg.postprocess.closing:
            mask = augment.close_mask(mask)
        masks.append(mask)
        gts.append(store.read_view_label(BASE_VIEW, r.image_id, r.label_hash))
        uncertainties.append(preds[0].uncertainty)
    scores = metrics.score(masks, gts, d.number_class, d.ignore_label)
    mask_path = artifacts.write_masks(store.root, key.value, np.stack(masks), [r.image_id for r in refs],
                                      [r.stem for r in refs])
    result = {
        "miou": 100 * scores.official_miou, "miou_standard": 100 * scores.standard_miou,
        "pixel_accuracy": 100 * scores.pixel_accuracy, "uncertainty": float(np.mean(uncertainties)),
        "scores": scores.to_dict(), "images": [asdict(r) for r in refs], "uncertainties": uncertainties,
        "class_names": d.class_names, "masks_store_path": mask_path, "views": [v for v, _ in views],
    }
    loc.write_bytes(f"evaluations/{key.value}/metrics.json", json.dumps(result, indent=1).encode())
    return result


def write_outputs(cfg: ExperimentConfig, store: FeatureStore, result: dict[str, Any],
                  summary: dict[str, Any]) -> dict[str, str]:
    """Copy an evaluation's masks (PNG + npy) and metrics.json into cfg.output_dir; returns their paths."""
    out = Path(cfg.output_dir)
    mask_dir = out / "masks"
    mask_dir.mkdir(parents=True, exist_ok=True)
    masks = store.root[result["masks_store_path"]][...]
    for ref, mask in zip(result["images"], masks):
        np.save(mask_dir / f"{ref['stem']}.npy", mask)
        if cfg.evaluation.save_png:
            save_palette_png(mask, cfg.dataset.palette, mask_dir / f"{ref['stem']}.png")
    metrics_path = out / "metrics.json"
    report_path = out / "report" / "report.html"
    previous = _read_json(metrics_path)
    if cfg.evaluation.gallery > 0 and (previous.get("evaluate_key") != summary.get("evaluate_key")
                                  or not report_path.is_file()):
        write_report(cfg, store, result, masks, out / "report")
    payload = {**summary, "config": config_to_dict(cfg), "result": result}
    metrics_path.write_text(json.dumps(payload, indent=1))
    paths = {"metrics_path": str(metrics_path), "masks_path": str(mask_dir)}
    if report_path.is_file():
        paths["report_path"] = str(report_path)
    return paths


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_report(cfg: ExperimentConfig, store: FeatureStore, result: dict[str, Any], masks: np.ndarray,
                 out: Path) -> dict[str, str]:
    """The evaluation report under `out`: scores, the worst images (image | ground truth | prediction | error
    map), IoU per class, mIoU per image ascending (pipeline.report.write_evaluation_report)."""
    from pipeline import report

    refs = [ImageRef(**r) for r in result["images"]]
    images = [store.read_view_input(BASE_VIEW, r.image_id) for r in refs]
    gts = [store.read_view_label(BASE_VIEW, r.image_id, r.label_hash) for r in refs]
    d = cfg.dataset
    return report.write_evaluation_report(out, images, gts, list(masks), result["scores"], [r.stem for r in refs],
                                          d.class_names, d.palette, d.ignore_label, k=cfg.evaluation.gallery,
                                          title=f"Evaluation report: {d.name}")


# -- the lock file: what the last run of this config used (for `ddpmseg status`) --------------------------------------
LOCK_NAME = "ddpmseg.lock.json"


def lock_path(cfg: ExperimentConfig) -> Path:
    return Path(cfg.output_dir) / LOCK_NAME


def write_lock(cfg: ExperimentConfig, keys: dict[str, Key], refs: list[ImageRef]) -> None:
    """Record each stage's key and inputs beside the outputs, like dvc.lock, merged with the previous lock."""
    path = lock_path(cfg)
    previous = read_lock(cfg)
    stages_ = {**previous.get("stages", {}),
               **{name: {"key": k.value, "inputs": k.inputs} for name, k in keys.items()}}
    names = {**previous.get("names", {}), **{r.image_id: r.stem for r in refs}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"stages": stages_, "names": names}, indent=1, sort_keys=True))
    tmp.replace(path)


def read_lock(cfg: ExperimentConfig) -> dict[str, Any]:
    return _read_json(lock_path(cfg))


def add_references(cfg: ExperimentConfig, store: FeatureStore, refs: References) -> References:
    """Add everything `cfg` needs from the store to `refs` (for `ddpmseg store gc`)."""
    split_refs = {split: prepare(cfg, store, split, write=False) for split in ("train", "test")}
    for split, sr in split_refs.items():
        for r in sr.extraction(cfg, split):
            for t in cfg.features.steps:
                refs.units.setdefault(unit_for(cfg, t, r.view).path, set()).add(r.image_id)
        refs.view_images.update(r.image_id for r in sr.base + sr.views)
    train = train_key(cfg, split_refs["train"].base + split_refs["train"].views)
    refs.train_keys.add(train.value)
    refs.member_keys.add(members_key(train))
    refs.evaluate_keys.add(evaluate_key(cfg, train, split_refs["test"].base).value)
    return refs
