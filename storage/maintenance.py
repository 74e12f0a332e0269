"""Store tools: list units, verify every chunk and marker (optionally repair), delete what nothing references."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import zarr

from storage import artifacts
from storage.features import CorruptChunkError, FeatureStore
from storage.location import CorruptObjectError


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
    return sorted(out, key=lambda u: u.path)  # zarr lists members in no fixed order


def _node_kind(path: str) -> str:
    """What the node at `path` is in the documented layout (storage.features, storage.artifacts): "array",
    "member", "record", "metrics" or "group"."""
    parts = path.split("/") if path else []
    top = parts[0] if parts else ""
    if (top == "views" and len(parts) == 4) or (top == "features" and len(parts) == 6) or (
            top == "evaluations" and len(parts) == 3 and parts[2] == "masks"):
        return "array"
    if top == "models" and len(parts) == 3:
        return "member"
    if top == "segmenters" and len(parts) == 3:
        return "checkpoint"
    if top == "stages" and len(parts) == 3:
        return "record"
    if top == "evaluations" and len(parts) == 3 and parts[2] == "metrics":
        return "metrics"
    return "group"


def _where(path: str) -> tuple[str | None, str | None]:
    """(unit, image) of a path under features/ or views/ (for the report), else (None, None)."""
    parts = path.split("/")
    if parts[0] == "features" and len(parts) >= 5:
        return "/".join(parts[:4]), parts[4]
    if parts[0] == "views" and len(parts) >= 3:
        return None, parts[2]
    return None, None


def _has_metrics(loc, eval_key: str) -> bool:
    """Whether the evaluation has metrics, in either layout (a corrupt one is its own problem)."""
    return (loc.exists(f"{artifacts.metrics_path(eval_key)}/{artifacts.ZARR_JSON}")
            or loc.exists(f"evaluations/{eval_key}/metrics.json"))


def _check_node(store: FeatureStore, zstore, path: str, document: dict) -> Problem | None:
    """The problem of one parsed node, or None."""
    loc = store.location
    kind = _node_kind(path)
    unit, image = _where(path)
    try:
        if kind == "member":
            members_key, name = path.split("/")[1:]
            if re.fullmatch(r"member_\d+", name):
                artifacts.read_member(loc, members_key, int(name[len("member_"):]))
        elif kind == "checkpoint":
            segmenter_key, name = path.split("/")[1:]
            if re.fullmatch(r"epoch_\d+", name):
                artifacts.read_checkpoint(loc, segmenter_key, int(name[len("epoch_"):]))
        elif kind == "record":
            stage, key_value = path.split("/")[1:]
            artifacts.read_record(loc, stage, key_value)
            if stage == "evaluate" and not _has_metrics(loc, key_value):
                return Problem("incomplete", f"evaluations/{key_value}", detail="evaluation recorded without metrics")
        elif kind == "metrics":
            artifacts.read_metrics(loc, path.split("/")[1])
        elif kind == "array":
            if not (document.get("attributes") or {}).get("committed") and not path.startswith("evaluations/"):
                return Problem("incomplete", path, unit, image, "written but never committed")
            try:
                arr = zarr.open_array(zstore, path=path, mode="r", zarr_format=3)
            except (ValueError, TypeError, KeyError) as err:  # parsed JSON that is no array metadata
                return Problem("corrupt", path, unit, image, f"zarr.json is not array metadata ({err})"[:200])
            store._read(arr, path)
    except CorruptObjectError as err:
        return Problem("corrupt", path, unit, image, str(err).split(": ", 1)[-1].split("; run")[0])
    except CorruptChunkError as err:
        return Problem("corrupt", path, unit, image, str(err).split(": ", 1)[-1].split("; run")[0])
    return None


def verify(store: FeatureStore, repair: bool = False) -> list[Problem]:
    """Check every node of the store: every zarr.json parses, every chunk of every array reads (crc32c, missing
    chunks), every commit marker is set, every member, record and metrics matches its checksum; stores of the
    earlier layout: every member .pt's zip CRCs, every record / metrics file parses.

    Walks the objects themselves (not zarr's listing), so a truncated zarr.json is reported, never raised. With
    repair=True each problem is removed (a corrupt group document is rewritten empty, its children kept: a
    unit's provenance is written again by the next extraction into it), so the next run recomputes exactly those and nothing else.
    """
    loc = store.location
    keys = loc.find("")
    present = set(keys)
    problems: list[Problem] = []
    zstore = loc.zarr_store(read_only=True)
    for key in keys:
        path = key[:-len(artifacts.ZARR_JSON)].rstrip("/")
        if key.rsplit("/", 1)[-1] == artifacts.ZARR_JSON:
            try:
                document = artifacts.read_document(loc, key)
            except CorruptObjectError:
                unit, image = _where(path)
                problems.append(Problem("corrupt", path or ".", unit, image,
                                        f"{key} is not valid JSON (truncated or corrupted)"))
                continue
            problem = _check_node(store, zstore, path, document or {})
            if problem:
                problems.append(problem)
        elif key.startswith("models/") and key.endswith(".pt"):  # the earlier layout's members
            if key[:-3] + ".json" not in present:
                problems.append(Problem("incomplete", key, detail="member without commit marker"))
                continue
            reason = artifacts.legacy_member_problem(loc.read_bytes(key))
            if reason:
                problems.append(Problem("corrupt", key, detail=reason))
        elif key.startswith(("models/", "segmenters/")) and key.endswith(f"/{artifacts.MEMBER_CHUNK}"):
            if key[:-len(artifacts.MEMBER_CHUNK)] + artifacts.ZARR_JSON not in present:
                problems.append(Problem("incomplete", key.rsplit("/", 1)[0], detail="member without commit marker"))
        elif key.endswith(".json") and (key.startswith("stages/") or key.endswith("/metrics.json")):
            try:  # the earlier layout's records and metrics
                artifacts.read_document(loc, key)
            except CorruptObjectError:
                problems.append(Problem("corrupt", key, detail="not valid JSON (truncated or corrupted)"))
    if repair:
        for p in problems:
            _repair(store, p)
    return problems


def _repair(store: FeatureStore, problem: Problem) -> None:
    loc = store.location
    path = "" if problem.path == "." else problem.path
    parts = path.split("/")
    kind = _node_kind(path[:-3] if path.endswith(".pt") else path)
    if parts[0] == "models" and len(parts) == 3:
        name = parts[2].removesuffix(".pt")
        artifacts.delete_member(loc, parts[1], int(name[len("member_"):]))
    elif parts[0] == "evaluations" and len(parts) >= 2 and kind != "group":
        artifacts.delete_evaluation(loc, parts[1])
    elif parts[0] == "stages" and len(parts) == 3:
        artifacts.delete_record(loc, parts[1], parts[2].removesuffix(".json"))
    elif kind == "group":  # a group's own document: rewritten empty, its children kept
        loc.write_bytes(f"{path}/{artifacts.ZARR_JSON}" if path else artifacts.ZARR_JSON, artifacts.group_document())
    else:
        loc.delete(path)
    store._root = None  # metadata changed under the cached hierarchy


@dataclass
class References:
    """What a set of configs needs: feature units -> image ids, view image ids, train and evaluate keys."""

    units: dict[str, set[str]] = field(default_factory=dict)
    view_images: set[str] = field(default_factory=set)
    train_keys: set[str] = field(default_factory=set)
    member_keys: set[str] = field(default_factory=set)
    evaluate_keys: set[str] = field(default_factory=set)


def _children(loc, prefix: str) -> list[str]:
    """Names below `prefix` that are nodes or artifacts: not the group's own zarr.json, not a writer's
    temporary file."""
    return [n for n in loc.list(prefix) if n != artifacts.ZARR_JSON and not n.startswith(".")]


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
    for view in _children(loc, "views"):
        doomed += [f"views/{view}/{i}" for i in _children(loc, f"views/{view}") if i not in refs.view_images]
    # a group's own zarr.json is never garbage: the group stays (issue: gc deleted evaluations/zarr.json)
    doomed += [f"models/{k}" for k in _children(loc, "models") if k not in refs.member_keys]
    doomed += [f"evaluations/{k}" for k in _children(loc, "evaluations") if k not in refs.evaluate_keys]
    for stage, keep in (("train", refs.train_keys), ("evaluate", refs.evaluate_keys)):
        doomed += [f"stages/{stage}/{n}" for n in _children(loc, f"stages/{stage}")
                   if n.removesuffix(".json") not in keep]
    sizes = [(d, _du(store, d)) for d in sorted(doomed)]  # sorted: listing order is the filesystem's
    if not dry_run:
        for d, _ in sizes:
            loc.delete(d)
        store._root = None
    return sizes
