"""The batched ensemble (pipeline/ensemble.py), classifier.device, and the independent path kept bit for bit."""
from __future__ import annotations

import pytest
import torch

from pipeline import classifier as clf
from pipeline import ensemble, pixels
from pipeline.config import ExperimentConfig, load_config


def toy_data(n: int = 900, dim: int = 24, classes: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, dim, generator=generator)
    labels = (features @ torch.randn(dim, classes, generator=generator)).argmax(1)
    return features, labels


def toy_slices(features, labels, size: int = 250):
    """epoch -> the epoch's slices (a seeded shuffle cut into `size` rows: the last one partial)."""
    def slices(epoch: int):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(100 + epoch))
        for start in range(0, len(order), size):
            rows = order[start:start + size]
            yield features[rows], labels[rows]
    return slices


def member_batches(seed: int, slices, batch: int):
    """The batches the batched pass gives the member of `seed`: its order of each slice, the remainder carried."""
    def batches(epoch: int):
        carry_x = carry_y = None
        for number, (x, y) in enumerate(slices(epoch)):
            order = ensemble.slice_order(seed, epoch, number, len(y))
            x, y = x[order], y[order]
            if carry_x is not None:
                x, y = torch.cat([carry_x, x]), torch.cat([carry_y, y])
                carry_x = carry_y = None
            full = len(y) // batch * batch
            for start in range(0, full, batch):
                yield x[start:start + batch], y[start:start + batch]
            if full < len(y):
                carry_x, carry_y = x[full:], y[full:]
    return batches


def test_batched_member_follows_the_single_member_loop():
    """Init, batches, BatchNorm (incl. running stats), Adam and the early stop of a member of a batched pass are
    those of pipeline.classifier.train_member fed the same batches (to float rounding: batched products)."""
    features, labels = toy_data(n=600)
    settings = clf.TrainSettings(number_class=4, dim=24, max_epochs=6, early_stop_start_epoch=1, patience=1)
    slices = toy_slices(features, labels)
    seeds = [5, 17, 29]
    results = ensemble.train_members(settings, seeds, slices)
    assert len({info["iterations"] for _, info in results}) > 1  # members stopped at different iterations
    for seed, (model, info) in zip(seeds, results):
        alone, alone_info = clf.train_member(settings, member_batches(seed, slices, settings.batch_size), seed=seed)
        assert info["iterations"] == alone_info["iterations"] and info["epochs"] == alone_info["epochs"]
        assert info["stopped_early"] == alone_info["stopped_early"]
        ours, theirs = model.state_dict(), alone.state_dict()
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert torch.allclose(ours[name].float(), theirs[name].float(), rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("dropout, classes, dim", [(0.0, 4, 24), (0.3, 31, 24), (0.2, 4, 600)])
def test_stacked_step_gradients_are_autograds(dropout, classes, dim):
    """The written-out backward of stacked_step gives autograd's gradients through stacked_forward (both
    hidden-width pairs, with and without dropout; dim 600: the first layer's products through oneDNN), the same
    losses, and the same running statistics."""
    members, batch = 3, 16
    models = []
    for seed in range(members):
        torch.manual_seed(seed)
        models.append(clf.build_classifier(classes, dim, dropout))
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(members, batch, dim, generator=generator)
    y = torch.randint(0, classes, (members, batch), generator=generator)
    reference, ours = ensemble.stack_members(models), ensemble.stack_members(models)
    widths = [layer.num_features for layer in models[0] if isinstance(layer, torch.nn.BatchNorm1d)]
    masks = [(torch.rand(members, batch, width, generator=generator) > dropout).float() / (1 - dropout)
             for width in widths] if dropout else []
    logits = ensemble.stacked_forward(reference, x, masks)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, classes), y.reshape(-1),
                                                 reduction="none").view(members, batch).mean(1)
    expected.sum().backward()
    grads = ensemble.gradient_buffers(ours)
    for value in grads.values():
        value.fill_(float("nan"))  # every element must be written
    losses = ensemble.stacked_step(ours, x, y, grads, masks)
    assert torch.allclose(losses, expected.detach(), rtol=1e-5, atol=1e-6)
    for name, param in zip((n for n, _ in models[0].named_parameters()), reference.parameters()):
        assert torch.allclose(grads[name], param.grad, rtol=1e-4, atol=1e-6), name
    for name, value in reference.state.items():
        if name not in grads:  # BatchNorm buffers
            assert torch.allclose(ours.state[name], value, rtol=1e-5, atol=1e-7), name


def test_batched_member_does_not_depend_on_the_other_members():
    """model_num 10 -> 12 trains the 2 new members alone: they must equal what a pass of all would give."""
    features, labels = toy_data(n=600, seed=1)
    settings = clf.TrainSettings(number_class=4, dim=24, max_epochs=2, dropout=0.3, optimizer="adamw",
                                 weight_decay=1e-4)
    slices = toy_slices(features, labels)
    together = ensemble.train_members(settings, [1, 2, 3], slices)
    alone = ensemble.train_members(settings, [3], slices)
    for name, value in together[2][0].state_dict().items():
        assert torch.equal(value, alone[0][0].state_dict()[name]), name  # every product is the member's own call
    assert not torch.equal(together[0][0][0].weight, together[1][0][0].weight)  # own inits


def test_large_products_go_through_onednn_and_agree_with_torchs():
    """At dim 600 x 128 weights the first layer's products (forward and weight gradient) are oneDNN calls on the
    CPU; a member is the same whatever pass it is in, and within float rounding of the same member trained with
    DDPMSEG_ONEDNN=0 (torch's products)."""
    assert 600 * 128 >= ensemble.ONEDNN_MIN_WEIGHTS
    if torch.backends.mkldnn.is_available():  # torch's CPU builds have it: the fast path must not vanish silently
        assert ensemble._onednn_linear() is not None
    features, labels = toy_data(n=400, dim=600, seed=3)
    settings = clf.TrainSettings(number_class=4, dim=600, max_epochs=1)
    slices = toy_slices(features, labels, size=200)
    together = ensemble.train_members(settings, [4, 6], slices)
    alone = ensemble.train_members(settings, [6], slices)
    for name, value in together[1][0].state_dict().items():
        assert torch.equal(value, alone[0][0].state_dict()[name]), name
    try:
        ensemble._onednn_linear.cache_clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("DDPMSEG_ONEDNN", "0")
            assert ensemble._onednn_linear() is None
            torchs = ensemble.train_members(settings, [6], slices)
    finally:
        ensemble._onednn_linear.cache_clear()
    for name, value in torchs[0][0].state_dict().items():
        assert torch.allclose(value.float(), alone[0][0].state_dict()[name].float(), rtol=1e-4, atol=1e-5), name


def test_batched_members_have_their_own_dropout_and_order():
    features, labels = toy_data(seed=2)
    settings = clf.TrainSettings(number_class=4, dim=24, max_epochs=1, dropout=0.4)
    done = []
    results = ensemble.train_members(settings, [8, 8], toy_slices(features, labels),
                                     on_member_done=lambda position, model, info: done.append(position))
    # the same seed twice: the same init, order and dropout -> the same member
    assert torch.equal(results[0][0][0].weight, results[1][0][0].weight)
    assert sorted(done) == [0, 1]
    assert ensemble.slice_order(8, 0, 0, 50).tolist() != ensemble.slice_order(9, 0, 0, 50).tolist()
    assert sorted(ensemble.slice_order(8, 0, 0, 50).tolist()) == list(range(50))


def test_batched_pass_respects_iterations_per_epoch_and_rejects_empty_epochs():
    features, labels = toy_data()
    settings = clf.TrainSettings(number_class=4, dim=24, max_epochs=2, early_stop_start_epoch=99)
    results = ensemble.train_members(settings, [1, 2], toy_slices(features, labels), iterations_per_epoch=3)
    assert [info["iterations"] for _, info in results] == [6, 6]
    assert all(info["epochs"] == 2 and not info["stopped_early"] for _, info in results)
    with pytest.raises(ValueError, match="no full batch"):
        ensemble.train_members(settings, [1], lambda epoch: iter([(features[:10], labels[:10])]))


def test_epoch_batches_are_cut_from_epoch_slices():
    labels = {f"img{i}": (torch.arange(64).reshape(8, 8) % 3).numpy() for i in range(3)}

    def slice_features(part: pixels.PixelSlice) -> torch.Tensor:
        return torch.stack([part.image.float(), part.ys.float(), part.xs.float()], 1)

    args = (list(labels), labels.__getitem__, slice_features, 255)
    slices = list(pixels.epoch_slices(*args, 2, 7, images_per_buffer=2, slice_pixels=50, prefetch=False))
    batches = list(pixels.epoch_batches(*args, 16, 2, 7, images_per_buffer=2, slice_pixels=50, prefetch=True))
    flat = torch.cat([f for f, _ in slices])
    assert torch.equal(torch.cat([f for f, _ in batches]), flat[:len(batches) * 16])
    assert len(batches) == 3 * 64 // 16


def test_an_epoch_cut_at_a_number_of_batches_builds_only_the_slices_it_uses():
    labels = {f"img{i}": (torch.arange(64).reshape(8, 8) % 3).numpy() for i in range(3)}
    built = []

    def slice_features(part: pixels.PixelSlice) -> torch.Tensor:
        built.append(len(part.labels))
        return torch.stack([part.image.float(), part.ys.float(), part.xs.float()], 1)

    args = (list(labels), labels.__getitem__, slice_features, 255)
    every = list(pixels.epoch_batches(*args, 16, 2, 7, images_per_buffer=2, slice_pixels=50, prefetch=False))
    built.clear()
    first = list(pixels.epoch_batches(*args, 16, 2, 7, images_per_buffer=2, slice_pixels=50, max_batches=4))
    assert len(first) == 4 and all(torch.equal(a[0], b[0]) for a, b in zip(first, every))
    assert built == [50, 50]  # 64 pixels: the first two slices (of 50, 50, 28, 50, 14), none prefetched beyond
    built.clear()
    slices = list(pixels.epoch_slices(*args, 2, 7, images_per_buffer=2, slice_pixels=50, max_pixels=101))
    assert [len(y) for _, y in slices] == built == [50, 50, 28]
    with pytest.raises(ValueError, match="max_batches"):
        next(pixels.epoch_batches(*args, 16, 2, 7, max_batches=0))


def test_training_step_flops_counts_the_three_layers():
    assert ensemble.training_step_flops(20, 8448, 64) == 2.0 * 64 * (2 * 8448 * 128 + 3 * (128 * 32 + 32 * 20))


# -- config and stages ---------------------------------------------------------------------------------------------
def test_classifier_device_and_ensemble_settings(tiny_experiment):
    from flows import stage_keys

    cfg = load_config(tiny_experiment())
    assert (cfg.classifier.device, cfg.classifier.ensemble) == ("auto", "independent")
    settings = clf.train_settings(cfg, 12)
    assert settings.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert settings.ensemble == "independent"
    data = cfg.model_dump()
    with pytest.raises(Exception, match="classifier.device"):
        ExperimentConfig.model_validate({**data, "classifier": {**data["classifier"], "device": "tpu"}})
    with pytest.raises(Exception, match="ensemble"):
        ExperimentConfig.model_validate({**data, "classifier": {**data["classifier"], "ensemble": "stacked"}})
    with pytest.raises(ValueError, match="ensemble"):
        clf.TrainSettings(number_class=3, dim=4, ensemble="stacked")

    refs = [stage_keys.ImageRef("a" * 20, "b" * 20, "x")]

    def key(**classifier):
        return stage_keys.train_key(ExperimentConfig.model_validate(
            {**data, "classifier": {**data["classifier"], **classifier}}), refs)

    # device: in no key; independent: today's key (no new entry); batched: a key of its own
    assert key(device="cpu").value == key(device="auto").value == key(ensemble="independent").value
    assert "device" not in key().inputs["classifier"] and "ensemble" not in key().inputs["classifier"]
    assert key(ensemble="batched").value != key().value


def _todays_member(cfg, store, refs, index):
    """The member as the stage trained it before classifier.device / ensemble existed (main at 407aa6a):
    host slice sampler, epoch_batches without a device, train_member without a device, one torch thread."""
    from flows import train as train_stage
    from pipeline.threads import torch_threads

    c, d = cfg.classifier, cfg.dataset
    dim = train_stage.feature_dim(cfg, store, refs[0].image_id, refs[0].view)
    start = c.early_stop_start_epoch if c.early_stopping else c.max_epochs + 1
    settings = clf.TrainSettings(number_class=d.number_class, dim=dim, lr=c.lr, batch_size=c.batch_size,
                                 max_epochs=c.max_epochs, optimizer=c.optimizer, weight_decay=c.weight_decay,
                                 dropout=c.dropout, early_stop_start_epoch=start, patience=c.patience)
    slice_features = train_stage._slice_sampler(cfg, store, slots=min(c.images_per_buffer, len(refs)))
    labels = {r.entry: store.read_view_label(r.view, r.image_id, r.label_hash) for r in refs}
    entries = [r.entry for r in refs]
    seed = train_stage.member_seed(cfg, index)

    def epoch_batches(epoch):
        return pixels.epoch_batches(entries, labels.__getitem__, slice_features, d.ignore_label, c.batch_size,
                                    epoch, seed, images_per_buffer=c.images_per_buffer)

    with torch_threads(1):
        model, _ = clf.train_member(settings, epoch_batches, seed=seed)
    return model


def _prepared(path):
    from flows.extract import extract_split
    from flows.prepare import prepare
    from storage.features import FeatureStore
    from storage.location import StoreLocation

    cfg = load_config(path)
    store = FeatureStore(StoreLocation.parse(cfg.store))
    refs = prepare(cfg, store, "train").extraction(cfg, "train")
    extract_split(cfg, store, refs, progress=False)
    return cfg, store, refs


def _stored_state(loc, key: str, index: int) -> dict:
    """A committed member's state dict, read as the evaluate stage reads it (checked bytes, then weights_only)."""
    import io

    from pipeline.classifier import load_member
    from storage import artifacts

    payload, _ = artifacts.read_member(loc, key, index)
    return load_member(io.BytesIO(payload))[0].state_dict()


def test_independent_cpu_member_is_bit_identical_to_todays(tiny_experiment):
    from flows import train as train_stage
    from flows.stage_keys import members_key, train_key

    cfg, store, refs = _prepared(tiny_experiment(classifier={"model_num": 1, "max_epochs": 2, "device": "cpu",
                                                             "ensemble": "independent", "dropout": 0.2}))
    key = train_key(cfg, refs)
    assert train_stage.train_member(cfg, store, refs, key, 0, progress=False)["ran"]
    state = _stored_state(store.location, members_key(key), 0)
    expected = _todays_member(cfg, store, refs, 0).state_dict()
    assert state.keys() == expected.keys()
    for name in state:
        assert torch.equal(state[name], expected[name]), name


def test_batched_stage_writes_members_under_todays_keys_and_grows(tiny_experiment):
    from flows import train as train_stage
    from flows.stage_keys import members_key, train_key
    from storage import artifacts

    classifier = {"max_epochs": 2, "ensemble": "batched", "device": "cpu"}
    cfg, store, refs = _prepared(tiny_experiment(classifier={**classifier, "model_num": 2}))
    key = train_key(cfg, refs)
    infos = train_stage.train_members(cfg, store, refs, key, [0, 1], progress=False)
    assert [i["member"] for i in infos] == [0, 1] and all(i["ran"] for i in infos)
    assert train_stage.train_members(cfg, store, refs, key, [0, 1], progress=False) == []  # committed: skipped
    meta = {i: artifacts.read_member(store.location, members_key(key), i)[1] for i in (0, 1)}
    assert meta[0]["ensemble"] == "batched" and meta[1]["seed"] == train_stage.member_seed(cfg, 1)

    grown = cfg.model_copy(update={"classifier": cfg.classifier.model_copy(update={"model_num": 3})})
    grown_key = train_key(grown, refs)
    assert members_key(grown_key) == members_key(key)
    infos = train_stage.train_members(grown, store, refs, grown_key, [0, 1, 2], progress=False)
    assert [i["member"] for i in infos] == [2]  # only the new member trains
    # ... and it is member 2 of a pass of three in a fresh store
    fresh_cfg, fresh_store, fresh_refs = _prepared(tiny_experiment(classifier={**classifier, "model_num": 3}))
    fresh_key = train_key(fresh_cfg, fresh_refs)
    train_stage.train_members(fresh_cfg, fresh_store, fresh_refs, fresh_key, [0, 1, 2], progress=False)
    ours = _stored_state(store.location, members_key(key), 2)
    theirs = _stored_state(fresh_store.location, members_key(fresh_key), 2)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    # a batched member through train_member (the sweep's per-member call) is a pass of one: committed here
    assert train_stage.train_member(grown, store, refs, grown_key, 2, progress=False) == {"member": 2, "ran": False}


def test_predict_maps_on_the_maps_device(tiny_experiment):
    """predict_maps samples on the maps' device (the CPU here): the same as before classifier.device."""
    from flows.train import _read_entry_maps
    from pipeline import features
    from pipeline.predict import predict_maps

    cfg, store, refs = _prepared(tiny_experiment())
    maps = _read_entry_maps(cfg, store, refs[0].entry)
    torch.manual_seed(0)
    members = [clf.build_classifier(cfg.dataset.number_class, sum(m.shape[0] for m in maps)).eval()
               for _ in range(2)]
    host = predict_maps(members, features.sampling_maps(maps), cfg.image_size)
    ys, xs = torch.meshgrid(torch.arange(cfg.image_size), torch.arange(cfg.image_size), indexing="ij")
    logits = torch.stack([m(features.upsample_concat(maps, cfg.image_size).reshape(-1, cfg.image_size ** 2).T)
                          for m in members])
    from pipeline.predict import mode_vote

    expected = mode_vote(logits.argmax(-1)).reshape(cfg.image_size, cfg.image_size).numpy()
    assert (host.mask == expected).mean() > 0.99  # features to float rounding: sampled vs upsampled


def test_local_independent_members_train_several_at_a_time_with_the_same_values(tiny_experiment, prefect_server,
                                                                                 capsys):
    """Without a Dask cluster, `ddpmseg run` trains independent CPU members features.cpu_threads at a time (one
    torch thread each); every stored member, dropout masks included, is bit for bit the member trained alone, and
    the flow thread's torch thread count is what it was."""
    import json

    from flows.cli import main
    from flows.segment import local_member_tasks
    from flows.stage_keys import members_key, train_key

    path = tiny_experiment(classifier={"model_num": 3, "max_epochs": 2, "device": "cpu", "dropout": 0.2},
                           features={"cpu_threads": 2})
    cfg = load_config(path)
    assert local_member_tasks(cfg, 3) == 2 and local_member_tasks(cfg, 1) == 1
    threads = torch.get_num_threads()
    capsys.readouterr()
    assert main(["run", str(path), "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["members_trained"] == 3 and torch.get_num_threads() == threads
    cfg, store, refs = _prepared(path)
    key = members_key(train_key(cfg, refs))
    for index in range(3):
        state, alone = _stored_state(store.location, key, index), _todays_member(cfg, store, refs, index).state_dict()
        for name in state:
            assert torch.equal(state[name], alone[name]), (index, name)
