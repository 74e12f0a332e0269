"""`ddpmseg backbone train`: train a guided-diffusion UNet on a folder of images (thin layer over
pipeline.diffusion_training).

    ddpmseg backbone train IMAGES_DIR --flags FLAGS --out ckpt.pt [--steps N] [--batch-size B] [--lr LR]
        [--seed S] [--save-every K] [--resume] [--ema-rate R] [--save-dtype float16] [--device D]

The main parser adds these commands with `add_backbone_commands(subparsers)`.
"""
from __future__ import annotations

import argparse
import json
import sys

_FLAGS_HELP = (
    "model flags: a preset name ('tiny': the 1.19 M-parameter 32x32 test UNet, TINY_MODEL_FLAGS; 'demo': the "
    "shipped demo backbone's flags) or a JSON file holding an object of guided-diffusion flags (missing keys "
    "take guided_diffusion's model_and_diffusion_defaults(), e.g. a ckpt.json written by this command)"
)

_EPILOG = """files written for --out ckpt.pt:
  ckpt.pt         plain state dict (EMA weights unless --ema-rate 0); the official code loads it with
                  model.load_state_dict(torch.load("ckpt.pt"))
  ckpt.json       the complete model flags: use it as model.flags (or --flags) to rebuild the model
  ckpt.resume.pt  raw + EMA weights, optimizer state and step, for --resume
All three are rewritten every --save-every steps and at the end. --steps is the TOTAL step count: after an
interruption, re-run the same command with --resume to continue up to it (same result as an uninterrupted run).
Timesteps are drawn uniformly from [0, diffusion_steps); every random draw of step s derives from (--seed, s).

example (how the shipped demo backbone pipeline/assets/demo_backbone.pt was trained, ~27 min on 2 CPU cores):
  python -c "from pipeline import synthetic; synthetic.write_dataset('demo-backbone-data', n_unlabelled=3000)"
  ddpmseg backbone train demo-backbone-data/unlabelled --flags tiny --out demo_backbone.pt \
      --steps 1600 --batch-size 32 --lr 1e-3 --seed 0 --save-every 200
"""


def add_backbone_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `backbone train` to a parser's subcommands; the handler is set as `func` (returns an exit code)."""
    backbone = subparsers.add_parser("backbone", help="train a guided-diffusion UNet backbone on your images")
    commands = backbone.add_subparsers(dest="backbone_cmd", required=True)
    train = commands.add_parser(
        "train", help="train a guided-diffusion UNet with GaussianDiffusion.training_losses",
        description="Train a guided-diffusion UNet (denoising loss of the library's own GaussianDiffusion."
                    "training_losses, uniform timesteps, AdamW, EMA) on every .png/.jpg/.jpeg under IMAGES_DIR "
                    "(recursive; square images, resized to the flags' image_size; random horizontal flips). "
                    "Uses CUDA when available.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("images_dir", metavar="IMAGES_DIR", help="folder of training images (searched recursively)")
    train.add_argument("--flags", required=True, metavar="FLAGS", help=_FLAGS_HELP)
    train.add_argument("--out", required=True, metavar="CKPT", help="checkpoint to write, e.g. ckpt.pt")
    train.add_argument("--steps", type=int, default=2000, help="total optimizer steps (default 2000)")
    train.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    train.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    train.add_argument("--ema-rate", type=float, default=0.999,
                       help="EMA decay of the saved weights, 0 disables EMA (default 0.999, warmed up as "
                            "min(rate, (1+s)/(10+s)))")
    train.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    train.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flips")
    train.add_argument("--save-every", type=int, default=500, help="write the files every K steps (default 500; "
                                                                   "0: only at the end)")
    train.add_argument("--save-dtype", choices=["float32", "float16"], default="float32",
                       help="dtype of ckpt.pt (float16 halves the file; load_checkpoint casts back)")
    train.add_argument("--resume", action="store_true", help="continue from CKPT's .resume.pt file")
    train.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    train.add_argument("--json", action="store_true", help="print the training summary as one JSON object")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_backbone_train)


def cmd_backbone_train(args: argparse.Namespace) -> int:
    import torch

    from pipeline.diffusion_training import TrainSettings, train_backbone

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             weight_decay=args.weight_decay, ema_rate=args.ema_rate, seed=args.seed,
                             flip=args.flip, save_every=args.save_every, save_dtype=args.save_dtype)
    info = train_backbone(args.images_dir, args.flags, args.out, settings, resume=args.resume,
                          device=args.device, progress=not args.quiet)
    if args.json:
        print(json.dumps(info, sort_keys=True))
    else:
        if info["start_step"] >= info["steps"]:
            print(f"nothing to do: {info['out']} is already at step {info['start_step']} (--steps {info['steps']})")
        else:
            print(f"trained {info['parameters'] / 1e6:.2f} M parameters on {info['images']} images: steps "
                  f"{info['start_step']} -> {info['steps']}, {info['elapsed_s']:.0f} s in all, "
                  f"final loss {info['final_loss']:.4f} (mean of the last 100 steps)")
        print(f"checkpoint  {info['out']}\nflags       {info['flags_path']}\nresume      {info['resume_path']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m flows.backbone_cli backbone train ...`), same errors as `ddpmseg`."""
    from pipeline.backbone import BackboneError
    from pipeline.datasets import DatasetError

    parser = argparse.ArgumentParser(prog="ddpmseg")
    add_backbone_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (BackboneError, DatasetError, FileNotFoundError) as err:
        print(f"ddpmseg: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
