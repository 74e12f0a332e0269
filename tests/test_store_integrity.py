"""Every artifact of a store is checked: members, stage records, metrics, masks and every zarr.json (#14 items 3
and 6); the store is a clean zarr hierarchy to plain zarr, stores of the earlier layout still read, and gc keeps
the documents of the groups it keeps (#13 item 5)."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from flows.cli import main
from pipeline.torchfile import load_tensors
from storage import artifacts, maintenance
from storage.features import FeatureStore, UnitSpec
from storage.keys import Key
from storage.location import CorruptObjectError, StoreLocation
from tests.conftest import write_tiny_experiment

SMALL = dict(n_train=3, n_test=2, features={"steps": [50], "blocks": [2, 3], "batch_size": 4},
             classifier={"model_num": 2, "max_epochs": 1})


def _run(capsys, config: Path) -> tuple[int, dict | None, str]:
    code = main(["run", str(config), "--json", "--quiet"])
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1]) if code == 0 else None
    return code, summary, captured.err


def _verify(capsys, store: Path, *extra: str) -> tuple[int, str]:
    code = main(["store", "verify", str(store), *extra])
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def finished(tmp_path_factory, prefect_server):
    """A tiny experiment run once through the flow: (experiment directory, the run's summary)."""
    config = write_tiny_experiment(tmp_path_factory.mktemp("integrity") / "exp", **SMALL)
    settings = yaml.safe_load(config.read_text())
    settings["evaluation"] = {"gallery": 0}  # no report: faster
    config.write_text(yaml.safe_dump(settings))
    code = main(["run", str(config), "--json", "--quiet"])
    assert code == 0
    return config.parent


@pytest.fixture
def experiment(finished, tmp_path, capsys):
    """A private copy of the finished experiment (data, store, outputs, config): (config, its summary)."""
    copy = tmp_path / "exp"
    shutil.copytree(finished, copy, symlinks=True)
    config = copy / "config.yaml"
    code, summary, err = _run(capsys, config)  # the fast path: nothing to do, reads the summary
    assert code == 0 and summary["unet_forwards"] == 0 and summary["members_trained"] == 0, err
    return config, summary


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("ddpmseg: error:")]
    assert lines, err[-3000:]
    return lines[-1]


# -- #14 item 3: a member whose bytes changed -------------------------------------------------------------------
def test_flipped_member_byte_is_verified_refused_repaired_and_retrained_alone(experiment, capsys):
    config, summary = experiment
    store = config.parent / "store"
    (members_key,) = [p.name for p in (store / "models").iterdir() if p.is_dir()]
    victim = f"models/{members_key}/member_01"
    chunk = store / victim / "c.0"
    payload = chunk.read_bytes()[:-4]
    before = hashlib.sha256(payload).hexdigest()
    weight = load_tensors(payload, "member")["state_dict"]["0.weight"]
    at = payload.index(weight.numpy().tobytes()[:64])  # inside the tensor data, not the pickle
    data = bytearray(chunk.read_bytes())
    data[at + 5] ^= 0x10
    chunk.write_bytes(bytes(data))

    code, out = _verify(capsys, store)
    assert code == 1 and "corrupt" in out and victim in out and "1 problem" in out

    # an evaluation that needs the members refuses the corrupted one (same train key, another evaluate key)
    other = yaml.safe_load(config.read_text())
    other["evaluation"]["save_png"] = False
    other_config = config.parent / "other.yaml"
    other_config.write_text(yaml.safe_dump(other))
    code, _, err = _run(capsys, other_config)
    line = _error_line(err)
    assert code == 2 and victim in line and "store verify" in line and "--repair" in line

    code, out = _verify(capsys, store, "--repair")
    assert code == 0 and victim in out
    assert not (store / victim).exists() and (store / f"models/{members_key}/member_00/zarr.json").is_file()

    code, again, err = _run(capsys, other_config)
    assert code == 0, err
    assert again["members_trained"] == 1 and again["unet_forwards"] == 0  # exactly that member
    assert again["miou"] == summary["miou"]  # the masks do not depend on save_png
    assert hashlib.sha256((store / victim / "c.0").read_bytes()[:-4]).hexdigest() == before
    assert _verify(capsys, store)[0] == 0


def test_member_read_checks_its_checksum_and_names_the_member(tmp_path):
    loc = StoreLocation.parse(tmp_path / "store")
    artifacts.write_member(loc, "k", 3, {"w": torch.full((64,), 1.25)}, {"index": 3})
    chunk = tmp_path / "store" / "models" / "k" / "member_03" / "c.0"
    data = bytearray(chunk.read_bytes())
    data[data.index(torch.full((4,), 1.25).numpy().tobytes()) + 1] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptObjectError) as caught:
        artifacts.read_member(loc, "k", 3)
    message = str(caught.value)
    assert "models/k/member_03" in message and "checksum" in message and "store verify" in message
    assert "--repair" in message and "\n" not in message


# -- #14 item 6: truncated JSON documents -----------------------------------------------------------------------
def _truncate(path: Path) -> None:
    text = path.read_bytes()
    path.write_bytes(text[: len(text) // 2])


def _feature_document(store: Path) -> Path:
    return next(store.glob("features/*/base/t0050-*/*/b03/zarr.json"))


TARGETS = {  # what is truncated -> (its zarr.json, what the re-run after repair recomputes)
    "train record": (lambda store, s: store / "stages" / "train" / s["train_key"] / "zarr.json",
                     {"unet_forwards": 0, "members_trained": 0}),
    "evaluation metrics": (lambda store, s: store / "evaluations" / s["evaluate_key"] / "metrics" / "zarr.json",
                           {"unet_forwards": 0, "members_trained": 0}),
    "feature zarr.json": (lambda store, s: _feature_document(store), {"unet_forwards": 1, "members_trained": 0}),
}


@pytest.mark.parametrize("target", list(TARGETS))
def test_truncated_document_is_named_by_verify_and_run_and_removed_by_repair(experiment, capsys, target):
    config, summary = experiment
    store = config.parent / "store"
    locate, recomputed = TARGETS[target]
    document = locate(store, summary)
    node = str(document.parent.relative_to(store))
    _truncate(document)

    code, out = _verify(capsys, store)
    assert code == 1 and "corrupt" in out and node.split("/")[-1] in out and "1 problem" in out

    code, _, err = _run(capsys, config)
    line = _error_line(err)
    assert code == 2 and str(document) in line and "store verify" in line and "--repair" in line
    assert "JSONDecodeError" not in err

    code, out = _verify(capsys, store, "--repair")
    assert code == 0 and "1 problem" in out
    assert _verify(capsys, store)[0] == 0

    code, again, err = _run(capsys, config)
    assert code == 0, err
    assert {k: again[k] for k in recomputed} == recomputed
    assert again["miou"] == summary["miou"]


def test_truncated_group_document_is_rewritten_keeping_its_arrays(experiment, capsys):
    """A unit group's zarr.json (its provenance): --repair rewrites it empty, keeping its arrays, so plain zarr
    lists the unit again and the next run recomputes no feature (the provenance is written again by the next
    extraction into the unit)."""
    config, summary = experiment
    store = config.parent / "store"
    document = next(store.glob("features/*/base/t0050-*/zarr.json"))
    _truncate(document)
    code, out = _verify(capsys, store)
    assert code == 1 and str(document.parent.relative_to(store)) in out
    assert _verify(capsys, store, "--repair")[0] == 0
    assert _verify(capsys, store)[0] == 0
    code, again, err = _run(capsys, config)
    assert code == 0 and again["unet_forwards"] == 0 and again["miou"] == summary["miou"], err
    unit = str(document.parent.relative_to(store))
    assert isinstance(zarr.open_group(str(store), mode="r")[unit], zarr.Group)


def test_truncated_root_document_is_named_when_the_store_opens(tmp_path):
    store = FeatureStore(StoreLocation.parse(tmp_path / "store"))
    store.write_features(UnitSpec("b", "base", 50, "s"), "img", {2: np.ones((2, 2, 2), np.float32)})
    _truncate(tmp_path / "store" / "zarr.json")
    with pytest.raises(CorruptObjectError) as caught:
        FeatureStore(StoreLocation.parse(tmp_path / "store")).committed_blocks(UnitSpec("b", "base", 50, "s"), "img")
    assert str(tmp_path / "store" / "zarr.json") in str(caught.value) and "--repair" in str(caught.value)
    problems = maintenance.verify(FeatureStore(StoreLocation.parse(tmp_path / "store")), repair=True)
    assert [p.path for p in problems] == ["."]
    assert maintenance.verify(FeatureStore(StoreLocation.parse(tmp_path / "store"))) == []


def test_truncated_record_and_metrics_raise_a_named_error_not_json(tmp_path):
    loc = StoreLocation.parse(tmp_path / "store")
    key = Key("train", {"x": 1})
    artifacts.write_record(loc, key, {"members_key": "m"})
    artifacts.write_metrics(loc, "e", {"miou": 1.5})
    for path, read in ((f"stages/train/{key.value}", lambda: artifacts.read_record(loc, "train", key.value)),
                       ("evaluations/e/metrics", lambda: artifacts.read_metrics(loc, "e"))):
        _truncate(tmp_path / "store" / path / "zarr.json")
        with pytest.raises(CorruptObjectError, match=f"{path}/zarr.json: not valid JSON"):
            read()
    # a changed value that still parses is caught by the checksum
    artifacts.write_metrics(loc, "e", {"miou": 1.5})
    document = tmp_path / "store" / "evaluations" / "e" / "metrics" / "zarr.json"
    document.write_text(document.read_text().replace("1.5", "9.5"))
    with pytest.raises(CorruptObjectError, match="checksum"):
        artifacts.read_metrics(loc, "e")


# -- #13 item 5: a clean zarr hierarchy; earlier stores; gc ------------------------------------------------------
def _populated_store(root: Path) -> FeatureStore:
    store = FeatureStore(StoreLocation.parse(root))
    store.write_view("base", "img", np.zeros((3, 4, 4), np.float32), np.zeros((4, 4), np.uint8), "lab", {})
    store.ensure_unit(UnitSpec("b", "base", 50, "s"), {"p": 1})
    store.write_features(UnitSpec("b", "base", 50, "s"), "img", {2: np.ones((2, 2, 2), np.float32)})
    artifacts.write_member(store.location, "m", 0, {"w": torch.ones(2)}, {"index": 0})
    artifacts.write_record(store.location, Key("train", {"x": 1}), {"members_key": "m"})
    artifacts.write_masks(store.root, "e", np.zeros((1, 4, 4), np.uint8), ["img"], ["a"])
    artifacts.write_metrics(store.location, "e", {"miou": 1.0})
    artifacts.write_record(store.location, Key("evaluate", {"x": 2}), {})
    return store


def test_plain_zarr_lists_the_whole_store_without_a_warning(tmp_path):
    _populated_store(tmp_path / "store")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        root = zarr.open_group(str(tmp_path / "store"), mode="r")
        top = sorted(name for name, _ in root.members())
        everything = dict(root.members(max_depth=None))
    assert top == ["evaluations", "features", "models", "stages", "views"]
    assert isinstance(everything["models/m/member_00"], zarr.Array)
    assert isinstance(everything["evaluations/e/metrics"], zarr.Group)
    assert [str(w.message) for w in caught] == []


def test_store_of_the_earlier_layout_still_reads(tmp_path):
    """stages/<stage>/<key>.json, models/<k>/member_<MM>.pt + .json and evaluations/<k>/metrics.json: read, and
    a flipped tensor byte in such a .pt is found by its zip CRC."""
    root = tmp_path / "store"
    loc = StoreLocation.parse(root)
    (root / "stages" / "train").mkdir(parents=True)
    (root / "stages" / "train" / "abc.json").write_text(json.dumps({"key": "abc", "result": {"members_key": "m"}}))
    (root / "models" / "m").mkdir(parents=True)
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.full((64,), 1.25)}, "meta": {"index": 0}}, buf)
    (root / "models" / "m" / "member_00.pt").write_bytes(buf.getvalue())
    (root / "models" / "m" / "member_00.json").write_text(json.dumps({"index": 0}))
    (root / "evaluations" / "e").mkdir(parents=True)
    (root / "evaluations" / "e" / "metrics.json").write_text(json.dumps({"miou": 2.0}))

    assert artifacts.read_record(loc, "train", "abc")["result"] == {"members_key": "m"}
    assert [r["key"] for r in artifacts.list_records(loc, "train")] == ["abc"]
    assert artifacts.member_committed(loc, "m", 0)
    payload, meta = artifacts.read_member(loc, "m", 0)
    assert meta == {"index": 0} and torch.equal(load_tensors(payload, "m")["state_dict"]["w"], torch.full((64,), 1.25))
    assert artifacts.read_metrics(loc, "e") == {"miou": 2.0}
    assert maintenance.verify(FeatureStore(loc)) == []

    data = bytearray(buf.getvalue())
    data[data.index(torch.full((4,), 1.25).numpy().tobytes()) + 2] ^= 0x01
    (root / "models" / "m" / "member_00.pt").write_bytes(bytes(data))
    with pytest.raises(CorruptObjectError, match="member_00.pt"):
        artifacts.read_member(loc, "m", 0)
    problems = maintenance.verify(FeatureStore(loc), repair=True)
    assert [(p.kind, p.path) for p in problems] == [("corrupt", "models/m/member_00.pt")]
    assert not artifacts.member_committed(loc, "m", 0)
    assert artifacts.read_record(loc, "train", "abc") is None  # its train record claimed the member


def test_gc_keeps_the_documents_of_the_groups_it_keeps(tmp_path):
    store = _populated_store(tmp_path / "store")
    refs = maintenance.References(units={"features/b/base/t0050-s": {"img"}}, view_images={"img"},
                                  train_keys={Key("train", {"x": 1}).value}, member_keys={"m"},
                                  evaluate_keys={Key("evaluate", {"x": 2}).value})
    removed = [p for p, _ in maintenance.collect_garbage(store, refs)]
    assert removed == ["evaluations/e"]  # unreferenced: the evaluate key kept is another
    for group in ("", "evaluations", "models", "stages", "stages/train", "views", "features"):
        assert (tmp_path / "store" / group / "zarr.json").is_file(), group
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        top = sorted(name for name, _ in zarr.open_group(str(tmp_path / "store"), mode="r").members())
    assert top == ["evaluations", "features", "models", "stages", "views"] and not caught
