"""The segmenter stages (DatasetDDPM, the official train_deeplab.py): a DeepLabV3 trained on the labelled
synthetic samples, then evaluated on the real test split like the pixel ensemble.

train: the samples kept by the official filter (pipeline.segmenter.kept_indices: the first max_data, then the
most and least uncertain dropped) train the network (pipeline.segmenter.train_segmenter); after every epoch its
checkpoint is stored (segmenters/<key>/epoch_<EEE>, commit-last, checksummed), so a killed run resumes after the
last committed epoch. The backbone starts from datasetddpm.backbone_weights (imagenet: torchvision's ImageNet
ResNet, as the official; none: random). The key holds the label key, the filter, the network's settings and the
SHA-256 of the backbone weights' file (absent for none): a new uncertainty portion or other weights train again
without sampling or labelling.

evaluate: model selection as official: the epoch with the best official mIoU on the validation images (the
official validation_path is the labelled real training split), or the last epoch (datasetddpm.model_selection:
last); its masks and scores on the test split are stored and written like the ensemble's (flows/outputs.py).
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from pipeline import metrics, sampling
from pipeline.backbone import resolve_device
from pipeline.config import ConfigError, ExperimentConfig, segmenter_backbone_weights
from storage import artifacts
from storage.features import FeatureStore, StoreError
from storage.keys import Key, file_digest
from flows.label import label_key, labelled_samples
from flows.stage_keys import BASE_VIEW, ImageRef
from flows.synthesize import SamplingPlan


def segmenter_settings(cfg: ExperimentConfig):
    """pipeline.segmenter.SegmenterSettings from the datasetddpm section (resolution: the image size unless set,
    the official deeplab_res being the 256 of every data set); ConfigError naming a setting it refuses."""
    from pipeline.segmenter import SegmenterSettings

    d = cfg.datasetddpm
    try:
        return SegmenterSettings(backbone=d.backbone, resolution=d.resolution or cfg.image_size,
                                 learning_rate=d.learning_rate, batch_size=d.segmenter_batch_size, epochs=d.epochs,
                                 seed=d.seed, uncertainty_portion=d.uncertainty_portion, max_data=d.max_data,
                                 uncertainty_rule=d.uncertainty_rule)
    except ValueError as err:
        raise ConfigError(f"{cfg.source_path or 'the config'}: datasetddpm: {err}") from None


def segmenter_key(cfg: ExperimentConfig, plan: SamplingPlan, train: Key) -> Key:
    """The segmenter stage's key; the weights' file digest only when there are weights (`none` keeps the key of
    the runs made before backbone_weights existed, which all started random)."""
    inputs = {"labels": label_key(cfg, plan, train).value, "settings": asdict(segmenter_settings(cfg)),
              "number_class": cfg.dataset.number_class}
    weights = segmenter_backbone_weights(cfg)
    if weights is not None:
        inputs["backbone_weights_sha256"] = file_digest(weights)
    return Key("segmenter", inputs)


def backbone_state(cfg: ExperimentConfig) -> dict[str, Any] | None:
    """The backbone's initial state dict read (weights_only) from datasetddpm.backbone_weights, checked against the
    backbone's layout (on the meta device: no memory); None for none. ConfigError naming the file when it is no
    state dict of that backbone."""
    import warnings

    from pipeline.deeplab import create_segmenter, load_backbone_weights
    from pipeline.torchfile import TorchFileError, load_tensors

    path = segmenter_backbone_weights(cfg)
    if path is None:
        return None
    what = f"{cfg.source_path or 'the config'}: datasetddpm.backbone_weights {path}"
    try:
        state = load_tensors(path, what)
    except TorchFileError as err:
        raise ConfigError(str(err)) from None
    if not isinstance(state, dict):
        raise ConfigError(f"{what}: expected a state dict (name -> tensor), got {type(state).__name__}")
    d = cfg.datasetddpm
    try:
        with warnings.catch_warnings():  # loading into meta parameters copies nothing, which torch warns about
            warnings.simplefilter("ignore", UserWarning)
            load_backbone_weights(create_segmenter(d.backbone, cfg.dataset.number_class, device="meta"), state, what)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return state


def checkpoints_key(key: Key) -> str:
    """Where a segmenter's checkpoints live (segmenters/<this>/epoch_<EEE>)."""
    return key.value[:32]


def committed_epochs(cfg: ExperimentConfig, store: FeatureStore, key: Key) -> list[int]:
    return [e for e in range(cfg.datasetddpm.epochs)
            if artifacts.checkpoint_committed(store.location, checkpoints_key(key), e)]


def _checkpoint(store: FeatureStore, key: Key, epoch: int) -> dict[str, Any]:
    from pipeline.segmenter import load_checkpoint

    from pipeline.torchfile import TorchFileError

    payload, _ = artifacts.read_checkpoint(store.location, checkpoints_key(key), epoch)
    try:
        return load_checkpoint(payload)
    except (ValueError, TorchFileError) as err:
        raise StoreError(f"{store.location.path(artifacts.checkpoint_key(checkpoints_key(key), epoch))}: {err}; "
                         f"run `ddpmseg store verify {store.location.url} --repair`") from None


def kept_samples(cfg: ExperimentConfig, store: FeatureStore, plan: SamplingPlan,
                 train: Key) -> tuple[list[ImageRef], np.ndarray, np.ndarray]:
    """(labelled refs, their uncertainties, the indices the official filter keeps)."""
    from pipeline.segmenter import kept_indices

    refs, uncertainties = labelled_samples(cfg, store, plan, train)
    values = np.asarray(uncertainties, dtype=np.float64)
    d = cfg.datasetddpm
    try:
        return refs, values, kept_indices(values, d.uncertainty_portion, d.max_data, d.uncertainty_rule)
    except ValueError as err:  # e.g. the official rule keeps nothing of fewer than ~310 samples at 0.1
        raise ConfigError(f"{cfg.source_path or 'the config'}: datasetddpm: {err}") from None


def train(cfg: ExperimentConfig, store: FeatureStore, plan: SamplingPlan, train_key: Key,
          progress: bool = True, desc: str = "segmenter train") -> dict[str, Any]:
    """Train the segmenter on the kept samples, resuming after the last committed epoch; writes the record
    (the kept image ids) once every epoch is committed. Returns {"ran", "epochs_trained", "kept"}."""
    from pipeline.segmenter import checkpoint_bytes, train_segmenter

    key = segmenter_key(cfg, plan, train_key)
    loc = store.location
    if artifacts.read_record(loc, "segmenter", key.value) is not None:
        return {"ran": False, "epochs_trained": 0}
    refs, uncertainties, kept = kept_samples(cfg, store, plan, train_key)
    chosen = [refs[i] for i in kept]
    images = np.stack([sampling.to_uint8(store.read_view_input(BASE_VIEW, r.image_id)) for r in chosen])
    masks = np.stack([store.read_view_label(BASE_VIEW, r.image_id, r.label_hash) for r in chosen])
    done = committed_epochs(cfg, store, key)
    last = max(done) if done else None
    epochs_before = 0 if last is None else last + 1
    start = None if last is None else _checkpoint(store, key, last)
    trained = []

    def on_epoch(epoch: int, checkpoint: dict[str, Any]) -> None:
        artifacts.write_checkpoint(loc, checkpoints_key(key), epoch, checkpoint_bytes(checkpoint),
                                   {"epoch": epoch, "segmenter_key": key.value, "samples": len(chosen)})
        trained.append(epoch)

    settings = segmenter_settings(cfg)
    if epochs_before < settings.epochs:
        try:
            initial = backbone_state(cfg) if start is None else None  # a resumed run starts from its checkpoint
            train_segmenter(images, masks, cfg.dataset.number_class, settings, device=resolve_device(
                cfg.classifier.device), start=start, on_epoch=on_epoch, backbone_state=initial, progress=progress,
                desc=desc)
        except ValueError as err:  # refused data (fewer kept samples than a batch) or a checkpoint of another run
            raise ConfigError(f"{cfg.source_path or 'the config'}: datasetddpm segmenter: {err}") from None
    missing = [e for e in range(settings.epochs) if not artifacts.checkpoint_committed(loc, checkpoints_key(key), e)]
    if missing:
        raise StoreError(f"segmenter {key.short}: epochs {missing} were not checkpointed")
    artifacts.write_record(loc, key, {"kept_image_ids": [r.image_id for r in chosen],
                                      "kept_indices": [int(i) for i in kept], "uncertainties": uncertainties.tolist(),
                                      "epochs": settings.epochs, "checkpoints": checkpoints_key(key),
                                      "backbone_weights": cfg.datasetddpm.backbone_weights,
                                      "backbone_weights_sha256": key.inputs.get("backbone_weights_sha256")})
    return {"ran": True, "epochs_trained": len(trained), "kept": len(chosen)}


def evaluate_key(cfg: ExperimentConfig, segmenter: Key, validation: list[ImageRef], test: list[ImageRef]) -> Key:
    selection = cfg.datasetddpm.model_selection
    return Key("segmenter-evaluate", {
        "segmenter": segmenter.value, "model_selection": selection,
        "validation": [[r.image_id, r.label_hash] for r in validation] if selection == "validation" else [],
        "images": [[r.image_id, r.label_hash] for r in test], "evaluation": cfg.evaluation.model_dump()})


def _real_images(store: FeatureStore, refs: list[ImageRef]) -> tuple[np.ndarray, list[np.ndarray]]:
    """A split's images as uint8 (H, W, 3) (the stored inputs are k / 127.5 - 1: rounded back to k) and labels."""
    images = np.stack([np.rint((store.read_view_input(BASE_VIEW, r.image_id) + 1) * 127.5).clip(0, 255)
                       .astype(np.uint8).transpose(1, 2, 0) for r in refs])
    return images, [store.read_view_label(BASE_VIEW, r.image_id, r.label_hash) for r in refs]


def evaluate(cfg: ExperimentConfig, store: FeatureStore, plan: SamplingPlan, train_key: Key,
             validation: list[ImageRef], test: list[ImageRef], key: Key) -> dict[str, Any]:
    """Select the epoch (validation mIoU or last), predict the test split, score it, persist masks and metrics."""
    from pipeline.segmenter import load_segmenter, predict_segmenter, select_checkpoint

    seg_key = segmenter_key(cfg, plan, train_key)
    d, settings = cfg.dataset, segmenter_settings(cfg)
    device = resolve_device(cfg.classifier.device)

    def model_at(epoch: int):
        what = store.location.path(artifacts.checkpoint_key(checkpoints_key(seg_key), epoch))
        return load_segmenter(_checkpoint(store, seg_key, epoch), device=device, what=what)

    validation_miou: dict[int, float] = {}
    selected, selection = settings.epochs - 1, cfg.datasetddpm.model_selection
    if selection == "validation":
        images, labels = _real_images(store, validation)
        for epoch in range(settings.epochs):
            preds = predict_segmenter(model_at(epoch), images, settings.resolution, device=device)
            validation_miou[epoch] = 100 * metrics.score(list(preds), labels, d.number_class,
                                                         d.ignore_label).official_miou
        try:
            selected = select_checkpoint(validation_miou)  # the official order and tie rule
        except ValueError:  # no epoch above 0: the official has no checkpoint to test; the last one is
            selection = "last (no epoch scored above 0 on the validation images)"
    images, labels = _real_images(store, test)
    masks = predict_segmenter(model_at(selected), images, settings.resolution, device=device).astype(np.uint8)
    scores = metrics.score(list(masks), labels, d.number_class, d.ignore_label)
    mask_path = artifacts.write_masks(store.root, key.value, masks, [r.image_id for r in test], [r.stem for r in test])
    result = {
        "miou": 100 * scores.official_miou, "miou_standard": 100 * scores.standard_miou,
        "pixel_accuracy": 100 * scores.pixel_accuracy, "scores": scores.to_dict(),
        "images": [asdict(r) for r in test], "class_names": d.class_names, "masks_store_path": mask_path,
        "model_selection": selection, "selected_epoch": selected,
        "validation_miou": {str(e): v for e, v in validation_miou.items()}, "segmenter_key": seg_key.value,
    }
    artifacts.write_metrics(store.location, key.value, result)
    return result
