"""``bottlefit train``: the arguments and the handler the main CLI wires in.

Also runnable on its own, which is how ``torchrun`` starts it on every process::

    torchrun --nproc_per_node 2 -m bottlefit.training.cli --data DIR --teacher-weights T.pth --arch mini_resnet
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import yaml

from bottlefit.errors import UserError
from bottlefit.flags import add_renamed


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from bottlefit.models.registry import names as arch_names

    parser.add_argument("--config", metavar="YAML", help="training config (authors' layout); flags override it")
    parser.add_argument("--data", metavar="DIR", help="ImageFolder tree with train/ and val/ (data.root)")
    parser.add_argument("--teacher-weights", metavar="PATH",
                        help="the teacher's torchvision state_dict (models.teacher_model.weights)")
    parser.add_argument("--teacher", metavar="NAME", help="teacher model name (default: the architecture's)")
    parser.add_argument("--arch", metavar="NAME", help="student architecture (models.student_model.name): "
                        f"{', '.join(arch_names())}")
    parser.add_argument("--bottleneck-channel", type=int, metavar="N",
                        help="models.student_model.params.bottleneck_channel")
    add_renamed(parser, "--out", "--output-dir", metavar="DIR", help="where best.pt, last.pt and the log go "
                "(train.output_dir)")
    parser.add_argument("--resume", metavar="LAST_PT", help="continue from a last.pt of an earlier run")
    parser.add_argument("--stage1-epochs", type=int, metavar="N")
    parser.add_argument("--stage2-epochs", type=int, metavar="N")
    parser.add_argument("--stage1-lr", type=float, metavar="LR")
    parser.add_argument("--stage2-lr", type=float, metavar="LR")
    parser.add_argument("--criterion", choices=["kd", "ce"], help="stage-2 loss (default kd)")
    parser.add_argument("--frozen-encoder", action=argparse.BooleanOptionalAction, default=None,
                        help="stage 2 with the encoder's parameters frozen (FE)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="per process (default 64)")
    parser.add_argument("--workers", type=int, metavar="N", help="data loader workers per process")
    parser.add_argument("--no-augment", action="store_true", help="train with the eval transform")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any config key, dotted, e.g. train.stage2.kd.temperature=2 (repeatable)")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    o: dict[str, Any] = {
        "data.root": args.data,
        "models.teacher_model.weights": args.teacher_weights,
        "models.teacher_model.name": args.teacher,
        "models.student_model.name": args.arch,
        "models.student_model.params.bottleneck_channel": args.bottleneck_channel,
        "train.output_dir": args.out,
        "train.resume": args.resume,
        "train.stage1.num_epochs": args.stage1_epochs,
        "train.stage2.num_epochs": args.stage2_epochs,
        "train.stage1.optimizer.params.lr": args.stage1_lr,
        "train.stage2.optimizer.params.lr": args.stage2_lr,
        "train.stage2.criterion": args.criterion,
        "train.stage2.frozen_encoder": args.frozen_encoder,
        "data.batch_size": args.batch_size,
        "data.num_workers": args.workers,
        "data.augment": False if args.no_augment else None,
        "train.seed": args.seed,
        "train.device": args.device,
    }
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. train.stage1.num_epochs=2")
        o[key.strip()] = yaml.safe_load(value)  # numbers, booleans and lists as YAML reads them
    return o


def run_train(args: argparse.Namespace) -> int:
    """Train; returns 0. UserError propagates for the main CLI to print (exit 2)."""
    from bottlefit.training import load_config, train

    config = load_config(args.config, overrides_from_args(args))
    best = train(config)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line rather than one per process
        print(json.dumps({"best_checkpoint": str(best)}) if getattr(args, "json", False) else
              f"best checkpoint: {best}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bottlefit train", description="Two-stage BottleFit training")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_train(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
