"""Importance criteria on Fashion-MNIST, secateur against its peers, side by side in one run.

Three parts, each with the same fine-tune budget for every method:

- ``structured``: a zoo CNN (default resnet20) pruned to 2x and 4x fewer MACs, secateur's
  criteria (and, for ``--reconstruct-criteria``, the same criterion with the layers reading the
  removed channels refitted by least squares on the calibration batches) against Torch-Pruning's
  importances (magnitude, Taylor, Hessian). ``--recalibrate-criteria`` add rows whose BatchNorm
  statistics are re-estimated on the calibration batches after pruning. Every method gets the
  uniform ratio that reaches the MAC target (bisection on a copy), then the same fine-tuning.
- ``unstructured``: LeNet-300-100 at 80/90/95% sparsity, secateur's criteria against
  ``torch.nn.utils.prune.global_unstructured`` with L1, then the same fine-tuning.
- ``lenet12x``: LeNet-300-100 with at least 12x fewer non-zero weights, one-shot and gradual (AGP).

Torch-Pruning (pip torch-pruning) is a benchmark-only dependency. Run:

    .venv/bin/pip install torch-pruning
    .venv/bin/python benchmarks/criteria_fashion_mnist.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from secateur import StructuredConfig, UnstructuredConfig, create_model, prune_
from secateur.data import DataSplits, load_fashion_mnist
from secateur.export import load_model, save_model
from secateur.measure import count_macs
from secateur.pruning import GradualPruner
from secateur.recovery import finetune, recalibrate_batchnorm_
from secateur.training import TrainConfig, evaluate, fit

CACHE = Path(__file__).parent / ".cache"


def baseline(name: str, data: DataSplits, epochs: int) -> nn.Module:
    """Train ``name`` once and keep it (safetensors) for later runs."""
    path = CACHE / f"{name}-{epochs}ep-{len(data.train)}.safetensors"
    if path.exists():
        return load_model(path).model
    model = create_model(name, in_channels=1, num_classes=10, image_size=28)
    fit(model, data, TrainConfig(epochs=epochs, lr=0.05), description=f"train {name}")
    CACHE.mkdir(exist_ok=True)
    save_model(model, path)
    return model


def calibration(data: DataSplits, batches: int, size: int = 64) -> list:
    g = torch.Generator().manual_seed(0)
    source = data.train.batches(size, shuffle=True, generator=g)
    return [b for _, b in zip(range(batches), source, strict=False)]


# ---------------------------------------------------------------- structured


def ours(
    criterion: str, scope: str = "layer", reconstruct: bool = False, recalibrate: bool = False
) -> Callable:
    def prune(model: nn.Module, ratio: float, x: torch.Tensor, calib: list) -> None:
        config = StructuredConfig(
            ratio=ratio, criterion=criterion, scope=scope, reconstruct=reconstruct
        )
        prune_(model, config, example_inputs=x, calibration=calib)
        if recalibrate:
            recalibrate_batchnorm_(model, calib)

    return prune


def theirs(kind: str) -> Callable:
    def prune(model: nn.Module, ratio: float, x: torch.Tensor, calib: list) -> None:
        import torch_pruning as tp

        imp = {
            "magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
            "taylor": tp.importance.GroupTaylorImportance,
            "hessian": tp.importance.GroupHessianImportance,
        }[kind]()
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        pruner = tp.pruner.MetaPruner(
            model, x, importance=imp, pruning_ratio=ratio, ignored_layers=[last]
        )
        model.eval()
        if kind == "taylor":
            model.zero_grad()
            for xb, yb in calib:
                nn.functional.cross_entropy(model(xb), yb).backward()
        if kind == "hessian":
            imp.zero_grad()
            for xb, yb in calib:
                for loss in nn.functional.cross_entropy(model(xb), yb, reduction="none"):
                    model.zero_grad()
                    loss.backward(retain_graph=True)
                    imp.accumulate_grad(model)
        pruner.step()
        model.zero_grad(set_to_none=True)

    return prune


def ratio_for_macs(prune: Callable, dense: nn.Module, x, calib, target: float) -> float:  # noqa: ANN001
    """The uniform ratio whose pruned model has ``1/target`` of the dense MACs (bisection)."""
    want = count_macs(dense, x).dense / target
    low, high = 0.0, 0.95
    for _ in range(11):
        mid = (low + high) / 2
        trial = copy.deepcopy(dense)
        prune(trial, mid, x, calib)
        if count_macs(trial, x).dense > want:
            low = mid
        else:
            high = mid
    return high


def structured(args: argparse.Namespace, data: DataSplits) -> None:
    dense = baseline(args.model, data, args.baseline_epochs).eval()
    x = data.example_input
    calib = calibration(data, args.calib_batches)
    base_acc = evaluate(dense, data.test)
    base_macs = count_macs(dense, x).dense
    methods = {f"secateur {c}": ours(c) for c in args.criteria}
    methods.update({f"secateur {c} global": ours(c, "global") for c in args.global_criteria})
    methods.update(
        {
            f"secateur {c} + reconstruct": ours(c, reconstruct=True)
            for c in args.reconstruct_criteria
        }
    )
    for c in args.recalibrate_criteria:
        methods[f"secateur {c} + BN recalibration"] = ours(c, recalibrate=True)
        methods[f"secateur {c} + reconstruct + BN recalibration"] = ours(
            c, reconstruct=True, recalibrate=True
        )
    methods.update({f"torch-pruning {k}": theirs(k) for k in ("magnitude", "taylor", "hessian")})
    print(f"\n{args.model}: dense top-1 {base_acc:.2%}, {base_macs:,} MACs\n")
    print("| target | method | ratio | MAC reduction | params | top-1 pruned | top-1 fine-tuned |")
    print("|---|---|---|---|---|---|---|")
    for target in args.targets:
        for name, prune in methods.items():
            start = time.perf_counter()
            try:
                ratio = ratio_for_macs(prune, dense, x, calib, target)
                model = copy.deepcopy(dense)
                prune(model, ratio, x, calib)
            except Exception as exc:  # a peer's failure is a result, not a crash
                print(f"| {target}x | {name} | failed: {type(exc).__name__}: {str(exc)[:60]} |")
                continue
            macs = count_macs(model, x).dense
            params = sum(p.numel() for p in model.parameters())
            pruned_acc = evaluate(model, data.test)
            finetune(model, data, ft_config(args), progress=False)
            acc = evaluate(model, data.test)
            print(
                f"| {target}x | {name} | {ratio:.3f} | {base_macs / macs:.2f}x | {params:,} | "
                f"{pruned_acc:.2%} | {acc:.2%} |",
                flush=True,
            )
            if args.verbose:
                print(f"  ({time.perf_counter() - start:.0f} s)")


def ft_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=args.finetune_epochs, lr=args.finetune_lr, seed=1)


# ---------------------------------------------------------------- unstructured


def tnu_global_l1(model: nn.Module, sparsity: float) -> None:
    from torch.nn.utils import prune as tnu

    layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    tnu.global_unstructured(layers, pruning_method=tnu.L1Unstructured, amount=sparsity)


def nonzero_reduction(model: nn.Module) -> float:
    """All parameters over the non-zero ones (``torch.nn.utils.prune`` keeps ``weight_orig``
    and computes ``weight``; the effective tensor is what counts)."""
    total = nonzero = 0
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            value = getattr(module, pname.removesuffix("_orig"))
            total += p.numel()
            nonzero += int((value != 0).sum())
    return total / max(1, nonzero)


def unstructured(args: argparse.Namespace, data: DataSplits) -> None:
    dense = baseline("lenet_300_100", data, args.baseline_epochs).eval()
    calib = calibration(data, args.calib_batches)
    base_acc = evaluate(dense, data.test)
    print(f"\nlenet_300_100: dense top-1 {base_acc:.2%}\n")
    print("| sparsity | method | non-zero reduction | top-1 pruned | top-1 fine-tuned | drop |")
    print("|---|---|---|---|---|---|")
    methods = {
        "torch.nn.utils.prune global L1": None,
        "secateur magnitude global": UnstructuredConfig(criterion="magnitude"),
        "secateur taylor global": UnstructuredConfig(criterion="taylor", normalize="none"),
        "secateur obd global": UnstructuredConfig(criterion="obd"),
        "secateur wanda per layer": UnstructuredConfig(criterion="wanda", scope="layer"),
        "secateur wanda global (mean-normalised)": UnstructuredConfig(
            criterion="wanda", normalize="mean"
        ),
        "secateur magnitude global, gradual AGP": "agp",
    }
    for sparsity in args.sparsities:
        for name, config in methods.items():
            model = copy.deepcopy(dense)
            if config == "agp":
                # the same epochs, with the sparsity raised along the cubic AGP curve over the
                # first 60% of the steps instead of all at once (no "pruned" column: it is gradual)
                budget = ft_config(args)
                steps = budget.epochs * math.floor(len(data.train) / budget.batch_size)
                gradual = GradualPruner(
                    model,
                    UnstructuredConfig(sparsity=sparsity),
                    start_step=0,
                    end_step=int(0.6 * steps),
                    frequency=50,
                )
                fit(model, data, budget, constraint=gradual, progress=False)
                acc = evaluate(model, data.test)
                print(
                    f"| {sparsity:.0%} | {name} | {nonzero_reduction(model):.1f}x | - | "
                    f"{acc:.2%} | {100 * (base_acc - acc):+.2f} pt |",
                    flush=True,
                )
                continue
            if config is None:
                tnu_global_l1(model, sparsity)
                masks = None
            else:
                config = UnstructuredConfig.from_dict({**config.to_dict(), "sparsity": sparsity})
                masks = prune_(model, config, calibration=calib)
            pruned_acc = evaluate(model, data.test)
            finetune(model, data, ft_config(args), masks, progress=False)
            acc = evaluate(model, data.test)
            print(
                f"| {sparsity:.0%} | {name} | {nonzero_reduction(model):.1f}x | {pruned_acc:.2%} | "
                f"{acc:.2%} | {100 * (base_acc - acc):+.2f} pt |",
                flush=True,
            )


def lenet12x(args: argparse.Namespace, data: DataSplits) -> None:
    dense = baseline("lenet_300_100", data, args.baseline_epochs).eval()
    base_acc = evaluate(dense, data.test)
    sparsity = args.lenet_sparsity
    print(f"\nlenet_300_100 at {sparsity:.0%} sparsity: dense top-1 {base_acc:.2%}\n")
    print("| schedule | fine-tune epochs | non-zero reduction | top-1 | change |")
    print("|---|---|---|---|---|")
    config = UnstructuredConfig(sparsity=sparsity)
    budget = TrainConfig(epochs=args.lenet_epochs, lr=args.finetune_lr, seed=1)
    model = copy.deepcopy(dense)
    masks = prune_(model, config)
    finetune(model, data, budget, masks, progress=False)
    acc = evaluate(model, data.test)
    print(
        f"| one-shot + fine-tune | {budget.epochs} | {nonzero_reduction(model):.1f}x | "
        f"{acc:.2%} | {100 * (acc - base_acc):+.2f} pt |"
    )
    model = copy.deepcopy(dense)
    steps = budget.epochs * math.floor(len(data.train) / budget.batch_size)
    gradual = GradualPruner(model, config, start_step=0, end_step=int(0.6 * steps), frequency=50)
    fit(model, data, budget, constraint=gradual, progress=False)
    acc = evaluate(model, data.test)
    print(
        f"| gradual AGP (cubic, first 60% of steps) | {budget.epochs} | "
        f"{nonzero_reduction(model):.1f}x | {acc:.2%} | {100 * (acc - base_acc):+.2f} pt |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="*", default=["structured", "unstructured", "lenet12x"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--baseline-epochs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--targets", type=float, nargs="*", default=[2.0, 4.0])
    parser.add_argument("--sparsities", type=float, nargs="*", default=[0.8, 0.9, 0.95])
    parser.add_argument(
        "--criteria",
        nargs="*",
        default=["l1", "l2", "taylor", "obd", "wanda", "activation", "apoz", "random"],
    )
    parser.add_argument("--global-criteria", nargs="*", default=["l2", "taylor"])
    parser.add_argument("--reconstruct-criteria", nargs="*", default=["l2", "wanda", "activation"])
    parser.add_argument("--recalibrate-criteria", nargs="*", default=["l2", "wanda"])
    parser.add_argument("--lenet-sparsity", type=float, default=0.92)
    parser.add_argument("--lenet-epochs", type=int, default=10)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import torch_pruning as tp

    data = load_fashion_mnist(seed=0, limit=args.limit)
    print(
        f"torch {torch.__version__}, torch-pruning {tp.__version__}, python "
        f"{platform.python_version()}, {platform.machine()}, {args.threads} threads; "
        f"Fashion-MNIST {len(data.train):,} train / {len(data.test):,} test; fine-tune "
        f"{args.finetune_epochs} epochs at lr {args.finetune_lr} for every method; calibration "
        f"{args.calib_batches} batches of 64"
    )
    for part in args.parts:
        {"structured": structured, "unstructured": unstructured, "lenet12x": lenet12x}[part](
            args, data
        )


if __name__ == "__main__":
    main()
