"""Tests of pipeline.classifier: official architecture and init, early stopping, training, member files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.classifier import (
    EarlyStopping,
    TrainSettings,
    build_classifier,
    build_optimizer,
    load_member,
    save_member,
    train_member,
)


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models: one intra-op thread avoids OpenMP oversubscription stalls on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def layer_summary(model: nn.Sequential) -> list[tuple[str, int | None]]:
    summary = []
    for layer in model:
        width = layer.out_features if isinstance(layer, nn.Linear) else getattr(layer, "num_features", None)
        summary.append((type(layer).__name__, width))
    return summary


@pytest.mark.parametrize(
    "number_class, widths",
    [(2, (128, 32)), (29, (128, 32)), (30, (256, 128)), (34, (256, 128))],
)
def test_architecture_follows_class_count(number_class, widths):
    model = build_classifier(number_class, dim=40)
    first, second = widths
    assert layer_summary(model) == [
        ("Linear", first), ("ReLU", None), ("BatchNorm1d", first),
        ("Linear", second), ("ReLU", None), ("BatchNorm1d", second),
        ("Linear", number_class),
    ]
    assert model[0].in_features == 40
    assert model(torch.randn(5, 40)).shape == (5, number_class)


def test_official_init():
    torch.manual_seed(0)
    model = build_classifier(20, dim=3000)
    first_linear = model[0]
    assert first_linear.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert first_linear.weight.mean().abs().item() < 1e-3
    for layer in model:
        if isinstance(layer, nn.Linear):
            assert torch.all(layer.bias == 0)
            # PyTorch's default (kaiming uniform) would give std 1/sqrt(3 * fan_in), far from 0.02 for fan_in 32
            assert layer.weight.std().item() == pytest.approx(0.02, rel=0.35)
        if isinstance(layer, nn.BatchNorm1d):
            assert torch.all(layer.weight == 1) and torch.all(layer.bias == 0)
            assert torch.all(layer.running_mean == 0) and torch.all(layer.running_var == 1)


def test_dropout_option_adds_dropout_after_every_relu():
    model = build_classifier(10, dim=8, dropout=0.4)
    names = [name for name, _ in layer_summary(model)]
    assert names == ["Linear", "ReLU", "Dropout", "BatchNorm1d", "Linear", "ReLU", "Dropout", "BatchNorm1d", "Linear"]
    assert all(layer.p == 0.4 for layer in model if isinstance(layer, nn.Dropout))
    assert not any(isinstance(layer, nn.Dropout) for layer in build_classifier(10, dim=8))


def test_optimizer_option():
    model = build_classifier(5, dim=8)
    adam = build_optimizer(model, TrainSettings(number_class=5, dim=8))
    assert type(adam) is torch.optim.Adam
    assert adam.param_groups[0]["lr"] == 1e-3 and adam.param_groups[0]["weight_decay"] == 0.0
    adamw = build_optimizer(model, TrainSettings(number_class=5, dim=8, optimizer="adamw", weight_decay=1e-4))
    assert type(adamw) is torch.optim.AdamW
    assert adamw.param_groups[0]["weight_decay"] == 1e-4
    with pytest.raises(ValueError, match="optimizer"):
        TrainSettings(number_class=5, dim=8, optimizer="sgd")


def test_early_stopping_exact_rule():
    stopper = EarlyStopping()
    # Epochs 0..3: nothing is recorded whatever the loss, even many iterations without improvement.
    for epoch in range(4):
        for _ in range(200):
            assert stopper.update(epoch, 5.0) is False
    assert stopper.counter == 0 and not stopper.active

    # Epoch 4: first loss improves on the official initial best (1e7).
    assert stopper.update(4, 1.0) is False
    assert stopper.best == 1.0 and stopper.counter == 0
    # 30 non-improving iterations (equal counts as no improvement), then an improvement resets the counter.
    for i in range(30):
        assert stopper.update(4, 1.0 if i % 2 else 2.0) is False
    assert stopper.counter == 30
    assert stopper.update(4, 0.5) is False
    assert stopper.counter == 0 and stopper.best == 0.5
    # 50 non-improving iterations: counter == 50, not > 50, so keep going.
    for _ in range(50):
        assert stopper.update(5, 0.9) is False
    assert stopper.counter == 50
    # The 51st stops.
    assert stopper.update(5, 0.9) is True
    assert stopper.counter == 51


def test_early_stopping_custom_start_and_patience():
    stopper = EarlyStopping(start_epoch=0, patience=2)
    assert [stopper.update(0, loss) for loss in (1.0, 1.0, 1.0, 1.0)] == [False, False, False, True]


def toy_problem(number_class: int = 3, dim: int = 6, per_class: int = 400, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(number_class, dim, generator=generator) * 4
    labels = torch.arange(number_class).repeat_interleave(per_class)
    features = centers[labels] + torch.randn(len(labels), dim, generator=generator)
    return features, labels


def make_epoch_batches(features, labels, batch_size: int = 64):
    def epoch_batches(epoch: int):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1000 + epoch))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = order[start:start + batch_size]
            yield features[rows], labels[rows]
    return epoch_batches


def test_train_member_learns_and_is_deterministic():
    features, labels = toy_problem()
    settings = TrainSettings(number_class=3, dim=6, max_epochs=4)
    model, info = train_member(settings, make_epoch_batches(features, labels), seed=3)
    assert not model.training
    assert next(model.parameters()).device.type == "cpu"
    with torch.no_grad():
        accuracy = (model(features).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.9
    assert info["iterations"] == 4 * (1200 // 64) and not info["stopped_early"]
    assert info["epochs"] == 4 and info["final_loss"] < 1.0
    assert set(info) == {"epochs", "iterations", "final_loss", "best_loss", "stopped_early"}

    again, info_again = train_member(settings, make_epoch_batches(features, labels), seed=3)
    assert info_again == info
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name

    one_epoch = TrainSettings(number_class=3, dim=6, max_epochs=1)
    other, _ = train_member(one_epoch, make_epoch_batches(features, labels), seed=4)
    assert not torch.equal(other[0].weight, model[0].weight)


def test_train_member_stops_early():
    features, labels = toy_problem(per_class=200)
    # patience 0 from epoch 0: stops at the first iteration whose loss does not improve.
    settings = TrainSettings(number_class=3, dim=6, max_epochs=50, early_stop_start_epoch=0, patience=0)
    _, info = train_member(settings, make_epoch_batches(features, labels), seed=0)
    assert info["stopped_early"] is True
    assert info["iterations"] < 50 * (600 // 64)
    assert info["best_loss"] is not None and info["best_loss"] <= info["final_loss"]


def test_train_member_with_improved_options_runs():
    features, labels = toy_problem()
    settings = TrainSettings(number_class=3, dim=6, max_epochs=3, optimizer="adamw", weight_decay=1e-4, dropout=0.4)
    model, info = train_member(settings, make_epoch_batches(features, labels), seed=0)
    assert any(isinstance(layer, nn.Dropout) for layer in model)
    assert info["best_loss"] is None  # the rule starts at epoch 4
    assert not info["stopped_early"] and info["epochs"] == 3


def test_train_member_rejects_empty_epoch():
    settings = TrainSettings(number_class=3, dim=6, max_epochs=2)
    with pytest.raises(ValueError, match="no batch"):
        train_member(settings, lambda epoch: iter(()), seed=0)


@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_save_load_round_trip(tmp_path, dropout):
    features, labels = toy_problem()
    settings = TrainSettings(number_class=3, dim=6, max_epochs=1, dropout=dropout)
    model, info = train_member(settings, make_epoch_batches(features, labels), seed=0)
    meta = {"number_class": 3, "dim": 6, "dropout": dropout, "seed": 0, "info": info, "steps": [50, 150]}
    path = tmp_path / "members" / "member_0.pt"
    save_member(path, model, meta)

    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"state_dict", "meta"}
    loaded, loaded_meta = load_member(path)
    assert loaded_meta == meta
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(features), model(features))
    assert list(tmp_path.joinpath("members").iterdir()) == [path]  # no temp file left behind


def test_save_member_rejects_bad_meta(tmp_path):
    model = build_classifier(3, dim=6)
    with pytest.raises(ValueError, match="dropout"):
        save_member(tmp_path / "m.pt", model, {"number_class": 3, "dim": 6})
    with pytest.raises(TypeError, match="ndarray"):
        save_member(tmp_path / "m.pt", model, {"number_class": 3, "dim": 6, "dropout": 0.0, "x": np.zeros(2)})
    assert not (tmp_path / "m.pt").exists()


class _RunsCode:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("loader", ["member", "resume file"])
def test_torch_files_with_code_are_refused_naming_the_global(tmp_path, loader):
    """Every torch.load goes through pipeline.torchfile: a member or a diffusion resume file holding code is
    refused for safety, naming the global, never suggesting weights_only=False."""
    from pipeline import diffusion_training
    from pipeline.classifier import load_member
    from pipeline.torchfile import UnsafeTorchFileError

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "meta": {}, "format": 1, "hook": _RunsCode()}, path)
    with pytest.raises(ValueError) as caught:
        if loader == "member":
            load_member(path)
        else:
            diffusion_training._load_resume(path)
    message = str(caught.value)
    if loader == "member":
        assert isinstance(caught.value, UnsafeTorchFileError)
    assert str(path) in message and "refused for safety" in message and "builtins.print" in message
    assert "weights_only" not in message and "pwned" not in message


def test_cpu_dropout_from_the_members_own_generator_gives_nn_dropouts_masks():
    """train_member on the CPU draws dropout masks from a generator of its own (members train in threads at once)
    that continues torch's global stream: the member equals the plain loop with nn.Dropout and the global
    generator, bit for bit, and comes back with nn.Dropout layers."""
    from torch import nn

    from pipeline.classifier import TrainSettings, build_classifier, build_optimizer, train_member

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(640, 96, generator=generator), torch.randint(0, 5, (640,), generator=generator)

    def batches(epoch):
        order = torch.randperm(640, generator=torch.Generator().manual_seed(epoch))
        return [(x[order[i:i + 64]], y[order[i:i + 64]]) for i in range(0, 640, 64)]

    settings = TrainSettings(number_class=5, dim=96, max_epochs=3, dropout=0.3, optimizer="adamw",
                             weight_decay=1e-4, early_stop_start_epoch=99)
    ours, _ = train_member(settings, batches, seed=11)
    assert [type(layer) for layer in ours].count(nn.Dropout) == 2

    torch.manual_seed(11)  # the loop as it was: nn.Dropout drawing from the global generator
    plain = build_classifier(5, 96, 0.3)
    optimizer, criterion = build_optimizer(plain, settings), nn.CrossEntropyLoss()
    plain.train()
    for epoch in range(3):
        for features, labels in batches(epoch):
            optimizer.zero_grad()
            criterion(plain(features), labels).backward()
            optimizer.step()
    for name, value in plain.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
