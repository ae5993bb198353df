"""``secateur distill``: train (or reuse) a teacher zoo model and distill a smaller student."""

from __future__ import annotations

import argparse

from rich.console import Console

from ..errors import ConfigError
from ..recipes import DistillJobConfig, run_distill
from ..zoo import list_models
from ._recipe import given_settings

SECTION = "distill"


def add(sub: argparse._SubParsersAction) -> None:
    """Declare the ``distill`` parser; only the flags given reach the config."""
    models = ", ".join(list_models())
    p = sub.add_parser(
        "distill",
        help="distill a small student zoo model from a trained teacher, measure and report both",
        description="Train the teacher on Fashion-MNIST (or reuse the baseline cached by an "
        "earlier run with the same settings), train the student from scratch on the teacher's "
        "softened outputs and the labels, then measure, save and report both. With no options: "
        "resnet20 teaches lenet5.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument(
        "--recipe",
        metavar="YAML",
        help=f"read settings from a YAML file (or its '{SECTION}:' section); flags override it",
    )
    p.add_argument("--teacher", metavar="NAME", help=f"zoo model: {models} (default resnet20)")
    p.add_argument("--student", metavar="NAME", help=f"zoo model: {models} (default lenet5)")
    p.add_argument(
        "--student-width-mult",
        type=float,
        dest="student_width_mult",
        metavar="X",
        help="width multiplier of a VGG student, e.g. 0.25",
    )
    p.add_argument(
        "--teacher-checkpoint",
        dest="teacher_checkpoint",
        metavar="CKPT",
        help="use this saved .safetensors model as the teacher instead of training one",
    )
    p.add_argument("--data", metavar="DIR", help="folder holding the four Fashion-MNIST IDX files")
    p.add_argument("--temperature", type=float, help="softmax temperature, > 0 (default 4)")
    p.add_argument(
        "--alpha",
        type=float,
        help="weight of the soft KL term in [0, 1]; 1 - alpha weights the labels (default 0.9)",
    )
    p.add_argument(
        "--feature",
        dest="features",
        action="append",
        metavar="STUDENT=TEACHER",
        help="also match these modules' outputs (repeatable), e.g. features=features",
    )
    p.add_argument("--feature-weight", type=float, dest="feature_weight", help="(default 1.0)")
    p.add_argument("--epochs", type=int, help="student distillation epochs (default 8)")
    p.add_argument(
        "--teacher-epochs",
        type=int,
        dest="teacher_epochs",
        help="teacher training epochs (default 8)",
    )
    p.add_argument("--lr", type=float, help="student learning rate (default 0.05)")
    p.add_argument(
        "--teacher-lr", type=float, dest="teacher_lr", help="teacher learning rate (default 0.05)"
    )
    p.add_argument("--batch-size", type=int, dest="batch_size", help="(default 128)")
    p.add_argument(
        "--schedule", choices=["cosine", "onecycle", "constant"], help="(default cosine)"
    )
    p.add_argument("--seed", type=int, help="(default 0)")
    p.add_argument("--device", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--out", metavar="DIR", help="output folder (default secateur-distill)")
    p.add_argument(
        "--no-cache", dest="cache", action="store_false", help="always train the teacher anew"
    )
    p.add_argument("--limit", type=int, help="use only the first N train and test images")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument(
        "--latency-runs", type=int, dest="latency_runs", help="timed runs, >= 20 (default 50)"
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide progress bars"
    )


def _feature_pairs(flags: list[str]) -> list[list[str]]:
    pairs = []
    for flag in flags:
        student, sep, teacher = flag.partition("=")
        if not sep or not student or not teacher:
            raise ConfigError(
                f"--feature {flag!r} must be STUDENT=TEACHER module names, e.g. layer3=layer3"
            )
        pairs.append([student, teacher])
    return pairs


def run(args: argparse.Namespace, console: Console) -> int:
    """Build the config from the recipe and the flags (flags win) and run the job."""
    settings, recipe, _ = given_settings(args, SECTION)
    if "features" in settings:
        settings["features"] = _feature_pairs(settings["features"])
    run_distill(DistillJobConfig.from_dict({**recipe, **settings}), console=console)
    return 0
