"""`ddpmseg`: the command line, a thin layer over flows/ and storage/.

    ddpmseg demo [--out DIR] [--json]             generate a small labelled data set and run the whole flow on it
    ddpmseg run CONFIG [--store URL] [--json]     extract -> train -> evaluate, re-using what the store holds
                                                  (nothing changed: no Prefect flow run unless --always-flow)
    ddpmseg extract|train|evaluate CONFIG         one stage (and what it needs)
    ddpmseg config import ddpm.json|mae.json|swav.json [--model-flags "..."]   an official experiment file -> our YAML
    ddpmseg config presets | show CONFIG
    ddpmseg fetch checkpoint PRESET|NAME... | datasets | list    the official assets, into $DDPMSEG_HOME
    ddpmseg reproduce PRESET... [--seeds 0,1,2] [--recipe paper|improved]   ours vs the published mIoU
    ddpmseg synthesize CONFIG --samples N [--respacing K] [--ddim]   DatasetDDPM: samples into the store
    ddpmseg segmenter train CONFIG [--samples N]  DatasetDDPM: a DeepLabV3 on labelled samples vs the ensemble
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from flows.fetch_cli import require_assets
from flows.runner import debug_enabled, prefect_defaults, run_config, seed_list, start_embedded_prefect, store_url

EXIT_USER_ERROR = 2
DEFAULT_STORE = "ddpmseg-store"  # store commands without a URL
DEFAULT_DEMO_OUT = "ddpmseg-demo"  # `ddpmseg demo`'s output directory; its store is DIR/store
VERBOSE_HELP = ("on an error, show the full traceback and Prefect's logs of the failed run (also: DDPMSEG_DEBUG=1); "
                "default: one line 'ddpmseg: error: ...', exit code 2")


def _prefect_did_not_start(err: BaseException) -> str | None:
    """The one-line message for Prefect's RuntimeError "Timed out while attempting to connect to ephemeral Prefect
    API server"; None for any other error."""
    from flows.runner import PREFECT_STARTUP_TIMEOUT_VAR

    if not isinstance(err, RuntimeError) or not str(err).startswith("Timed out while attempting to connect to ephemeral Prefect API server"):
        return None
    return (f"Prefect's local server did not start within {os.environ.get(PREFECT_STARTUP_TIMEOUT_VAR, '20')} s "
            f"(load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores); raise {PREFECT_STARTUP_TIMEOUT_VAR}")


def _user_errors() -> tuple[type[BaseException], ...]:
    from pipeline.config import ConfigError
    from pipeline.datasets import DatasetError
    from pipeline.extractors import ExtractorError
    from storage.features import StoreError
    from storage.assets import AssetError
    from storage.location import StoreAccessError

    errors = (ConfigError, DatasetError, ExtractorError, StoreError, StoreAccessError, AssetError, FileNotFoundError)
    # a BackboneError exists only once pipeline.backbone ran (it imports torch): a quick command's error is
    # reported without importing it
    backbone = sys.modules.get("pipeline.backbone")
    return errors + (backbone.BackboneError,) if backbone is not None else errors


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, sort_keys=True))
        return
    stages = ", ".join(f"{k}: {v}" for k, v in summary.get("stages", {}).items())
    print(f"stages      {stages}")
    print(f"forwards    {summary.get('unet_forwards', 0)}   members trained {summary.get('members_trained', 0)}")
    if summary.get("message"):
        print(summary["message"])
    if "flow_run" in summary and summary["flow_run"] is None:
        print(f"prefect     {summary.get('prefect', 'no flow run started')}")
    if "miou" in summary:
        print(f"mIoU        {summary['miou']:.2f} (official)   {summary['miou_standard']:.2f} (standard)   "
              f"pixel acc {summary['pixel_accuracy']:.2f}")
        print(f"metrics     {summary['metrics_path']}")
        print(f"masks       {summary['masks_path']}")


def cmd_run(args: argparse.Namespace, stages: tuple[str, ...]) -> int:
    summary = run_config(args.config, args.store, stages, progress=not args.quiet, read_only=args.read_only,
                         dask_address=args.dask_address, always_flow=args.always_flow)
    _print_summary(summary, args.json)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import format_table, run_demo

    datasetddpm = None
    if args.datasetddpm:
        from flows.demo import DEMO_DATASETDDPM

        datasetddpm = {**DEMO_DATASETDDPM, **({"samples": args.samples} if args.samples is not None else {})}
        if datasetddpm["samples"] < 1:
            from pipeline.config import ConfigError

            raise ConfigError(f"--samples {args.samples}: expected at least 1")
    result = run_demo(args.out, seeds=args.seeds, n_train=args.train, n_test=args.test, members=args.members,
                      progress=not args.quiet, datasetddpm=datasetddpm)
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0
    print(format_table(result["features"]))
    print(f"seeds       {result['seeds']} (classifier seeds; ± = spread over them)")
    print(f"forwards    {result['unet_forwards']}   members trained {result['members_trained']}   "
          f"wall {result['wall_s']:.0f} s")
    if result.get("datasetddpm_wall_s") is not None:
        entry = result["features"]["datasetddpm"]
        print(f"datasetddpm a DeepLabV3 (ddpmseg_resnet18) trained on {entry['samples']} samples of the demo backbone "
              f"labelled by the ddpm ensemble (seed {result['seeds'][0]}); {result['datasetddpm_wall_s']:.0f} s of "
              f"the wall time")
    print(f"metrics     {result['metrics_path']}")
    print(f"report      {result['report_path']}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from pipeline.presets import DATASET_PRESETS

    if args.config_cmd == "import":
        from pipeline.official_import import import_official

        data = import_official(args.json_file, args.model_flags)
        text = yaml.safe_dump(data, sort_keys=False)
        if args.out:
            Path(args.out).write_text(text)
            print(f"wrote {args.out}", file=sys.stderr)
        else:
            print(text, end="")
    elif args.config_cmd == "presets":
        from pipeline.extractors.kinds import KINDS, OFFICIAL_SETTINGS  # plain data: no torch

        for name, p in DATASET_PRESETS.items():
            print(f"{name:16s} classes {p['number_class']:3d}  ignore {p['ignore_label']:3d}  "
                  f"train {p['training_number']:3d}  test {p['testing_number']:3d}  checkpoint {p['checkpoint']}")
        print("\nmodel.kind  (official features; <dataset>: the preset's checkpoint name)")
        for kind in KINDS:
            s = OFFICIAL_SETTINGS[kind]
            print(f"{kind:10s}  steps {s['steps']}  blocks {s['blocks']}  input_activations "
                  f"{str(s['input_activations']).lower()}  {s['channels']} channels  checkpoint {s['checkpoint'] or '-'}")
    elif args.config_cmd == "show":
        from pipeline.config import config_to_dict, load_config

        print(yaml.safe_dump(config_to_dict(load_config(args.config)), sort_keys=False), end="")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from flows.status import format_status, stage_status
    from pipeline.config import load_config

    cfg = load_config(args.config)
    require_assets(cfg)
    entries = stage_status(cfg, args.store)
    print(json.dumps(entries) if args.json else format_status(entries))
    return 0


def _open_store(url: str | None, config: str | None = None, read_only: bool = False):
    from storage.features import FeatureStore
    from storage.location import StoreLocation

    hint = ""
    if url is None:
        if config is None:
            url = DEFAULT_STORE
            hint = _default_store_hint()
        else:
            from pipeline.config import load_config

            url = load_config(config).store
    location = StoreLocation.parse(url)
    location.require_store(hint)  # every store command works on an existing store: never create one
    return FeatureStore(location, read_only=read_only)


def _default_store_hint() -> str:
    """For a missing default store: where a store is instead (a demo folder keeps its store in DIR/store)."""
    text = " (the default when no URL is given)"
    for candidate in (Path("store"), Path(DEFAULT_DEMO_OUT) / "store"):
        if (candidate / "zarr.json").is_file():
            return f"{text}; a store exists at {candidate}: pass it, e.g. `ddpmseg store ls {candidate}`"
    return f"{text}; `ddpmseg demo --out DIR` keeps its store in DIR/store: pass that path"


def cmd_store(args: argparse.Namespace) -> int:
    from storage import maintenance

    if args.store_cmd == "ls":
        units = maintenance.list_units(_open_store(args.url, read_only=True))
        if args.json:
            print(json.dumps([u.__dict__ for u in units]))
        else:
            print(f"{'unit':64s} {'images':>6s} {'MB':>9s}  blocks  created")
            for u in units:
                print(f"{u.path:64s} {u.images:6d} {u.bytes / 1e6:9.2f}  {u.blocks}  {u.created or '-'}")
            print(f"{len(units)} unit(s), {sum(u.bytes for u in units) / 1e6:.2f} MB")
        return 0
    if args.store_cmd == "verify":
        problems = maintenance.verify(_open_store(args.url, read_only=not args.repair), repair=args.repair)
        if args.json:
            print(json.dumps([p.__dict__ for p in problems]))
        else:
            for p in problems:
                print(p)
            verb = "repaired (deleted; a re-run recomputes them)" if args.repair else "found"
            print(f"{len(problems)} problem(s) {verb}" if problems else "store OK: every chunk and marker checked")
        return 1 if problems and not args.repair else 0
    if args.store_cmd == "gc":
        from flows import references
        from pipeline.config import load_config

        configs = [load_config(c) for c in args.configs]
        store = _open_store(args.url or configs[0].store)
        refs = maintenance.References()
        for cfg in configs:
            references.add_references(cfg, store, refs)
        removed = maintenance.collect_garbage(store, refs, dry_run=args.dry_run)
        if args.json:
            print(json.dumps([{"path": p, "bytes": b} for p, b in removed]))
        else:
            for p, b in removed:
                print(f"{'would delete' if args.dry_run else 'deleted'} {p} ({b / 1e6:.2f} MB)")
            print(f"{len(removed)} item(s), {sum(b for _, b in removed) / 1e6:.2f} MB "
                  f"{'would be freed' if args.dry_run else 'freed'}")
        return 0
    raise AssertionError(args.store_cmd)


def cmd_ablate(args: argparse.Namespace) -> int:
    prefect_defaults()
    from flows.ablate import ablate
    from pipeline.config import load_config

    load_config(args.config)
    start_embedded_prefect()
    out = ablate(str(Path(args.config).resolve()), store_url(args.store) if args.store else None,
                 closing=not args.no_closing, progress=not args.quiet)
    if args.json:
        print(json.dumps(out))
    else:
        print(Path(out["table_path"]).read_text(), end="")
        print(f"table: {out['table_path']}  json: {out['json_path']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    prefect_defaults()
    from flows.schedule import serve_configs

    serve_configs(args.configs, cron=args.cron, store=args.store, name_prefix=args.name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddpmseg", description="Label-efficient segmentation with diffusion features: "
                                "a cached extract -> train -> evaluate pipeline (Prefect flows, zarr feature store).")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, with_config: bool = True, runs: bool = False) -> None:
        if with_config:
            sp.add_argument("config", help="experiment YAML file")
            sp.add_argument("--store", help="feature store: a directory or s3://bucket/prefix (default: config's store)")
        sp.add_argument("--json", action="store_true", help="print one JSON summary object on stdout at the end")
        if runs:
            sp.add_argument("--read-only", action="store_true",
                            help="never write the store (a consumer of a shared store); a missing stage is an error")
            sp.add_argument("--dask-address", metavar="tcp://HOST:8786",
                            help="run extraction batches and ensemble members on this Dask cluster "
                                 "(default: $DDPMSEG_DASK_ADDRESS, else local)")
            sp.add_argument("--always-flow", action="store_true",
                            help="run the Prefect flow even when nothing changed, so the run is recorded in Prefect "
                                 "(default: an unchanged config returns its cached summary without starting Prefect)")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        sp.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)

    sp = sub.add_parser("run", help="run extract -> train -> evaluate for a config")
    common(sp, runs=True)
    sp.set_defaults(func=lambda a: cmd_run(a, ("extract", "train", "evaluate")))
    for stage, text in (("extract", "run the UNet and write features to the store"),
                        ("train", "train the MLP ensemble from stored features"),
                        ("evaluate", "predict the test split, score it, persist masks and metrics")):
        sp = sub.add_parser(stage, help=text)
        common(sp, runs=True)
        sp.set_defaults(func=lambda a, s=stage: cmd_run(a, (s,)))

    sp = sub.add_parser("status", help="say which stages are fresh or stale, and which input changed")
    common(sp)
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("store", help="list, verify (and repair) or garbage-collect a feature store")
    ssub = sp.add_subparsers(dest="store_cmd", required=True)
    s1 = ssub.add_parser("ls", help="units with their images, bytes and creation time")
    s1.add_argument("url", nargs="?", help=f"store directory or s3://bucket/prefix (default ./{DEFAULT_STORE})")
    s1.add_argument("--json", action="store_true")
    s2 = ssub.add_parser("verify", help="read every chunk; name corrupted or incomplete units/images; exit 1 if any")
    s2.add_argument("url", nargs="?", help=f"store directory or s3://bucket/prefix (default ./{DEFAULT_STORE})")
    s2.add_argument("--repair", action="store_true", help="delete what is corrupted or incomplete (re-run recomputes it)")
    s2.add_argument("--json", action="store_true")
    s3 = ssub.add_parser("gc", help="delete everything that none of the given configs references")
    s3.add_argument("configs", nargs="+", metavar="CONFIG")
    s3.add_argument("--store", dest="url", help="store (default: the first config's store)")
    s3.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    s3.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_store)

    sp = sub.add_parser("ablate", help="paper -> +augs -> +anti-overfit -> +TTA (-> +closing): a table of mIoU per row")
    common(sp)
    sp.add_argument("--no-closing", action="store_true", help="leave out the +closing row")
    sp.set_defaults(func=cmd_ablate)

    sp = sub.add_parser("serve", help="serve the flow for configs as Prefect deployments on a cron schedule")
    sp.add_argument("configs", nargs="+", metavar="CONFIG")
    sp.add_argument("--cron", required=True, help='cron schedule, e.g. "0 3 * * *"')
    sp.add_argument("--store", help="store for every config (default: each config's store)")
    sp.add_argument("--name", default="ddpmseg", help="deployment name prefix (default ddpmseg)")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("demo", help="diffusion features vs rgb and random-unet baselines on a procedural data set",
                        description="Generate a procedural labelled data set (if absent) and run the full flow "
                                    "for three feature types on one store: ddpm (the bundled demo backbone), rgb "
                                    "(colour + coordinates) and random-unet (the same UNet, random weights). "
                                    "Prints a table, writes DIR/metrics.json and DIR/report.html.")
    sp.add_argument("--out", default=DEFAULT_DEMO_OUT, help=f"output directory (default ./{DEFAULT_DEMO_OUT})")
    sp.add_argument("--seeds", type=seed_list, default=[0],
                    help="classifier seeds, e.g. 0,1,2: features are extracted once, one ensemble per seed "
                         "(default 0)")
    sp.add_argument("--train", type=int, default=10, help="labelled training images (default 10)")
    sp.add_argument("--test", type=int, default=50, help="test images (default 50)")
    sp.add_argument("--members", type=int, default=10, help="MLP ensemble members (default 10, as the paper)")
    sp.add_argument("--datasetddpm", action="store_true",
                    help="also DatasetDDPM: sample the demo backbone (DDIM, 20 steps), label the samples with the "
                         "ddpm ensemble, train a small DeepLabV3 on CPU, score it beside the others")
    sp.add_argument("--samples", type=int, help="with --datasetddpm: samples to draw (default 256)")
    sp.add_argument("--json", action="store_true", help="print one JSON object (the metrics and paths) at the end")
    sp.add_argument("--quiet", action="store_true", help="no progress bars")
    sp.set_defaults(func=cmd_demo)

    from flows.analysis_cli import add_analysis_commands
    from flows.backbone_cli import add_backbone_commands
    from flows.datasetddpm_cli import add_datasetddpm_commands
    from flows.fetch_cli import add_fetch_commands
    from flows.reproduce import add_reproduce_command

    add_backbone_commands(sub)
    add_analysis_commands(sub)
    add_fetch_commands(sub)
    add_reproduce_command(sub)
    add_datasetddpm_commands(sub)

    sp = sub.add_parser("config", help="import official experiment files, list presets, show a resolved config")
    csub = sp.add_subparsers(dest="config_cmd", required=True)
    ci = csub.add_parser("import", help="turn experiments/<name>/{ddpm,mae,swav,swav_w2}.json of the official code "
                                        "into our YAML")
    ci.add_argument("json_file")
    ci.add_argument("--model-flags", help='the MODEL_FLAGS string, e.g. "--image_size 256 --num_channels 256 ..."')
    ci.add_argument("--out", help="write the YAML here instead of stdout")
    csub.add_parser("presets", help="list the paper's data set presets and the model kinds' official features")
    cs = csub.add_parser("show", help="print a config with every default filled in")
    cs.add_argument("config")
    sp.set_defaults(func=cmd_config)
    return p


def _raised_in_prefect(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "/prefect/" in Path(tb.tb_frame.f_code.co_filename).as_posix()


def user_error_in(err: BaseException) -> BaseException | None:
    """The user error (a bad input, an unreachable store) that `err` is, wraps (`raise ... from`), or that Prefect
    was handling when it failed itself (e.g. resetting its run context after an S3 outage), if any. An error
    raised by our own code while handling a user error is not one: it is a bug, and is re-raised."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, _user_errors()):
            return err
        seen.add(id(err))
        err = err.__cause__ or (err.__context__ if _raised_in_prefect(err) else None)
    return None


def one_line(err: BaseException) -> str:
    """An error message on one line (a multi-line message's lines joined with ' | ')."""
    return " | ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


# guided_diffusion/nn.py decorates with torch.cuda.amp.custom_fwd/bwd, which torch deprecates (a FutureWarning per
# import of guided_diffusion, in this process and in every worker process a process pool spawns).
GUIDED_DIFFUSION_WARNING = "ignore::FutureWarning:guided_diffusion.nn"


def _quiet_dependency_warnings() -> None:
    """Ignore guided_diffusion's FutureWarnings here and, through PYTHONWARNINGS (read by every Python process
    started from this one, e.g. the sweep's spawned workers), in child processes; the user's PYTHONWARNINGS entries
    stay in force for everything else."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="guided_diffusion")
    user = os.environ.get("PYTHONWARNINGS", "")
    if GUIDED_DIFFUSION_WARNING not in user.split(","):
        os.environ["PYTHONWARNINGS"] = f"{user},{GUIDED_DIFFUSION_WARNING}" if user else GUIDED_DIFFUSION_WARNING


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_dependency_warnings()
    args = build_parser().parse_args(argv)
    debug_before = os.environ.get("DDPMSEG_DEBUG")
    if args.verbose:
        os.environ["DDPMSEG_DEBUG"] = "1"  # for this command (flows.runner.debug_enabled), restored after it
    prefect_defaults()
    try:
        return args.func(args)
    except Exception as err:  # noqa: BLE001 - a user error is reported in one line, anything else re-raised
        cause = user_error_in(err)
        message = one_line(cause) if cause is not None else _prefect_did_not_start(err)
        if message is None:
            raise
        if debug_enabled():
            import traceback

            traceback.print_exc()
        print(f"ddpmseg: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        if debug_before is None:
            os.environ.pop("DDPMSEG_DEBUG", None)
        else:
            os.environ["DDPMSEG_DEBUG"] = debug_before


def entry() -> None:
    """The `ddpmseg` executable: main(), then exit with its code. After a user error (said in one line) the process
    ends without what failed library calls leave behind (e.g. s3fs coroutines that never ran, collected at exit:
    "Exception ignored in ..."); DDPMSEG_DEBUG=1 keeps them."""
    code = main()
    if code == EXIT_USER_ERROR and not debug_enabled():
        sys.unraisablehook = lambda unraisable: None
    sys.exit(code)


if __name__ == "__main__":
    entry()
