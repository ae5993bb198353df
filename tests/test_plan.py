"""The budget planner (``explore.plan_for_budget`` / ``apply_plan``) and ``secateur plan``."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from secateur import StructuredConfig, create_model, prune_
from secateur.cli._main import main
from secateur.cli._plan import parse_quantity
from secateur.errors import ConfigError
from secateur.explore import Budget, apply_plan, plan_for_budget
from secateur.explore._plan import MAX_SPARSITY
from secateur.export import CompressionConfig, load_compressed
from secateur.measure import count_macs, count_params
from secateur.pruning import MaskSet
from secateur.recipes import PlanConfig

X = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return create_model("lenet_300_100")


def fidelity(reference: nn.Module):  # noqa: ANN201
    """``score(m)`` = minus the mean squared distance to ``reference``'s outputs (0 at best)."""
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(x)

    def score(model: nn.Module) -> float:
        with torch.no_grad():
            return -float((model(x) - want).pow(2).mean())

    return score


def test_budget_validation() -> None:
    assert Budget(max_macs=10).shape_bound and not Budget(max_file_bytes=10).shape_bound
    assert Budget(max_params=5).to_dict() == {
        "max_file_bytes": None,
        "max_params": 5,
        "max_macs": None,
        "max_latency_ms": None,
        "min_speedup": None,
    }
    with pytest.raises(ConfigError, match="at least one limit"):
        Budget()
    with pytest.raises(ConfigError, match="max_macs"):
        Budget(max_macs=0)
    with pytest.raises(ConfigError, match="max_file_bytes"):
        Budget(max_file_bytes=1.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_latency_ms"):
        Budget(max_latency_ms=-1.0)


def test_compute_budget_takes_the_smallest_structured_ratio_that_fits(mlp: nn.Module) -> None:
    dense = count_macs(mlp, X).dense
    before = [p.detach().clone() for p in mlp.parameters()]
    budget = Budget(max_macs=dense // 2)
    plan = plan_for_budget(mlp, budget, example_inputs=X, score=fidelity(mlp), latency_runs=20)
    assert 0 < plan.ratio < 0.9 and plan.sparsity == 0.0 and plan.candidates == ()
    assert plan.shape_method == "channels"  # an MLP has no residual block
    assert [p.stage for p in plan.shapes] == ["channels"] and plan.shapes[0].setting == plan.ratio
    assert plan.baseline.macs == dense and plan.baseline.score == 0.0
    # bisection: every probe that fits has a ratio >= the plan's, every one that does not, less
    probes = [p for p in plan.probes if p.stage == "channels"]
    assert all(p.setting >= plan.ratio for p in probes if p.fits)
    assert all(p.setting < plan.ratio for p in probes if not p.fits)
    assert all((p.figures.macs <= budget.max_macs) is p.fits for p in probes)
    assert max(p.setting for p in probes if not p.fits) > plan.ratio - 0.01  # resolution 0.9/256
    assert all(torch.equal(a, b) for a, b in zip(mlp.parameters(), before, strict=True))


def test_file_budget_picks_the_best_scoring_coding(mlp: nn.Module) -> None:
    budget = Budget(max_file_bytes=60_000)
    codings = [
        CompressionConfig(values="exact"),
        CompressionConfig(values="int8"),
        CompressionConfig(values="codebook", bits=5),
    ]
    plan = plan_for_budget(
        mlp, budget, example_inputs=X, score=fidelity(mlp), codings=codings, latency_runs=20
    )
    assert plan.ratio == 0.0 and [c.coding for c in plan.candidates] == [
        "exact",
        "int8",
        "codebook 5-bit",
    ]
    assert all(c.fits and c.figures.file_bytes <= 60_000 for c in plan.candidates)
    # denser codings of the values need fewer zeros to fit
    exact, int8, book = plan.candidates
    assert exact.setting > int8.setting > book.setting
    best = max(plan.candidates, key=lambda c: c.figures.score)
    assert plan.coding == codings[plan.candidates.index(best)] and plan.sparsity == best.setting
    for coding in ("exact", "int8", "codebook 5-bit"):
        mine = [p for p in plan.probes if p.coding == coding]
        chosen = next(c for c in plan.candidates if c.coding == coding).setting
        assert all(p.setting >= chosen for p in mine if p.fits)
        assert all(p.setting < chosen for p in mine if not p.fits)
    json.dumps(plan.to_dict())


def test_a_budget_the_baseline_meets_prunes_nothing(mlp: nn.Module, tmp_path: Path) -> None:
    params, _ = count_params(mlp)
    plan = plan_for_budget(
        mlp,
        Budget(max_params=params, max_file_bytes=10**7, max_latency_ms=1e4),
        example_inputs=X,
        score=fidelity(mlp),
        latency_runs=20,
    )
    assert (plan.ratio, plan.sparsity, plan.coding.values.value) == (0.0, 0.0, "exact")
    outcome = apply_plan(mlp, plan, tmp_path / "m.secz", example_inputs=X, score=fidelity(mlp))
    assert all(outcome.met.values()) and set(outcome.met) == {
        "max_file_bytes",
        "max_params",
        "max_latency_ms",
    }
    assert outcome.figures.score == 0.0  # exact values: the very same model


def test_unreachable_budgets_and_models_without_a_spec(mlp: nn.Module) -> None:
    with pytest.raises(
        ConfigError,
        match=r"out of reach: the most pruned probes still miss it \(channels at ratio 0\.9: macs",
    ):
        plan_for_budget(mlp, Budget(max_macs=10), example_inputs=X, score=fidelity(mlp))
    with pytest.raises(ConfigError, match="no coding gets the file under 100 bytes"):
        plan_for_budget(
            mlp,
            Budget(max_file_bytes=100),
            example_inputs=X,
            score=fidelity(mlp),
            codings=[CompressionConfig(values="int8")],
        )
    plain = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(ConfigError, match="needs a secateur_spec"):
        plan_for_budget(plain, Budget(max_file_bytes=1000), example_inputs=X, score=lambda m: 0.0)
    with pytest.raises(ConfigError, match="codings is empty"):
        plan_for_budget(
            mlp, Budget(max_file_bytes=10**5), example_inputs=X, score=fidelity(mlp), codings=[]
        )


def test_apply_plan_recovers_each_stage_and_tightens_an_overgrown_file(
    mlp: nn.Module, tmp_path: Path
) -> None:
    budget = Budget(max_file_bytes=40_000, max_macs=count_macs(mlp, X).dense // 2)
    codings = [CompressionConfig(values="codebook", bits=5)]
    plan = plan_for_budget(
        mlp, budget, example_inputs=X, score=fidelity(mlp), codings=codings, latency_runs=20
    )
    assert plan.ratio > 0 and plan.sparsity > 0
    seen: list[str] = []

    def recover(model: nn.Module, constraint: object) -> None:
        seen.append(type(constraint).__name__)
        if isinstance(constraint, MaskSet):
            # a recovery that spreads the surviving values: k-means codes then compress worse
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1 + 0.5 * torch.rand_like(p))
            constraint.apply()

    path = tmp_path / "m.secz"
    outcome = apply_plan(
        mlp, plan, path, example_inputs=X, score=fidelity(mlp), recover=recover, latency_runs=20
    )
    # the spreading recovery grew the file: tightened, then recovered once more
    assert seen == ["NoneType", "MaskSet", "Codebooks", "MaskSet", "Codebooks"]
    assert outcome.met == {"max_file_bytes": True, "max_macs": True}
    assert outcome.figures.file_bytes == path.stat().st_size <= 40_000
    assert plan.sparsity <= outcome.sparsity <= MAX_SPARSITY
    reloaded = load_compressed(path).model
    assert count_macs(reloaded, X).dense == outcome.figures.macs <= budget.max_macs


def test_the_files_metadata_counts_toward_the_limit(mlp: nn.Module, tmp_path: Path) -> None:
    budget = Budget(max_file_bytes=50_000)
    codings = [CompressionConfig(values="int8")]
    metadata = {"note": "x" * 8000}  # a header this long must come out of the budget
    plain = plan_for_budget(mlp, budget, example_inputs=X, score=fidelity(mlp), codings=codings)
    padded = plan_for_budget(
        mlp, budget, example_inputs=X, score=fidelity(mlp), codings=codings, metadata=metadata
    )
    assert padded.sparsity > plain.sparsity
    outcome = apply_plan(
        mlp,
        padded,
        tmp_path / "m.secz",
        example_inputs=X,
        score=fidelity(mlp),
        metadata=metadata,
        latency_runs=20,
    )
    assert outcome.sparsity == padded.sparsity  # no recovery, so no tightening was needed
    assert outcome.figures.file_bytes <= 50_000 and outcome.met == {"max_file_bytes": True}


def test_apply_plan_checks_its_path_before_any_work(mlp: nn.Module, tmp_path: Path) -> None:
    plan = plan_for_budget(mlp, Budget(max_macs=10**9), example_inputs=X, score=fidelity(mlp))
    calls = []
    with pytest.raises(ConfigError, match=r"name the file \.secz"):
        apply_plan(
            mlp,
            plan,
            tmp_path / "m.bin",
            example_inputs=X,
            score=fidelity(mlp),
            recover=lambda m, c: calls.append(c),
        )
    assert calls == [] and list(tmp_path.iterdir()) == []
    plain = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(ConfigError, match="apply_plan needs the model's .secz file"):
        apply_plan(plain, plan, tmp_path / "m.secz", example_inputs=X, score=lambda m: 0.0)


def test_coding_labels_and_counts_in_messages(mlp: nn.Module) -> None:
    assert CompressionConfig(values="int8").label == "int8"
    assert CompressionConfig(values="codebook", bits=5).label == "codebook 5-bit"
    wide = CompressionConfig(values="codebook", bits=5, per_layer={"fc3": 8})
    assert wide.label == "codebook 5-bit, fc3=8"
    with pytest.raises(ConfigError, match=r"ratio 0\.9: params \d\d,\d\d\d > 1,000\)"):
        plan_for_budget(mlp, Budget(max_params=1000), example_inputs=X, score=fidelity(mlp))


def test_weights_config_may_not_fix_the_sparsity(mlp: nn.Module) -> None:
    from secateur import StructuredConfig, UnstructuredConfig

    with pytest.raises(ConfigError, match="chooses the structured ratio itself"):
        plan_for_budget(
            mlp, Budget(max_macs=10**5), example_inputs=X, score=lambda m: 0.0,
            structured=StructuredConfig(ratio=0.0, per_layer={"fc1": 0.5}),
        )  # fmt: skip

    for weights in (UnstructuredConfig(nm="2:4"), UnstructuredConfig(per_layer={"fc1": 0.5})):
        with pytest.raises(ConfigError, match="chooses the sparsity itself"):
            plan_for_budget(
                mlp, Budget(max_file_bytes=10**5), example_inputs=X, score=lambda m: 0.0,
                weights=weights,
            )  # fmt: skip


def test_parse_quantity() -> None:
    assert parse_quantity("max_file_bytes", "30k", True) == 30_000
    assert parse_quantity("max_macs", "1.5M", True) == 1_500_000
    assert parse_quantity("max_params", "2G", True) == 2 * 10**9
    assert parse_quantity("max_params", "1234", True) == 1234
    assert parse_quantity("max_latency_ms", "0.25", False) == 0.25
    assert parse_quantity("max_macs", 5000, True) == 5000  # from a recipe
    with pytest.raises(ConfigError, match="--max-file-bytes 'lots' is not a number"):
        parse_quantity("max_file_bytes", "lots", True)
    with pytest.raises(ConfigError, match="--max-latency-ms '2k' is not a number"):
        parse_quantity("max_latency_ms", "2k", False)
    with pytest.raises(ConfigError, match="not finite"):
        parse_quantity("max_macs", "infk", True)


def test_plan_config() -> None:
    config = PlanConfig(max_macs=1000, codings="int8, codebook5")
    assert [c.values.value for c in config.compression()] == ["int8", "codebook"]
    assert config.compression()[1].bits == 5
    assert PlanConfig.from_dict(config.to_dict()) == config
    for bad, message in [
        ({}, "at least one limit"),
        ({"max_macs": 10, "codings": ["zip"]}, "unknown coding 'zip'"),
        ({"max_macs": 10, "codings": ["codebook9"]}, "bits"),
        ({"max_macs": 10, "codings": []}, "codings must list"),
        ({"max_macs": 10, "criterion": "nope"}, "unknown criterion 'nope'"),
        ({"max_macs": 10, "model": "nonet"}, "unknown model 'nonet'"),
        ({"max_macs": 10, "reconstruct": 1}, "reconstruct"),
    ]:
        with pytest.raises(ConfigError, match=message):
            PlanConfig(**bad)
    refit = PlanConfig(max_macs=1000, reconstruct=True)
    assert refit.structured().reconstruct and not refit.common().reconstruct
    assert refit.common().recalibrate_bn
    assert not PlanConfig(max_macs=10, recalibrate_bn=False).common().recalibrate_bn
    with pytest.raises(ConfigError, match="recalibrate_bn"):
        PlanConfig(max_macs=10, recalibrate_bn="no")


# --- the command line ---------------------------------------------------------------------


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    argv = ["plan", "--data", str(data), "--limit", "300", "--epochs", "1", "--out", str(out)]
    return argv + ["--threads", "1", "--no-progress", "--latency-runs", "20", *extra]


def test_cli_end_to_end(digits_idx_dir: Path, tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "out"
    argv = _argv(digits_idx_dir, out, "--max-file-bytes", "40k", "--max-macs", "130k")
    assert main([*argv, "--codings", "int8,codebook5", "--finetune-epochs", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.secz", "plan.json", "plan.md"]
    saved = json.loads((out / "plan.json").read_text(encoding="utf-8"))
    assert saved["outcome"]["met"] == {"max_file_bytes": True, "max_macs": True}
    assert saved["plan"]["budget"]["max_file_bytes"] == 40_000
    assert saved["plan"]["coding"] in ("int8", "codebook 5-bit")
    model = load_compressed(out / "model.secz").model
    example = torch.zeros(1, 1, 28, 28)
    assert count_macs(model, example).dense == saved["outcome"]["figures"]["macs"] <= 130_000
    assert (out / "model.secz").stat().st_size == saved["outcome"]["figures"]["file_bytes"]
    report = (out / "plan.md").read_text(encoding="utf-8")
    assert "| MACs per sample [compute] | 130,000 |" in report and "| met |" in report
    assert "## Value codings for the file limit" in report
    # a recipe's plan: section, a flag winning over it
    recipe = tmp_path / "r.yaml"
    recipe.write_text("plan:\n  max_params: 50k\n  finetune_epochs: 0\n", encoding="utf-8")
    again = tmp_path / "again"
    assert main(_argv(digits_idx_dir, again, "--recipe", str(recipe), "--max-params", "60k")) == 0
    second = json.loads((again / "plan.json").read_text(encoding="utf-8"))
    assert second["plan"]["budget"]["max_params"] == 60_000
    assert second["outcome"]["met"] == {"max_params": True}
    assert "reused from cache" in second["baseline_source"]


def test_cli_reconstruct_refits_every_channel_probe_and_the_final_model(
    digits_idx_dir: Path, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from secateur.pruning import _structured

    refits = []
    real = _structured.Refitter.__call__

    def counted(self: _structured.Refitter, removals: list) -> list[str]:
        done = real(self, removals)
        refits.append(done)
        return done

    monkeypatch.setattr(_structured.Refitter, "__call__", counted)
    out = tmp_path / "out"
    argv = _argv(digits_idx_dir, out, "--max-macs", "130k", "--reconstruct")
    assert main([*argv, "--finetune-epochs", "0"]) == 0
    saved = json.loads((out / "plan.json").read_text(encoding="utf-8"))
    assert saved["plan"]["structured"]["reconstruct"] is True
    assert saved["outcome"]["met"] == {"max_macs": True}
    probes = [p for p in saved["plan"]["probes"] if p["stage"] == "channels"]
    assert (
        len(refits) == len(probes) + 1
    )  # each probe (the best one scored as it is), then the plan
    assert all(refits)  # every call refitted at least one layer


def test_cli_exits_1_when_the_final_measurement_misses_a_limit(
    digits_idx_dir: Path,
    tmp_path: Path,
    cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from secateur.recipes import _plan as job

    real = job.apply_plan

    def timed_slower(*args: object, **kwargs: object):  # noqa: ANN202
        outcome = real(*args, **kwargs)  # as if the final timing came out over the limit
        return dataclasses.replace(outcome, met={k: False for k in outcome.met})

    monkeypatch.setattr(job, "apply_plan", timed_slower)
    out = tmp_path / "out"
    assert main(_argv(digits_idx_dir, out, "--max-params", "100k", "--finetune-epochs", "0")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_params not met on the final measurement" in err
    assert "NOT met" in (out / "plan.md").read_text(encoding="utf-8")  # the files are there
    assert json.loads((out / "plan.json").read_text())["outcome"]["met"] == {"max_params": False}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "at least one limit"),
        (["--max-file-bytes", "lots"], "--max-file-bytes 'lots' is not a number"),
        (["--max-macs", "1k", "--codings", "zip"], "unknown coding 'zip'"),
        (["--max-macs", "10"], "budget out of reach"),
        (["--max-file-bytes", "100"], "no coding gets the file under 100 bytes"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(
    digits_idx_dir: Path,
    tmp_path: Path,
    cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    out = tmp_path / "out"
    assert main(_argv(digits_idx_dir, out, "--finetune-epochs", "0", *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (out / "model.secz").exists() and not (out / "plan.json").exists()


def test_latency_probes_must_come_under_the_limit_by_the_margin() -> None:
    from secateur.explore._budget import LATENCY_MARGIN, Figures, excess
    from secateur.measure import Latency

    def timed(ms: float) -> Figures:
        latency = Latency(ms, ms, 20, 10, 1, 1, "cpu", "pytorch")
        return Figures(None, 10, 10, 10, latency, None)

    budget = Budget(max_latency_ms=1.0)
    limit = ("max_latency_ms",)
    assert LATENCY_MARGIN == 0.05
    assert excess(timed(0.94), budget, limit) == []
    (message,) = excess(timed(0.97), budget, limit)  # under the limit, not under the margin
    assert message == "latency_ms 0.97 > 0.95 (the limit 1 less the 5% timing margin)"
    assert excess(Figures(None, 10, 10, 10, None, None), budget, limit) == [
        "latency_ms not measured > 0.95 (the limit 1 less the 5% timing margin)"
    ]


def test_compute_budget_chooses_between_channels_and_blocks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = create_model("resnet20", in_channels=1, image_size=28)
    dense = count_macs(net, X).dense
    budget = Budget(max_macs=int(dense * 0.7))
    score = fidelity(net)
    plan = plan_for_budget(net, budget, example_inputs=X, score=score, latency_runs=20)
    assert [p.stage for p in plan.shapes] == ["channels", "blocks"]
    assert all(p.fits and p.figures.macs <= budget.max_macs for p in plan.shapes)
    best = max(plan.shapes, key=lambda p: p.figures.score)
    assert (plan.shape_method, plan.ratio) == (best.stage, best.setting)
    # blocks only: whole residual blocks go, and the reloaded file keeps them gone
    blocks = plan_for_budget(
        net, budget, example_inputs=X, score=score, latency_runs=20, shape_methods=("blocks",)
    )
    assert blocks.shape_method == "blocks" and 0 < blocks.ratio < 1
    outcome = apply_plan(net, blocks, tmp_path / "r.secz", example_inputs=X, score=score)
    assert outcome.met == {"max_macs": True}
    assert outcome.figures.macs == blocks.shapes[0].figures.macs
    assert outcome.figures.params == blocks.shapes[0].figures.params < count_params(net)[0]


def test_shape_methods_are_checked(mlp: nn.Module) -> None:
    budget = Budget(max_macs=1000)
    with pytest.raises(ConfigError, match="no shape method applies: the model has no residual"):
        plan_for_budget(
            mlp, budget, example_inputs=X, score=lambda m: 0.0, shape_methods=["blocks"]
        )
    for bad in ([], ["rows"], ["channels", "channels"]):
        with pytest.raises(ConfigError, match="shape_methods"):
            plan_for_budget(mlp, budget, example_inputs=X, score=lambda m: 0.0, shape_methods=bad)
    assert PlanConfig(max_macs=10, shape_methods="blocks").shape_methods == ("blocks",)
    with pytest.raises(ConfigError, match="shape_methods"):
        PlanConfig(max_macs=10, shape_methods="channels,layers")


def test_min_speedup_is_timed_against_the_baseline_in_one_loop() -> None:
    from secateur.explore._budget import Figures, excess

    with pytest.raises(ConfigError, match="min_speedup"):
        Budget(min_speedup=1.0)
    assert Budget(min_speedup=2.0).shape_bound and Budget(min_speedup=2.0).timed
    figures = Figures(None, 1, 1, 1, None, None, speedup=2.05)
    (message,) = excess(figures, Budget(min_speedup=2.0), ("min_speedup",))
    assert message == "speedup 2.05x < 2.1x (the limit 2 plus the 5% timing margin)"
    faster = dataclasses.replace(figures, speedup=2.2)
    assert excess(faster, Budget(min_speedup=2.0), ("min_speedup",)) == []
    # a wide MLP at batch 64: removing channels pays, and every fitting probe was timed
    # interleaved with the unpruned model
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 512))
    x = torch.randn(64, 512)
    plan = plan_for_budget(
        wide, Budget(min_speedup=1.5), example_inputs=x, score=lambda m: 0.0, latency_runs=20,
        shape_methods=("channels",),
    )  # fmt: skip
    assert plan.shape_method == "channels" and 0 < plan.ratio <= 0.9
    probes = [p for p in plan.probes if p.stage == "channels"]
    assert all(p.figures.speedup is not None for p in probes)
    assert all((p.figures.speedup >= 1.575) is p.fits for p in probes)
    assert plan.baseline.speedup == 1.0


def test_candidates_are_scored_with_fresh_batchnorm_statistics() -> None:
    from secateur.recovery import batchnorm_layers, recalibrate_batchnorm_

    torch.manual_seed(0)
    net = create_model("resnet20", in_channels=1, image_size=28).eval()
    data = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    calibration = [data[:32], data[32:]]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    budget = Budget(max_macs=int(count_macs(net, X).dense * 0.5))
    seen: dict[bool, list[torch.Tensor]] = {}
    for recalibrate in (False, True):

        def score(model: nn.Module, key: bool = recalibrate) -> float:
            seen[key] = [m.running_mean.clone() for m in batchnorm_layers(model)]
            return 0.0

        plan = plan_for_budget(
            net, budget, example_inputs=X, score=score, latency_runs=20,
            calibration=calibration, shape_methods=("channels",), recalibrate_bn=recalibrate,
        )  # fmt: skip
    expected = copy.deepcopy(net)
    prune_(expected, StructuredConfig(ratio=plan.ratio), example_inputs=X)
    stale = [m.running_mean.clone() for m in batchnorm_layers(expected)]
    recalibrate_batchnorm_(expected, calibration)
    fresh = [m.running_mean for m in batchnorm_layers(expected)]
    assert all(torch.equal(a, b) for a, b in zip(seen[False], stale, strict=True))
    assert all(torch.allclose(a, b) for a, b in zip(seen[True], fresh, strict=True))
    assert not all(torch.allclose(a, b) for a, b in zip(stale, fresh, strict=True))
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # untouched
