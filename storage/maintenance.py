"""Store tools: list units, verify every chunk and marker (optionally repair), delete what nothing references."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Iterator

import torch
import zarr

from storage import artifacts
from storage.features import CorruptChunkError, FeatureStore


@dataclass
class UnitInfo:
    path: str
    t: int | None
    images: int
    blocks: list[int]
    bytes: int
    created: str | None


@dataclass
class Problem:
    kind: str  # "corrupt" | "incomplete"
    path: str  # store path of the array / object
    unit: str | None = None
    image: str | None = None
    detail: str = ""

    def __str__(self) -> str:
        where = f"unit {self.unit} image {self.image}" if self.unit else self.path
        return f"{self.kind:10s} {where}: {self.detail}"


def _du(store: FeatureStore, path: str) -> int:
    try:
        return int(store.location.fs.du(store.location.path(path)))
    except FileNotFoundError:
        return 0


def list_units(store: FeatureStore) -> list[UnitInfo]:
    out = []
    for path, group in store.iter_units():
        images = list(group.groups())
        blocks = sorted({int(n[1:]) for _, g in images[:1] for n, _ in g.arrays()})
        created = min((a.attrs.get("committed") or "~" for _, g in images for _, a in g.arrays()), default=None)
        out.append(UnitInfo(path, group.attrs.get("t"), len(images), blocks, _du(store, path),
                            None if created in (None, "~") else created))
    return out


def _arrays(group: zarr.Group, prefix: str) -> Iterator[tuple[str, zarr.Array]]:
    for name, member in group.members():
        path = f"{prefix}/{name}"
        if isinstance(member, zarr.Array):
            yield path, member
        else:
            yield from _arrays(member, path)


def verify(store: FeatureStore, repair: bool = False) -> list[Problem]:
    """Read every chunk of every array (checksums, missing chunks) and check every commit marker.

    With repair=True each corrupted or incomplete array / member / evaluation is deleted, so the next run
    recomputes exactly those and nothing else.
    """
    problems: list[Problem] = []
    root = store.root
    for top in ("views", "features", "evaluations"):
        if top not in root:
            continue
        for path, arr in _arrays(root[top], top):
            parts = path.split("/")
            unit = "/".join(parts[:4]) if top == "features" else None
            image = parts[4] if top == "features" else (parts[2] if top == "views" else None)
            if not arr.attrs.get("committed") and top != "evaluations":
                problems.append(Problem("incomplete", path, unit, image, "written but never committed"))
                continue
            try:
                store._read(arr, path)
            except CorruptChunkError as err:
                detail = str(err).split(": ", 1)[-1].split("; run")[0]
                problems.append(Problem("corrupt", path, unit, image, detail))
    loc = store.location
    for key in loc.list("models"):
        for name in loc.list(f"models/{key}"):
            if not name.endswith(".pt"):
                continue
            index = int(name[len("member_"):-3])
            if not artifacts.member_committed(loc, key, index):
                problems.append(Problem("incomplete", f"models/{key}/{name}", detail="member without commit marker"))
                continue
            try:
                torch.load(io.BytesIO(loc.read_bytes(f"models/{key}/{name}")), map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - any unreadable member is corrupt
                problems.append(Problem("corrupt", f"models/{key}/{name}", detail=f"cannot load: {err}"[:200]))
    if repair:
        for p in problems:
            _repair(store, p)
    return problems


def _repair(store: FeatureStore, problem: Problem) -> None:
    loc = store.location
    if problem.path.startswith("models/"):
        key = problem.path.split("/")[1]
        base = problem.path[:-3]
        loc.delete(base + ".pt")
        loc.delete(base + ".json")
        for record in artifacts.list_records(loc, "train"):  # records of train keys using this member set
            if record["result"].get("members_key") == key:
                loc.delete(artifacts.record_path("train", record["key"]))
    elif problem.path.startswith("evaluations/"):
        key = problem.path.split("/")[1]
        loc.delete(f"evaluations/{key}")
        loc.delete(artifacts.record_path("evaluate", key))
    else:
        loc.delete(problem.path)
    store._root = None  # metadata changed under the cached hierarchy


@dataclass
class References:
    """What a set of configs needs: feature units -> image ids, view image ids, train and evaluate keys."""

    units: dict[str, set[str]] = field(default_factory=dict)
    view_images: set[str] = field(default_factory=set)
    train_keys: set[str] = field(default_factory=set)
    member_keys: set[str] = field(default_factory=set)
    evaluate_keys: set[str] = field(default_factory=set)


def collect_garbage(store: FeatureStore, refs: References, dry_run: bool = False) -> list[tuple[str, int]]:
    """Delete (or, with dry_run, only list) everything no reference keeps; returns [(path, bytes)]."""
    doomed: list[str] = []
    loc = store.location
    for path, group in store.iter_units():
        keep = refs.units.get(path)
        if keep is None:
            doomed.append(path)
        else:
            doomed += [f"{path}/{name}" for name, _ in group.groups() if name not in keep]
    for view in (v for v in loc.list("views") if v != "zarr.json"):
        doomed += [f"views/{view}/{i}" for i in loc.list(f"views/{view}") if i not in refs.view_images
                   and i != "zarr.json"]
    doomed += [f"models/{k}" for k in loc.list("models") if k not in refs.member_keys]
    doomed += [f"evaluations/{k}" for k in loc.list("evaluations") if k not in refs.evaluate_keys]
    for stage, keep in (("train", refs.train_keys), ("evaluate", refs.evaluate_keys)):
        doomed += [f"stages/{stage}/{n}" for n in loc.list(f"stages/{stage}") if n[:-5] not in keep]
    sizes = [(d, _du(store, d)) for d in sorted(doomed)]  # sorted: listing order is the filesystem's
    if not dry_run:
        for d, _ in sizes:
            loc.delete(d)
        store._root = None
    return sizes
