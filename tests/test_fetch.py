"""`ddpmseg fetch` and `ddpmseg reproduce` against a real HTTP server on 127.0.0.1 (the standard library's, with
Range support) serving a tiny guided-diffusion checkpoint built here and a small data set archive in the official
layout. No internet."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from flows.cli import main
from pipeline import fetched, presets, synthetic
from pipeline.backbone import TINY_MODEL_FLAGS, build_backbone, redraw_zero_initialised_convs
from pipeline.config import load_config
from storage import assets
from storage.assets import Asset, AssetError

TINY_PRESET = "tiny_5"


class AssetServer:
    """Serves `files` (URL path -> bytes) with Range support. `cut_next`: the next response sends only that many
    bytes of its body and closes the connection; `corrupt`: paths whose bytes are served with one byte flipped."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.cut_next: int | None = None
        self.corrupt: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                if self.path not in server.files:
                    self.send_error(404)
                    return
                data = server.files[self.path]
                if self.path in server.corrupt:
                    data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
                start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                body = data[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_next is not None:
                    body, server.cut_next = body[:server.cut_next], None
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def tiny_checkpoint_bytes() -> bytes:
    """A tiny guided-diffusion UNet's state dict as torch.save writes it (the official checkpoints' format)."""
    torch.manual_seed(0)
    model, _ = build_backbone(TINY_MODEL_FLAGS, device="cpu")
    with torch.no_grad():
        redraw_zero_initialised_convs(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def datasets_archive(root: Path, top: str = "") -> bytes:
    """A .tar.gz in the official layout: [top/]tiny_5/real/{train,test}/<stem>.png + <stem>.npy."""
    synthetic.write_dataset(root / "gen", n_train=4, n_test=3, n_unlabelled=0, size=32, seed=0)
    layout = root / "layout" / TINY_PRESET / "real"
    for split in ("train", "test"):
        shutil.copytree(root / "gen" / split, layout / split)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(root / "layout" / TINY_PRESET, arcname=f"{top}/{TINY_PRESET}" if top else TINY_PRESET)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served_files(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("assets")
    return {"/models/ddpm_checkpoints/tiny.pt": tiny_checkpoint_bytes(), "/datasets.tar.gz": datasets_archive(root)}


@pytest.fixture
def server(served_files):
    srv = AssetServer(dict(served_files))
    yield srv
    srv.close()


@pytest.fixture
def home(tmp_path, monkeypatch, server):
    """$DDPMSEG_HOME in tmp_path, $DDPMSEG_ASSETS_URL at the test server, the tiny checkpoint in the manifest."""
    path = tmp_path / "home"
    monkeypatch.setenv("DDPMSEG_HOME", str(path))
    monkeypatch.setenv("DDPMSEG_ASSETS_URL", server.url)
    monkeypatch.setitem(assets.MANIFEST, "ddpm/tiny", Asset(name="ddpm/tiny", url_path="models/ddpm_checkpoints/tiny.pt",
                                                            local_path="checkpoints/ddpm/tiny.pt"))
    return path


def test_fetch_checkpoint_and_datasets(home, server, served_files, capsys):
    assert main(["fetch", "checkpoint", "ddpm/tiny", "--quiet"]) == 0
    out = capsys.readouterr().out
    target = home / "checkpoints" / "ddpm" / "tiny.pt"
    ckpt = served_files["/models/ddpm_checkpoints/tiny.pt"]
    assert target.read_bytes() == ckpt
    digest = hashlib.sha256(ckpt).hexdigest()
    assert f"sha256 {digest} recorded (first download" in out
    assert assets.recorded_digests(home)["ddpm/tiny"]["sha256"] == digest
    assert not list(target.parent.glob("*.part"))
    # the file loads as the official checkpoints do
    state = torch.load(target, map_location="cpu", weights_only=True)
    assert "input_blocks.0.0.weight" in state

    assert main(["fetch", "checkpoint", "ddpm/tiny", "--quiet"]) == 0
    assert "present" in capsys.readouterr().out
    assert len(server.requests) == 1  # nothing downloaded the second time

    assert main(["fetch", "datasets", "--quiet", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["state"] == "downloaded" and result["unpacked"] == [TINY_PRESET]
    train, test = fetched.dataset_dirs(TINY_PRESET, home)
    assert len(list(train.glob("*.png"))) == 4 and len(list(train.glob("*.npy"))) == 4
    assert len(list(test.glob("*.png"))) == 3
    assert (home / "datasets" / assets.DATASETS_MARKER).is_file()
    assert not (home / "downloads" / "datasets.tar.gz").exists()  # deleted once unpacked

    assert main(["fetch", "list", "--json"]) == 0
    listing = {a["name"]: a for a in json.loads(capsys.readouterr().out)["assets"]}
    assert listing["ddpm/tiny"]["present"] and listing["ddpm/tiny"]["sha256"] == digest
    assert listing["ddpm/tiny"]["digest_source"] == "recorded"
    assert listing["datasets"]["present"] and not listing["ddpm/ffhq"]["present"]


def test_progress_bar_shows_rate_and_eta(home, server):
    stream = io.StringIO()
    assets.fetch(assets.MANIFEST["ddpm/tiny"], home, progress=True, stream=stream)
    text = stream.getvalue()
    assert "tiny.pt" in text and "MB/s" in text and "ETA" in text and "100%" in text


def test_archive_with_a_top_folder_unpacks_into_the_official_layout(tmp_path):
    archive = tmp_path / "datasets.tar.gz"
    archive.write_bytes(datasets_archive(tmp_path, top="datasets"))
    names = assets.unpack_datasets(archive, tmp_path / "home" / "datasets")
    assert names == [TINY_PRESET]
    assert len(list((tmp_path / "home" / "datasets" / TINY_PRESET / "real" / "test").glob("*.npy"))) == 3


def test_cut_download_resumes_to_identical_bytes(home, server, served_files):
    ckpt = served_files["/models/ddpm_checkpoints/tiny.pt"]
    half = len(ckpt) // 2
    server.cut_next = half
    asset = assets.MANIFEST["ddpm/tiny"]
    with pytest.raises(AssetError, match="stopped at .* run the same command again to resume"):
        assets.fetch(asset, home, progress=False, attempts=1)
    target = asset.path(home)
    part = target.with_name("tiny.pt.part")
    assert not target.exists() and part.stat().st_size == half
    assert server.requests[-1] == ("/models/ddpm_checkpoints/tiny.pt", None)

    result = assets.fetch(asset, home, progress=False)
    assert server.requests[-1] == ("/models/ddpm_checkpoints/tiny.pt", f"bytes={half}-")  # continued, not restarted
    assert result.resumed_from == half and result.bytes == len(ckpt)
    assert target.read_bytes() == ckpt and not part.exists()


def test_cut_download_resumes_within_one_call(home, server, served_files):
    server.cut_next = 1000
    result = assets.fetch(assets.MANIFEST["ddpm/tiny"], home, progress=False, attempts=2)
    assert [r[1] for r in server.requests] == [None, "bytes=1000-"]
    assert assets.MANIFEST["ddpm/tiny"].path(home).read_bytes() == served_files["/models/ddpm_checkpoints/tiny.pt"]
    assert result.resumed_from == 0


def test_corrupted_download_is_refused_and_not_put_in_place(home, server, served_files, monkeypatch):
    ckpt = served_files["/models/ddpm_checkpoints/tiny.pt"]
    shipped = Asset(name="ddpm/tiny", url_path="models/ddpm_checkpoints/tiny.pt", local_path="checkpoints/ddpm/tiny.pt",
                    sha256=hashlib.sha256(ckpt).hexdigest(), size=len(ckpt))
    monkeypatch.setitem(assets.MANIFEST, "ddpm/tiny", shipped)
    server.corrupt.add("/models/ddpm_checkpoints/tiny.pt")
    with pytest.raises(AssetError, match="refused: sha256 .* expected .* shipped manifest"):
        assets.fetch(shipped, home, progress=False)
    target = shipped.path(home)
    assert not target.exists() and not target.with_name("tiny.pt.part").exists()
    server.corrupt.clear()
    assert assets.fetch(shipped, home, progress=False).digest_source == "manifest"
    assert target.read_bytes() == ckpt


def test_download_differing_from_the_recorded_digest_is_refused(home, server):
    asset = assets.MANIFEST["ddpm/tiny"]
    assert assets.fetch(asset, home, progress=False).digest_source == "first download"
    asset.path(home).unlink()
    server.corrupt.add("/models/ddpm_checkpoints/tiny.pt")
    with pytest.raises(AssetError, match="refused: .*recorded by this cache's first download"):
        assets.fetch(asset, home, progress=False)
    assert not asset.path(home).exists()


def test_server_down_gives_one_clear_line(home, monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    monkeypatch.setenv("DDPMSEG_ASSETS_URL", f"http://127.0.0.1:{port}/mirror")
    assert main(["fetch", "checkpoint", "ddpm/tiny", "--quiet"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and captured.out == ""
    url = f"http://127.0.0.1:{port}/mirror/models/ddpm_checkpoints/tiny.pt"
    assert lines[0].startswith(f"ddpmseg: error: cannot download {url}: ")
    assert f"save it as {home / 'checkpoints' / 'ddpm' / 'tiny.pt'}" in lines[0]
    assert "DDPMSEG_ASSETS_URL" in lines[0] and "DDPMSEG_URL_DDPM_TINY" in lines[0]


def test_two_fetches_of_one_asset_never_share_a_part(home, server):
    import subprocess
    import sys

    asset = assets.MANIFEST["ddpm/tiny"]
    lock = asset.path(home).with_name("tiny.pt.lock")
    lock.parent.mkdir(parents=True)
    lock.write_text(str(os.getpid()))  # a running process holds it
    with pytest.raises(AssetError, match=f"another ddpmseg fetch \\(process {os.getpid()}\\) is downloading"):
        assets.fetch(asset, home, progress=False)
    assert server.requests == []
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(gone.stdout.strip())  # its process has exited: a stale lock is taken over
    assert assets.fetch(asset, home, progress=False).state == "downloaded"
    assert not lock.exists()


def test_per_asset_url_override(home, server, monkeypatch):
    monkeypatch.setenv("DDPMSEG_ASSETS_URL", "http://127.0.0.1:1/nowhere")
    monkeypatch.setenv("DDPMSEG_URL_DDPM_TINY", server.url + "models/ddpm_checkpoints/tiny.pt")
    assert assets.fetch(assets.MANIFEST["ddpm/tiny"], home, progress=False).state == "downloaded"


def test_torchvision_weights_fetch_by_absolute_url_and_are_checked_against_the_file_name(home, server, monkeypatch,
                                                                                        capsys):
    """imagenet/* live at their own absolute URL (not under $DDPMSEG_ASSETS_URL) and their SHA-256 must start with the
    8 hex digits of the file name, as torchvision checks: a made-up file named after its own digest is put in place
    (after a cut transfer resumed), the same bytes under a name promising another digest are refused."""
    data = bytes(range(256)) * 40
    prefix = hashlib.sha256(data).hexdigest()[:8]
    wrong = "0" * 8 if prefix != "0" * 8 else "1" * 8
    server.files[f"/models/resnet101-{prefix}.pth"] = data
    server.files[f"/models/resnet50-{wrong}.pth"] = data
    for backbone, tag in (("resnet101", prefix), ("resnet50", wrong)):
        monkeypatch.setitem(assets.MANIFEST, f"imagenet/{backbone}", assets.torchvision_asset(
            f"imagenet/{backbone}", f"{server.url}models/{backbone}-{tag}.pth",
            f"checkpoints/imagenet/{backbone}-{tag}.pth"))
    monkeypatch.setenv("DDPMSEG_ASSETS_URL", "http://127.0.0.1:1/nowhere")  # does not move absolute URLs

    server.cut_next = 1000
    assert main(["fetch", "checkpoint", "imagenet/resnet101", "--quiet", "--attempts", "1"]) == 2
    assert "run the same command again to resume" in capsys.readouterr().err
    assert main(["fetch", "checkpoint", "imagenet/resnet101", "--quiet", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    target = home / "checkpoints" / "imagenet" / f"resnet101-{prefix}.pth"
    assert result["state"] == "downloaded" and result["resumed_from"] == 1000 and result["path"] == str(target)
    assert target.read_bytes() == data and result["sha256"].startswith(prefix)
    assert server.requests[-1] == (f"/models/resnet101-{prefix}.pth", "bytes=1000-")

    assert main(["fetch", "checkpoint", "imagenet/resnet50", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"refused: sha256 {prefix}" in err
    assert f"does not start with {wrong}, the prefix its file name resnet50-{wrong}.pth promises" in err
    assert not list((home / "checkpoints" / "imagenet").glob("resnet50*"))  # neither the file nor a part


def test_manifest_names_the_official_assets_in_the_official_layout(tmp_path, monkeypatch):
    monkeypatch.delenv("DDPMSEG_ASSETS_URL", raising=False)
    base = "https://storage.yandexcloud.net/yandex-research/ddpm-segmentation/"
    assert assets.asset_url(assets.MANIFEST["ddpm/ffhq"]) == base + "models/ddpm_checkpoints/ffhq.pt"
    assert assets.asset_url(assets.MANIFEST["swav_w2/lsun_cat"]) == base + "models/swav_w2_checkpoints/lsun_cat.pth"
    assert assets.asset_url(assets.MANIFEST["datasets"]) == base + "datasets.tar.gz"
    assert {n.split("/")[0] for n in assets.MANIFEST} == {"ddpm", "mae", "swav", "swav_w2", "datasets", "imagenet"}
    # torchvision's IMAGENET1K_V1 files at their own URL, where the config's `imagenet` looks for them
    monkeypatch.setenv("DDPMSEG_ASSETS_URL", "https://mirror.example/ddpm-segmentation/")
    for backbone, prefix in (("resnet101", "63fe2227"), ("resnet50", "0676ba61")):
        asset = assets.checkpoint_asset(f"imagenet/{backbone}")
        assert assets.asset_url(asset) == f"https://download.pytorch.org/models/{backbone}-{prefix}.pth"
        assert asset.sha256_prefix == prefix and asset.sha256 is None
        assert asset.path(tmp_path) == fetched.imagenet_weights_path(backbone, home=tmp_path)
    monkeypatch.setenv("DDPMSEG_URL_IMAGENET_RESNET101", "https://mirror.example/r101.pth")
    assert assets.asset_url(assets.MANIFEST["imagenet/resnet101"]) == "https://mirror.example/r101.pth"
    with pytest.raises(ValueError, match="carries no"):
        assets.torchvision_asset("imagenet/x", "https://host/resnet.pth", "checkpoints/imagenet/resnet.pth")
    for preset, entry in presets.DATASET_PRESETS.items():  # the downloader writes where the config reads
        asset = assets.checkpoint_asset(entry["checkpoint"])
        assert asset.path(tmp_path) == fetched.checkpoint_path(entry["checkpoint"], home=tmp_path)
    with pytest.raises(AssetError, match="unknown checkpoint 'ffhq_35'.*ddpm/ffhq"):
        assets.checkpoint_asset("ffhq_35")


def test_home_defaults_to_the_user_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("DDPMSEG_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert fetched.assets_home() == (tmp_path / "cache" / "ddpmseg").resolve()
    monkeypatch.setenv("DDPMSEG_HOME", str(tmp_path / "mine"))
    assert fetched.assets_home() == (tmp_path / "mine").resolve()


# -- presets find fetched assets -----------------------------------------------------------------------------------
def test_preset_without_directories_uses_fetched_data_and_checkpoint(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("DDPMSEG_HOME", str(home))
    config = tmp_path / "exp" / "ffhq.yaml"
    config.parent.mkdir()
    config.write_text("dataset: {preset: ffhq_34}\n")
    cfg = load_config(config)
    assert cfg.dataset.train_dir == str(home.resolve() / "datasets" / "ffhq_34" / "real" / "train")
    assert cfg.dataset.test_dir == str(home.resolve() / "datasets" / "ffhq_34" / "real" / "test")
    assert cfg.model.checkpoint == str(home.resolve() / "checkpoints" / "ddpm" / "ffhq.pt")

    for command in ("status", "run"):
        assert main([command, str(config)]) == 2
        err = capsys.readouterr().err
        assert "`ddpmseg fetch checkpoint ffhq`" in err and str(home.resolve() / "checkpoints") in err
    checkpoint = home / "checkpoints" / "ddpm" / "ffhq.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"placeholder")
    assert main(["status", str(config)]) == 2
    assert "`ddpmseg fetch datasets`" in capsys.readouterr().err

    # the official repository's layout beside the config wins over the cache
    for sub in ("checkpoints/ddpm", "datasets/ffhq_34/real/train", "datasets/ffhq_34/real/test"):
        (config.parent / sub).mkdir(parents=True)
    (config.parent / "checkpoints" / "ddpm" / "ffhq.pt").write_bytes(b"x")
    cfg = load_config(config)
    assert cfg.model.checkpoint == str(config.parent.resolve() / "checkpoints" / "ddpm" / "ffhq.pt")
    assert cfg.dataset.train_dir == str(config.parent.resolve() / "datasets" / "ffhq_34" / "real" / "train")


# -- reproduce -------------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_preset(monkeypatch):
    """A preset registered for the test: the tiny UNet's checkpoint `tiny.pt`, the data set tiny_5, published 30 ± 5."""
    from tests.tiny import tiny_config

    flags = tiny_config(Path("."))["model"]["flags"]
    monkeypatch.setitem(presets.DATASET_PRESETS, TINY_PRESET, dict(
        number_class=len(synthetic.CLASS_NAMES), ignore_label=synthetic.IGNORE_LABEL, training_number=4,
        testing_number=3, class_names=list(synthetic.CLASS_NAMES), palette=[list(c) for c in synthetic.PALETTE],
        checkpoint="tiny.pt",
        reproduce={"model": {"flags": flags}, "features": {"steps": [50, 150], "blocks": [2, 3, 4], "batch_size": 4},
                   "classifier": {"model_num": 2, "max_epochs": 2}}))
    monkeypatch.setitem(presets.PUBLISHED_MIOU, TINY_PRESET, {"paper": (30.0, 5.0)})


def test_reproduce_end_to_end_with_two_seeds(home, server, tiny_preset, prefect_server, tmp_path, capsys):
    out = tmp_path / "repro"
    assert main(["reproduce", TINY_PRESET, "--seeds", "0,1", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    header, rule, row = text.splitlines()[:3]
    for column in ("preset", "ours (mean ± std)", "paper (DDPM)", "difference", "within paper ±"):
        assert column in header
    assert row.startswith(TINY_PRESET) and "30.0 ± 5.0" in row
    # fetched on the way: the checkpoint and the data set
    assert (home / "checkpoints" / "ddpm" / "tiny.pt").is_file()
    assert fetched.dataset_dirs(TINY_PRESET, home)[0].is_dir()

    result = json.loads((out / "reproduce.json").read_text())
    (entry,) = result["rows"]
    per_seed = list(entry["per_seed"].values())
    assert len(per_seed) == 2 and all(0 <= v <= 100 for v in per_seed)
    assert entry["miou"] == pytest.approx(sum(per_seed) / 2)
    assert entry["miou_std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2)
    assert entry["diff_paper"] == pytest.approx(entry["miou"] - 30.0)
    assert entry["within_paper"] == (abs(entry["miou"] - 30.0) <= 5.0)
    assert f"{entry['miou']:.1f} ± {entry['miou_std']:.1f}" in row
    # each seed set both the shared noise and the MLP seeds: two extractions, two ensembles
    configs = sorted((out / "configs").glob("*.yaml"))
    assert [load_config(c).features.seed for c in configs] == [0, 1]
    assert [load_config(c).classifier.seed for c in configs] == [0, 1]
    assert [r["unet_forwards"] for r in result["runs"]] == [4, 4]
    assert [r["members_trained"] for r in result["runs"]] == [2, 2]
    assert all(r["wall_s"] > 0 for r in result["runs"])
    assert TINY_PRESET in (out / "reproduce.md").read_text() and (out / "report.html").is_file()

    # a re-run reuses the store: no forwards, no members, same table
    assert main(["reproduce", TINY_PRESET, "--seeds", "0,1", "--out", str(out), "--quiet", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [r["unet_forwards"] for r in again["runs"]] == [0, 0]
    assert again["rows"][0]["miou"] == pytest.approx(entry["miou"])


def test_checkpoint_names_accept_presets_names_families_and_all():
    from flows.fetch_cli import checkpoint_names

    assert checkpoint_names(["ffhq_34", "celeba_19", "lsun_cat", "mae/ffhq"]) == ["ddpm/ffhq", "ddpm/lsun_cat",
                                                                                 "mae/ffhq"]
    assert checkpoint_names(["bedroom_28"], family="swav") == ["swav/lsun_bedroom"]
    assert checkpoint_names(["all"]) == ["ddpm/lsun_bedroom", "ddpm/ffhq", "ddpm/lsun_cat", "ddpm/lsun_horse"]


def test_comparison_rows_for_both_recipes():
    from flows.reproduce import compare, format_table

    row = compare("ffhq_34", "paper", {0: 58.0, 1: 60.0, 2: 59.0})
    assert row["miou"] == pytest.approx(59.0) and row["miou_std"] == pytest.approx((2 / 3) ** 0.5)
    assert row["paper"] == 59.1 and row["paper_pm"] == 1.4
    assert row["diff_paper"] == pytest.approx(-0.1) and row["within_paper"] is True
    far = compare("cat_15", "improved", {0: 40.0, 1: 42.0})
    assert far["within_paper"] is False and far["study_improved"] == 59.54
    assert far["diff_study"] == pytest.approx(41.0 - 59.54)
    text = format_table([row, far])
    header, _, first, second = text.splitlines()
    assert "study (improved)" in header and "difference vs study" in header
    assert first.split()[:5] == ["ffhq_34", "paper", "0,1,2", "59.0", "±"] and "yes" in first
    assert "59.54" in second and "-18.5" in second and " no " in second
    unpublished = compare("ade_bedroom_30", "improved", {0: 30.0})
    assert unpublished["study_improved"] is None and unpublished["within_paper"] is False


def test_reproduce_unknown_preset_is_a_user_error(tmp_path, capsys):
    assert main(["reproduce", "ffhq_35", "--out", str(tmp_path / "r")]) == 2
    assert "unknown preset 'ffhq_35'" in capsys.readouterr().err


def test_reproduce_baselines_compare_with_their_own_published_rows():
    """--model mae|swav|swav_w2: the config runs that extractor on the preset (its default checkpoint, fetched as
    <kind>/<name>) and the row compares with that model's published figure, not the DDPM one."""
    from flows.reproduce import compare, format_table, reproduce_config
    from pipeline.config import parse_config

    cfg = reproduce_config("ffhq_34", 1, "paper", "store", "out", model="mae")
    assert cfg["model"] == {"kind": "mae"} and cfg["features"]["seed"] == cfg["classifier"]["seed"] == 1
    parsed = parse_config({**cfg, "dataset": {"preset": "ffhq_34", "train_dir": "a", "test_dir": "b"}})
    assert parsed.model.kind == "mae" and parsed.features.steps == [0]
    assert Path(parsed.model.checkpoint).parts[-2:] == ("mae", "ffhq.pth")
    row = compare("ffhq_34", "paper", {0: 58.0, 1: 59.0}, model="mae")
    assert (row["model"], row["paper"], row["paper_pm"]) == ("mae", 58.8, 1.1) and row["within_paper"] is True
    assert compare("horse_21", "paper", {0: 54.0}, model="swav_w2")["paper"] == 54.0
    assert compare("horse_21", "paper", {0: 54.0}, model="swav")["paper"] == 51.7
    assert "paper (MAE)" in format_table([row]).splitlines()[0]
    with pytest.raises(ValueError, match="unknown model"):
        reproduce_config("ffhq_34", 0, "paper", "store", "out", model="vit")
