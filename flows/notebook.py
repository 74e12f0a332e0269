"""What a notebook reads: a config's stored features and masks as lazy xarray DataArrays, its trained ensemble.

Nothing here runs a stage or imports Prefect: the images of a split are listed from the data set on disk
(flows.prepare with write=False), the keys are the stages' own (flows.stage_keys), the arrays are the store's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from pipeline.config import ExperimentConfig, load_config
from storage.features import FeatureStore, StoreError
from storage.location import StoreLocation

__all__ = ["Ensemble", "as_config", "open_features", "open_masks", "load_ensemble"]


def as_config(config: ExperimentConfig | str | Path) -> ExperimentConfig:
    """A config object, or the path of an experiment YAML file (validated)."""
    return config if isinstance(config, ExperimentConfig) else load_config(config)


def _store(cfg: ExperimentConfig, store: str | None) -> FeatureStore:
    location = StoreLocation.parse(store or cfg.store)
    if not location.exists("zarr.json"):
        raise StoreError(f"{location.url}: no feature store there (run `ddpmseg run` on the config first)")
    return FeatureStore(location, read_only=True)


def _refs(cfg: ExperimentConfig, store: FeatureStore, split: str):
    from flows import prepare as prepare_stage

    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    return prepare_stage.prepare_split(cfg, store, split, write=False)


def _upsampled(native: da.Array, size: int) -> da.Array:
    """(N, C, h, w) float16 -> (N, C, size, size) float32, per image: pipeline.features.upsample_concat
    (bilinear, align_corners=False, upcast to float32 first), the features the classifier sees."""
    import torch

    from pipeline.features import upsample_concat

    def one_chunk(block: np.ndarray) -> np.ndarray:
        return np.stack([upsample_concat([torch.from_numpy(np.ascontiguousarray(image))], size).numpy()
                         for image in block])

    return native.map_blocks(one_chunk, dtype=np.float32, chunks=(native.chunks[0], native.chunks[1], (size,),
                                                                   (size,)))


def open_features(config: ExperimentConfig | str | Path, split: str = "train", t: int | None = None,
                  block: int | None = None, *, store: str | None = None, upsample: bool = False) -> xr.DataArray:
    """One (timestep, block) of a split's stored features as a lazy, dask-backed DataArray.

    dims (image, channel, y, x), float16 at the block's native resolution (upsample=True: float32 at the image
    resolution, interpolated lazily as the classifier does); coordinates image (the file stems), image_id (the
    store's content ids), t and block. t / block default to the config's first step / block. A StoreError names
    the first image whose features are not in the store."""
    from flows.stage_keys import unit_for

    cfg = as_config(config)
    t = cfg.features.steps[0] if t is None else int(t)
    block = cfg.sorted_blocks[0] if block is None else int(block)
    if t not in cfg.features.steps:
        raise ValueError(f"t={t}: not a step of this config (features.steps {list(cfg.features.steps)})")
    if block not in cfg.sorted_blocks:
        raise ValueError(f"block={block}: not a block of this config (features.blocks {cfg.sorted_blocks})")
    feature_store = _store(cfg, store)
    refs = _refs(cfg, feature_store, split)
    unit = unit_for(cfg, t)
    images = [feature_store.feature_arrays(unit, r.image_id, [block])[0] for r in refs]
    data = da.stack(images)  # one chunk per image
    if upsample:
        data = _upsampled(data, cfg.image_size)
    return xr.DataArray(
        data, dims=("image", "channel", "y", "x"),
        coords={"image": [r.stem for r in refs], "image_id": ("image", [r.image_id for r in refs]),
                "channel": np.arange(data.shape[1]), "y": np.arange(data.shape[2]), "x": np.arange(data.shape[3]),
                "t": t, "block": block},
        name=f"b{block:02d}",
        attrs={"split": split, "unit": unit.path, "store": feature_store.location.url,
               "resolution": "image" if upsample else "native"})


def _keys(cfg: ExperimentConfig, store: FeatureStore):
    from flows import prepare as prepare_stage
    from flows import stage_keys

    train = prepare_stage.prepare(cfg, store, "train", write=False).extraction(cfg, "train")
    train_key = stage_keys.train_key(cfg, train)
    test = _refs(cfg, store, "test")
    return train_key, stage_keys.evaluate_key(cfg, train_key, test)


def open_masks(config: ExperimentConfig | str | Path, *, store: str | None = None) -> xr.DataArray:
    """The evaluation's predicted test masks: (image, y, x) uint8, lazy, coordinates image (stems) and image_id.
    A StoreError when the config has not been evaluated in this store."""
    import zarr

    cfg = as_config(config)
    feature_store = _store(cfg, store)
    _, eval_key = _keys(cfg, feature_store)
    path = f"evaluations/{eval_key.value}/masks"
    try:
        arr = feature_store.root[path]
    except KeyError:
        raise StoreError(f"{feature_store.location.path(path)}: no masks for this config "
                         f"(run `ddpmseg run` or `ddpmseg evaluate` on it first)") from None
    if not isinstance(arr, zarr.Array):
        raise StoreError(f"{feature_store.location.path(path)}: not an array")
    data = da.from_array(arr, chunks=arr.chunks, asarray=True)
    return xr.DataArray(data, dims=("image", "y", "x"),
                        coords={"image": list(arr.attrs["stems"]), "image_id": ("image", list(arr.attrs["image_ids"]))},
                        name="mask", attrs={"store": feature_store.location.url, "path": path})


@dataclass
class Ensemble:
    """A config's trained MLP members (eval mode, CPU), ready to predict features."""

    members: list  # torch.nn.Module, one per member
    number_class: int
    dim: int  # features per pixel: the channels of every (t, block), official order
    image_size: int

    def predict(self, features: Any) -> np.ndarray:
        """features (D, H, W) at image resolution (e.g. concatenated upsampled blocks; numpy or torch) ->
        (H, W) mask: the members' mode vote (pipeline.predict.predict_image)."""
        import torch

        from pipeline.predict import predict_image

        tensor = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
        if tensor.ndim != 3 or tensor.shape[0] != self.dim:
            raise ValueError(f"features: expected shape ({self.dim}, H, W), got {tuple(tensor.shape)}")
        return predict_image(self.members, tensor.float())[0]

    def predict_maps(self, maps: list[Any]) -> Any:
        """One image's native maps in the official order (for t in steps, for block in blocks) -> a
        pipeline.predict.Prediction (mask, mean probabilities, uncertainty), exactly as the evaluate stage."""
        import torch

        from pipeline.predict import predict_maps

        return predict_maps(self.members, [torch.as_tensor(np.asarray(m)) for m in maps], self.image_size)


def load_ensemble(config: ExperimentConfig | str | Path, *, store: str | None = None) -> Ensemble:
    """The trained members of a config's train stage. A StoreError when it has not been trained in this store."""
    from flows.train import load_members
    from storage import artifacts

    cfg = as_config(config)
    feature_store = _store(cfg, store)
    train_key, _ = _keys(cfg, feature_store)
    if artifacts.read_record(feature_store.location, "train", train_key.value) is None:
        raise StoreError(f"{feature_store.location.url}: this config's train stage ({train_key.short}) is not in "
                         f"the store (run `ddpmseg train` on it first)")
    members = load_members(feature_store.location, train_key, cfg.classifier.model_num)
    return Ensemble(members, cfg.dataset.number_class, _in_features(members[0]), cfg.image_size)


def _in_features(model: Any) -> int:
    import torch

    return next(m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear))
