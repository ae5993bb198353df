"""Sweeps over pruning settings, the Pareto front, the trade-off report and ``secateur sweep``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from secateur import StructuredConfig, UnstructuredConfig, create_model
from secateur.cli._main import main
from secateur.errors import ConfigError
from secateur.explore import SweepResult, pareto_front, sweep
from secateur.pruning import DepthConfig, MaskSet
from secateur.recipes import SweepConfig
from secateur.report import plot_tradeoff, tradeoff_markdown, tradeoff_rows

# --- the Pareto front ---------------------------------------------------------------------


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(
        x < y for x, y in zip(a, b, strict=True)
    )


def test_pareto_front_examples() -> None:
    assert pareto_front([(1, 5), (2, 2), (3, 3), (5, 1)]) == (0, 1, 3)
    assert pareto_front([(1, 1), (1, 1), (2, 2)]) == (0, 1)  # equal rows are both kept
    assert pareto_front([(0, 0, 0), (0, 0, 1)]) == (0,)
    assert pareto_front([]) == ()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(*(st.integers(0, 6) for _ in range(3))).map(lambda t: tuple(map(float, t))),
        max_size=12,
    )
)
def test_pareto_front_is_exactly_the_undominated_rows(rows: list[tuple[float, ...]]) -> None:
    front = set(pareto_front(rows))
    for i, row in enumerate(rows):
        dominated = any(_dominates(other, row) for other in rows)
        assert (i in front) is not dominated
    for i in set(range(len(rows))) - front:  # every point off the front has a front point above it
        assert any(_dominates(rows[j], rows[i]) for j in front)


# --- sweep() --------------------------------------------------------------------------------


def _score(x: torch.Tensor):  # noqa: ANN202
    def score(model: nn.Module) -> float:
        with torch.no_grad():
            return float(model(x).sum())

    return score


def test_sweep_measures_every_setting_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    x = torch.randn(1, 1, 28, 28)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls: list[tuple[str, type | None]] = []

    def recover(pruned: nn.Module, masks: MaskSet | None) -> None:
        calls.append((type(pruned).__name__, None if masks is None else type(masks)))
        with torch.no_grad():  # a recovery that moves every weight: zeros must stay zeros
            for p in pruned.parameters():
                p.add_(0.01)
                if masks is not None:
                    masks.apply()

    configs = [
        UnstructuredConfig(sparsity=0.5),
        UnstructuredConfig(sparsity=0.9),
        StructuredConfig(ratio=0.5),
    ]
    result = sweep(
        model,
        configs,
        example_inputs=x,
        score=_score(x),
        recover=recover,
        latency_runs=20,
        progress=False,
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.label for p in result.points] == [
        "baseline",
        "unstructured 0.5",
        "unstructured 0.9",
        "structured 0.5",
    ]
    assert [p.method for p in result.points] == [
        "baseline",
        "unstructured",
        "unstructured",
        "structured",
    ]
    assert [c[1] for c in calls] == [MaskSet, MaskSet, None]
    base, u50, u90, s50 = result.points
    # weight pruning: same shapes, same dense file and MACs, fewer non-zeros, smaller .secz
    assert u50.metrics.params == base.metrics.params == u90.metrics.params
    assert u50.metrics.disk_bytes == base.metrics.disk_bytes
    assert base.metrics.nonzero_params > u50.metrics.nonzero_params > u90.metrics.nonzero_params
    assert u90.metrics.sparsity > 0.85  # biases stay, the recovery did not regrow the zeros
    assert base.compressed_bytes > u50.compressed_bytes > u90.compressed_bytes
    # structured: physically smaller
    assert s50.metrics.params < base.metrics.params and s50.metrics.macs < base.metrics.macs
    assert s50.metrics.disk_bytes < base.metrics.disk_bytes
    assert s50.stored_bytes == min(s50.metrics.disk_bytes, s50.compressed_bytes)
    # one interleaved loop: same conditions for every point
    lats = [p.metrics.latency for p in result.points]
    assert {(lat.runs, lat.batch_size, lat.threads) for lat in lats} == {(20, 1, lats[0].threads)}
    # the front is computed from the measured figures
    objectives = [(-p.score, p.stored_bytes, p.metrics.latency.median_ms) for p in result.points]
    assert result.front == pareto_front(objectives)
    assert SweepResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_sweep_of_a_model_without_a_spec_has_no_compressed_file() -> None:
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(4, 8)
    result = sweep(
        net,
        [UnstructuredConfig(nm="2:4")],
        example_inputs=x,
        score=_score(x),
        latency_runs=20,
        progress=False,
    )
    point = result.points[1]
    assert point.label == "unstructured 2:4" and point.ratio == 0.5
    assert point.compressed_bytes is None and point.stored_bytes == point.metrics.disk_bytes
    assert point.metrics.latency.batch_size == 4


def test_sweep_of_a_model_with_tied_weights() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.out = nn.Linear(8, 10, bias=False)
            self.out.weight = self.emb.weight  # tied, as language models do

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.out(self.emb(ids))

    torch.manual_seed(0)
    ids = torch.randint(0, 10, (2, 5))
    result = sweep(
        Tied(),
        [UnstructuredConfig(sparsity=0.5)],
        example_inputs=ids,
        score=lambda m: 0.0,
        latency_runs=20,
        progress=False,
    )
    base, half = result.points
    # the tied matrix is stored once: 10 x 8 float32 plus the safetensors header
    assert 320 < base.metrics.disk_bytes < 320 + 200
    assert half.metrics.nonzero_params == 40


def test_sweep_rejects_bad_input() -> None:
    net = nn.Sequential(nn.Linear(4, 2))
    x = torch.zeros(1, 4)
    with pytest.raises(ConfigError, match="at least one pruning config"):
        sweep(net, [], example_inputs=x, score=_score(x))
    with pytest.raises(ConfigError, match="cannot sweep a dict"):
        sweep(net, [{"sparsity": 0.5}], example_inputs=x, score=_score(x))  # type: ignore[list-item]


# --- the report -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_sweep() -> SweepResult:
    torch.manual_seed(0)
    model = create_model("lenet5")
    x = torch.randn(1, 1, 28, 28)
    return sweep(
        model,
        [UnstructuredConfig(sparsity=0.6), StructuredConfig(ratio=0.5)],
        example_inputs=x,
        score=_score(x),
        score_label="sum of logits",
        latency_runs=20,
        progress=False,
    )


def test_report_rows_and_markdown(small_sweep: SweepResult) -> None:
    rows = tradeoff_rows(small_sweep)
    assert [r[0] for r in rows] == ["baseline", "unstructured 0.6", "structured 0.5"]
    base = small_sweep.baseline
    for row, point in zip(rows, small_sweep.points, strict=True):
        assert row[4] == f"{point.metrics.nonzero_params:,}"
        assert row[8] == f"{base.metrics.disk_bytes / point.stored_bytes:.2f}×"
        assert (row[-1] == "✓") is (small_sweep.points.index(point) in small_sweep.front)
    text = tradeoff_markdown(small_sweep, title="t", setup=[("model", "lenet5")], plot_name="p.png")
    assert "| structured 0.5 |" in text and "![accuracy against size and latency](p.png)" in text
    assert "Score: sum of logits" in text


def test_plot_is_written_as_png_or_svg(small_sweep: SweepResult, tmp_path: Path) -> None:
    png = plot_tradeoff(small_sweep, tmp_path / "s.png")
    assert png.read_bytes().startswith(b"\x89PNG")
    svg = plot_tradeoff(small_sweep, tmp_path / "s.svg", title="my title")
    assert "my title" in svg.read_text(encoding="utf-8")
    with pytest.raises(ConfigError, match=r"name the file \.png or \.svg"):
        plot_tradeoff(small_sweep, tmp_path / "s.jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png", "s.svg"]


# --- the job and the command line -----------------------------------------------------------


def test_config_points_and_validation() -> None:
    config = SweepConfig(methods="structured, depth", ratios=[0.5, 0.25, 0.5], model="resnet20")
    assert [p.method.value for p in config.points()] == ["structured"] * 2 + ["depth"] * 2
    assert config.ratios == (0.25, 0.5)
    assert [p.pruning() for p in config.points()][-1] == DepthConfig(ratio=0.5)
    assert SweepConfig.from_dict(config.to_dict()) == config
    json.dumps(config.to_dict())  # JSON-able: the methods are stored by name
    for bad, message in [
        ({"methods": ["pruneit"]}, "unknown method 'pruneit' in methods"),
        ({"methods": []}, "methods must list one or more"),
        ({"methods": ["structured", "structured"]}, "lists a method twice"),
        ({"ratios": []}, "ratios must list one or more"),
        ({"ratios": [0.5, 1.0]}, "ratios item"),
        ({"ratios": ["a"]}, "ratios item 'a' is not a number"),
        ({"finetune_epochs": -1}, "finetune_epochs"),
        ({"criterion": "nope"}, "unknown criterion 'nope'"),
        ({"methods": ["unstructured"], "reconstruct": True}, "structured pruning only"),
        ({"reconstruct": "yes"}, "reconstruct"),
    ]:
        with pytest.raises(ConfigError, match=message):
            SweepConfig(**bad)
    refit = SweepConfig(methods="unstructured,structured", ratios=[0.5], reconstruct=True)
    unstructured, structured = refit.points()
    assert structured.pruning().reconstruct and not unstructured.reconstruct
    assert SweepConfig.from_dict(refit.to_dict()) == refit
    assert SweepConfig().common().recalibrate_bn  # on by default, as in compress
    assert not SweepConfig(recalibrate_bn=False).common().recalibrate_bn


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    argv = ["sweep", "--model", "lenet_300_100", "--data", str(data), "--limit", "300"]
    argv += ["--epochs", "1", "--out", str(out), "--threads", "1", "--no-progress"]
    return argv + ["--latency-runs", "20", *extra]


def test_cli_end_to_end(digits_idx_dir: Path, tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "out"
    assert main(_argv(digits_idx_dir, out, "--ratios", "0.5,0.9")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json", "sweep.md", "sweep.png"]
    saved = json.loads((out / "sweep.json").read_text(encoding="utf-8"))
    result = SweepResult.from_dict(saved)
    assert [p.label for p in result.points] == [
        "baseline",
        "unstructured 0.5",
        "unstructured 0.9",
        "structured 0.5",
        "structured 0.9",
    ]
    base = result.baseline
    assert all(0.0 <= p.score <= 100.0 for p in result.points)
    assert result.points[2].compressed_bytes < base.compressed_bytes
    assert result.points[4].metrics.params < result.points[3].metrics.params < base.metrics.params
    assert saved["job"]["recipe"]["methods"] == ["unstructured", "structured"]
    report = (out / "sweep.md").read_text(encoding="utf-8")
    assert "| structured 0.9 |" in report and "![accuracy against size and latency]" in report
    assert (out / "sweep.png").read_bytes().startswith(b"\x89PNG")
    # a recipe's sweep: section, with a flag winning; the cached baseline is reused
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sweep:\n  methods: [sparsegpt]\n  ratios: [0.5]\n", encoding="utf-8")
    again = tmp_path / "again"
    assert main(_argv(digits_idx_dir, again, "--recipe", str(recipe), "--ratios", "0.7")) == 0
    second = json.loads((again / "sweep.json").read_text(encoding="utf-8"))
    assert [p["label"] for p in second["points"]] == ["baseline", "sparsegpt 0.7"]
    assert "reused from cache" in second["job"]["baseline_source"]
    assert second["points"][0]["score"] == saved["points"][0]["score"]


def test_cli_reconstruct_refits_the_structured_points(
    digits_idx_dir: Path, tmp_path: Path, cache_dir: Path
) -> None:
    scores = {}
    for flags in ((), ("--reconstruct",)):
        out = tmp_path / f"out{len(flags)}"
        extra = ("--methods", "structured", "--ratios", "0.7", "--finetune-epochs", "0")
        assert main(_argv(digits_idx_dir, out, *extra, "--limit", "600", *flags)) == 0
        saved = json.loads((out / "sweep.json").read_text(encoding="utf-8"))
        assert saved["job"]["recipe"]["reconstruct"] == bool(flags)
        report = (out / "sweep.md").read_text(encoding="utf-8")
        assert ("readers refitted by least squares" in report) == bool(flags)
        scores[bool(flags)] = saved["points"][1]["score"]
    assert scores[True] > scores[False]  # one-shot: no fine-tuning after the refit


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "unstructured,bogus"], "unknown method 'bogus' in methods"),
        (["--ratios", "0.5,x"], "--ratios item 'x' is not a number"),
        (["--ratios", "0.5,1.5"], "ratios item"),
        (["--methods", "depth,structured"], "has no residual blocks to remove: drop depth from"),
        (
            ["--model", "resnet20", "--methods", "depth", "--ratios", "0.01,0.5"],
            "depth at ratio 0.01 removes none of the",
        ),
        (["--criterion", "nope"], "unknown criterion 'nope'"),
        (["--methods", "unstructured", "--reconstruct"], "structured pruning only"),
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
    assert main(_argv(digits_idx_dir, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not any(out.glob("sweep.*"))


def test_cli_passes_calibration_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    from secateur.cli import _sweep

    seen = {}
    monkeypatch.setattr(_sweep, "run_sweep", lambda config, console: seen.setdefault("c", config))
    assert main(["sweep", "--calibration-batches", "3", "--methods", "sparsegpt"]) == 0
    assert seen["c"].calibration_batches == 3 and seen["c"].common().calibration_batches == 3
