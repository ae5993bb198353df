"""Knowledge distillation: the loss, feature matching with adapters, hooks, masks, embedding
distillation, and the ``secateur distill`` job end to end."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateur import UnstructuredConfig, create_model, load_model, prune_
from secateur.cli._main import main
from secateur.data import DataSplits, load_fashion_mnist
from secateur.errors import ConfigError
from secateur.pruning import MaskSet
from secateur.recipes import DistillJobConfig
from secateur.recovery import (
    DistillConfig,
    default_embed,
    distill,
    distill_embeddings,
    distillation_loss,
    schedule_factor,
)
from secateur.training import LRSchedule, TrainConfig, fit


@pytest.fixture
def digits(digits_idx_dir: Path) -> DataSplits:
    return load_fashion_mnist(digits_idx_dir, limit=600)


class TinyCNN(nn.Module):
    """conv(1→width) 'feat' at 28x28 → ReLU → 4x4 average pool → Linear head."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.feat = nn.Conv2d(1, width, 3, padding=1)
        self.pool = nn.AvgPool2d(4)
        self.head = nn.Linear(width * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(torch.relu(self.feat(x))), 1))


def _hooks(*models: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks)
        for model in models
        for m in model.modules()
    )


# --- the loss ----------------------------------------------------------------------------------


def test_kd_loss_equals_a_hand_computation() -> None:
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([1, 2])
    temperature, alpha = 2.0, 0.7
    kl_sum = 0.0
    ce_sum = 0.0
    for i in range(2):
        zs = [math.exp(v / temperature) for v in s[i].tolist()]
        zt = [math.exp(v / temperature) for v in t[i].tolist()]
        ps = [v / sum(zs) for v in zs]
        pt = [v / sum(zt) for v in zt]
        kl_sum += sum(p * math.log(p / q) for p, q in zip(pt, ps, strict=True))
        logits = s[i].tolist()
        ce_sum += -logits[y[i]] + math.log(sum(math.exp(v) for v in logits))
    want = alpha * temperature**2 * kl_sum / 2 + (1 - alpha) * ce_sum / 2
    got = distillation_loss(s, t, y, temperature=temperature, alpha=alpha)
    assert got.item() == pytest.approx(want, rel=1e-6)
    # identical distributions leave only the hard term
    same = distillation_loss(s, s, y, temperature=temperature, alpha=alpha)
    assert same.item() == pytest.approx((1 - alpha) * ce_sum / 2, rel=1e-6)


def test_alpha_zero_is_cross_entropy_and_trains_like_fit(digits: DataSplits) -> None:
    s, t, y = torch.randn(5, 10), torch.randn(5, 10), torch.randint(0, 10, (5,))
    assert torch.equal(
        distillation_loss(s, t, y, temperature=3.0, alpha=0.0), F.cross_entropy(s, y)
    )
    train = TrainConfig(epochs=1, batch_size=64, seed=4)
    teacher = create_model("lenet5")
    torch.manual_seed(0)
    plain = create_model("lenet_300_100")
    student = copy.deepcopy(plain)
    fit(plain, digits, train, progress=False)
    config = DistillConfig(alpha=0.0, temperature=3.0)
    history = distill(student, teacher, digits, train, config, progress=False)
    assert len(history) == 1
    for name, value in plain.state_dict().items():
        assert torch.equal(value, student.state_dict()[name]), name


def test_distill_beats_chance_and_leaves_the_teacher_unchanged(digits: DataSplits) -> None:
    torch.manual_seed(0)
    teacher = create_model("lenet_300_100")
    fit(teacher, digits, TrainConfig(epochs=3, batch_size=64), progress=False)
    teacher.train()  # distill must run it in eval mode and give its mode back
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = TinyCNN(4)
    train = TrainConfig(epochs=3, batch_size=64, lr=0.05)
    history = distill(student, teacher, digits, train, DistillConfig(), progress=False)
    assert teacher.training
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert history[-1].train_loss < history[0].train_loss
    assert history[-1].val_top1 > 0.5


# --- feature matching --------------------------------------------------------------------------


def _linear_fit_mse(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    """Residual MSE of the best affine map from student to teacher 'feat' channels."""
    with torch.no_grad():
        s = student.feat(x).movedim(1, -1).reshape(-1, student.feat.out_channels)
        t = teacher.feat(x).movedim(1, -1).reshape(-1, teacher.feat.out_channels)
    s1 = torch.cat([s, torch.ones(len(s), 1)], dim=1).double()
    gram = s1.T @ s1 + 1e-9 * torch.eye(s1.shape[1], dtype=torch.float64)
    solution = torch.linalg.solve(gram, s1.T @ t.double())  # normal equations of least squares
    return float(((s1 @ solution - t.double()) ** 2).mean())


def test_feature_matching_with_an_adapter_lowers_feature_mse(digits: DataSplits) -> None:
    torch.manual_seed(0)
    teacher = TinyCNN(12)
    fit(teacher, digits, TrainConfig(epochs=1, batch_size=64), progress=False)
    torch.manual_seed(1)
    start = TinyCNN(3)
    probe = digits.test.images[:64]
    train = TrainConfig(epochs=2, batch_size=64, lr=0.05)
    matched, plain = copy.deepcopy(start), copy.deepcopy(start)
    features = DistillConfig(features=(("feat", "feat"),), feature_weight=5.0)
    distill(matched, teacher, digits, train, features, progress=False)
    distill(plain, teacher, digits, train, DistillConfig(), progress=False)
    initial = _linear_fit_mse(start, teacher, probe)
    with_features = _linear_fit_mse(matched, teacher, probe)
    without = _linear_fit_mse(plain, teacher, probe)
    assert with_features < 0.5 * initial
    assert with_features < 0.5 * without
    assert _hooks(matched, teacher) == 0
    # the adapter was discarded: the student's parameters are its own
    assert sum(p.numel() for p in matched.parameters()) == sum(
        p.numel() for p in start.parameters()
    )


def test_linear_adapter_between_fully_connected_layers(digits: DataSplits) -> None:
    teacher = create_model("lenet5")  # fc2 is 84 wide
    student = create_model("lenet_300_100")  # fc2 is 100 wide
    config = DistillConfig(features=(("fc2", "fc2"), ("fc3", "fc3")))
    history = distill(
        student, teacher, digits, TrainConfig(epochs=1, batch_size=128), config, progress=False
    )
    assert math.isfinite(history[0].train_loss)
    assert _hooks(student, teacher) == 0


def test_missing_module_is_named(digits: DataSplits) -> None:
    teacher, student = TinyCNN(8), TinyCNN(4)
    for pair, named in ((("nope", "feat"), "student"), (("feat", "layer9"), "teacher")):
        with pytest.raises(
            ConfigError, match=f"{named} has no module named '{pair[named == 'teacher']}'"
        ):
            distill(
                student,
                teacher,
                digits,
                TrainConfig(epochs=1),
                DistillConfig(features=(pair,)),
                progress=False,
            )
        assert _hooks(student, teacher) == 0


def test_hooks_are_removed_on_error(digits: DataSplits) -> None:
    teacher, student = TinyCNN(8), TinyCNN(4)
    # spatial sizes differ (28x28 map against 7x7): refused before training, hooks gone
    bad = DistillConfig(features=(("feat", "pool"),))
    with pytest.raises(ConfigError, match="differ beyond the channel dim"):
        distill(student, teacher, digits, TrainConfig(epochs=1), bad, progress=False)
    assert _hooks(student, teacher) == 0

    calls = {"n": 0}

    def fail_on_third_call(module: nn.Module, args: tuple) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("teacher broke")

    handle = teacher.register_forward_pre_hook(fail_on_third_call)
    good = DistillConfig(features=(("feat", "feat"),))
    with pytest.raises(RuntimeError, match="teacher broke"):
        distill(
            student, teacher, digits, TrainConfig(epochs=1, batch_size=64), good, progress=False
        )
    handle.remove()
    assert calls["n"] == 3  # probe, first batch, second batch
    assert _hooks(student, teacher) == 0


def test_masks_stay_zero(digits: DataSplits) -> None:
    teacher = create_model("lenet5")
    student = create_model("lenet_300_100")
    masks = prune_(student, UnstructuredConfig(sparsity=0.8))
    zeros = {n: student.get_parameter(n) == 0 for n in masks.masks}
    config = DistillConfig(features=(("fc2", "fc2"),))
    distill(
        student,
        teacher,
        digits,
        TrainConfig(epochs=1, batch_size=64),
        config,
        masks,
        progress=False,
    )
    for name, was_zero in zeros.items():
        now_zero = student.get_parameter(name) == 0
        assert torch.equal(now_zero, was_zero), name
        assert int(was_zero.sum()) > 0


def test_distill_config_validates_and_round_trips() -> None:
    config = DistillConfig(temperature=2.0, alpha=0.3, features=[["a", "b"]], feature_weight=0.5)
    assert config.features == (("a", "b"),)
    assert DistillConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for kwargs, field in (
        ({"temperature": 0.0}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"feature_weight": -1.0}, "feature_weight"),
        ({"features": [["only-one"]]}, "features entry"),
        ({"features": "a,b"}, "features"),
    ):
        with pytest.raises(ConfigError, match=field):
            DistillConfig(**kwargs)


# --- embeddings --------------------------------------------------------------------------------


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))


def _mean_cosine(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cosine_similarity(student(x), teacher(x), dim=-1).mean())


@pytest.mark.parametrize("loss", ["cosine", "mse"])
def test_distill_embeddings_raises_cosine_similarity(loss: str) -> None:
    torch.manual_seed(0)
    teacher = _mlp()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.5 * torch.randn_like(p))
    batches = [(torch.randn(32, 16), None) for _ in range(4)]
    held_out = torch.randn(256, 16)
    before = _mean_cosine(student, teacher, held_out)
    losses = distill_embeddings(
        student, teacher, batches, steps=150, lr=1e-2, loss=loss, progress=False
    )
    after = _mean_cosine(student, teacher, held_out)
    assert len(losses) == 150
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    assert after > before + 0.3


def test_distill_embeddings_holds_masks_and_stops_on_time() -> None:
    torch.manual_seed(0)
    teacher = _mlp()
    student = copy.deepcopy(teacher)
    mask = torch.rand(32, 16) > 0.5
    masks = MaskSet(student, {"0.weight": mask})
    batches = [torch.randn(8, 16) for _ in range(3)]  # bare inputs, no targets
    student.eval()
    losses = distill_embeddings(
        student, teacher, batches, max_seconds=0.3, lr=1e-2, masks=masks, progress=False
    )
    assert len(losses) > 3  # cycled past the three batches
    assert torch.equal(student[0].weight == 0, ~mask)
    assert not student.training  # its mode is given back


@pytest.mark.parametrize("batches_type", [list, tuple])
def test_distill_embeddings_runs_the_teacher_once_per_batch_of_a_list(
    batches_type: type,
) -> None:
    torch.manual_seed(0)
    teacher = _mlp()
    calls: list[int] = []
    teacher.register_forward_hook(lambda module, args, out: calls.append(1))
    batches = batches_type(torch.randn(4, 16) for _ in range(3))
    losses = {}
    for cache in (True, False):
        calls.clear()
        torch.manual_seed(1)
        student = _mlp()
        losses[cache] = distill_embeddings(
            student, teacher, batches, steps=10, cache_teacher=cache, progress=False
        )
        assert len(calls) == (3 if cache else 10)
    assert losses[True] == losses[False]  # the same targets, only fewer teacher passes
    calls.clear()
    distill_embeddings(_mlp(), teacher, iter(batches), steps=2, progress=False)
    assert len(calls) == 2  # an iterator is read once, never cached (and not cycled here)


def test_distill_embeddings_rejects_bad_requests() -> None:
    teacher, student = _mlp(), _mlp()
    batch = [torch.randn(4, 16)]
    with pytest.raises(ConfigError, match="steps=N or max_seconds=S"):
        distill_embeddings(student, teacher, batch, progress=False)
    with pytest.raises(ConfigError, match="loss='kl' is not allowed"):
        distill_embeddings(student, teacher, batch, steps=1, loss="kl", progress=False)
    with pytest.raises(ConfigError, match="yielded no batch"):
        distill_embeddings(student, teacher, [], steps=1, progress=False)
    with pytest.raises(ConfigError, match="steps=0"):
        distill_embeddings(student, teacher, batch, steps=0, progress=False)
    with pytest.raises(ConfigError, match="lr_schedule='step' is not allowed"):
        distill_embeddings(student, teacher, batch, steps=1, lr_schedule="step", progress=False)


def test_schedule_factors_match_their_definition_and_torchs_one_cycle() -> None:
    assert schedule_factor(LRSchedule.CONSTANT, 0.7) == 1.0
    assert schedule_factor(LRSchedule.COSINE, 0.0) == 1.0
    assert schedule_factor(LRSchedule.COSINE, 0.5) == pytest.approx(0.5)
    assert schedule_factor(LRSchedule.COSINE, 1.0) == pytest.approx(0.0)
    assert schedule_factor(LRSchedule.COSINE, 1.5) == pytest.approx(0.0)  # clamped
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    total = 1001  # OneCycleLR ends its rise at step 0.3 * total - 1, not 0.3 * (total - 1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1.0, total_steps=total)
    for i in range(total):
        want = optimizer.param_groups[0]["lr"]
        assert schedule_factor(LRSchedule.ONE_CYCLE, i / (total - 1)) == pytest.approx(
            want, abs=5e-3
        ), i
        optimizer.step()
        if i < total - 1:
            scheduler.step()


@pytest.fixture
def lrs(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The learning rate of every AdamW step taken during the test, in order."""
    seen: list[float] = []
    step = torch.optim.AdamW.step

    def spy(self: torch.optim.AdamW, *args: object, **kwargs: object) -> object:
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    return seen


@pytest.mark.parametrize(
    ("schedule", "train_mode", "want_lrs"),
    [
        ("cosine", False, [0.1 * schedule_factor(LRSchedule.COSINE, i / 4) for i in range(4)]),
        ("constant", True, [0.1] * 4),
    ],
)
def test_distill_embeddings_follows_the_schedule_and_mode(
    lrs: list[float], schedule: str, train_mode: bool, want_lrs: list[float]
) -> None:
    teacher, student = _mlp(), _mlp()
    student.train()
    modes: list[bool] = []
    student[0].register_forward_hook(lambda module, args, out: modes.append(module.training))
    distill_embeddings(
        student,
        teacher,
        [torch.randn(4, 16)],
        steps=4,
        lr=0.1,
        lr_schedule=schedule,
        train_mode=train_mode,
        progress=False,
    )
    assert lrs == pytest.approx(want_lrs)
    assert modes == [train_mode] * 4
    assert student.training  # given back


def test_distill_embeddings_anneals_over_a_wall_clock_budget(
    monkeypatch: pytest.MonkeyPatch, lrs: list[float]
) -> None:
    clock = iter(range(100))  # every perf_counter call advances one "second"
    monkeypatch.setattr("secateur.recovery._distill.time.perf_counter", lambda: next(clock))
    distill_embeddings(_mlp(), _mlp(), [torch.randn(4, 16)], max_seconds=10, lr=1.0, progress=False)
    assert 3 <= len(lrs) <= 10
    assert lrs[0] < 1.0  # time had passed before the first step
    assert lrs == sorted(lrs, reverse=True)
    assert lrs[-1] < 0.2


def test_default_embed_mean_pools_over_the_attention_mask() -> None:
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)

    class Encoder(nn.Module):
        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(last_hidden_state=hidden)

    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    got = default_embed(Encoder(), {"input_ids": torch.zeros(2, 3), "attention_mask": mask})
    want = torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)])
    assert torch.equal(got, want)
    assert torch.equal(default_embed(nn.Identity(), torch.ones(3, 4)), torch.ones(3, 4))


def test_distill_embeddings_on_a_tiny_bert() -> None:
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    options = dict(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    teacher = create_model("hf.bert", **options)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.encoder.parameters():
            p.add_(0.3 * torch.randn_like(p))
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[:2, 5:] = 0
    batches = [
        {"input_ids": torch.randint(0, 50, (4, 8)), "attention_mask": mask} for _ in range(3)
    ]

    def cosine() -> float:
        with torch.no_grad():
            return float(
                sum(
                    F.cosine_similarity(default_embed(student, b), default_embed(teacher, b)).mean()
                    for b in batches
                )
                / len(batches)
            )

    before = cosine()
    losses = distill_embeddings(student, teacher, batches, steps=30, lr=3e-3, progress=False)
    assert len(losses) == 30
    assert cosine() > before


# --- the job -----------------------------------------------------------------------------------


def _distill_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "distill", "--teacher", "lenet5", "--student", "lenet_300_100", "--data", str(data),
        "--out", str(out), "--epochs", "1", "--teacher-epochs", "1", "--limit", "400",
        "--latency-runs", "20", "--no-progress", *extra,
    ]  # fmt: skip


def test_cli_distill_end_to_end_then_reuses_the_teacher(
    tmp_path: Path, digits_idx_dir: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = _distill_argv(digits_idx_dir, out, "--feature", "fc2=fc2", "--alpha", "0.7")
    assert main(argv) == 0
    first = capsys.readouterr()
    assert first.err == ""
    assert "trained here for 1 epochs" in " ".join(first.out.split())
    assert sorted(p.name for p in out.iterdir()) == [
        "report.md", "student.json", "student.safetensors", "teacher.json", "teacher.safetensors",
    ]  # fmt: skip
    student = load_model(out / "student.safetensors")
    teacher = load_model(out / "teacher.safetensors")
    assert student.model.secateur_spec["name"] == "lenet_300_100"
    assert teacher.model.secateur_spec["name"] == "lenet5"
    s_metrics, t_metrics = student.metadata["metrics"], teacher.metadata["metrics"]
    assert s_metrics["params"] == sum(p.numel() for p in student.model.parameters()) == 266_610
    assert t_metrics["params"] == 61_706
    assert s_metrics["disk_bytes"] == (out / "student.safetensors").stat().st_size
    assert s_metrics["latency"]["runs"] == t_metrics["latency"]["runs"] == 20
    assert s_metrics["accuracy"]["samples"] == 297
    assert student.metadata["distillation"] == {
        "temperature": 4.0, "alpha": 0.7, "features": [["fc2", "fc2"]], "feature_weight": 1.0,
    }  # fmt: skip
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "secateur distill: lenet5 → lenet_300_100" in report
    assert "| parameters | 61,706 | 266,610 |" in report
    assert f"{s_metrics['accuracy']['top1']:.2%}" in report
    assert len(list(cache_dir.glob("baseline-lenet5-*.safetensors"))) == 1

    # the same teacher settings from a YAML recipe: the teacher comes from the cache
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("distill:\n  temperature: 2.0\n  alpha: 0.5\n", encoding="utf-8")
    assert main(_distill_argv(digits_idx_dir, out, "--recipe", str(recipe))) == 0
    second = capsys.readouterr()
    assert "reused from cache" in " ".join(second.out.split())
    meta = load_model(out / "student.safetensors").metadata
    assert meta["distillation"]["temperature"] == 2.0
    assert meta["distillation"]["alpha"] == 0.5


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--teacher", "nope"), "unknown teacher model 'nope'"),
        (("--student", "resnet9"), "unknown student model 'resnet9'"),
        (("--alpha", "2"), "alpha=2.0 is out of range"),
        (("--feature", "fc2"), "must be STUDENT=TEACHER"),
        (("--feature", "fc9=fc2"), "student has no module named 'fc9'"),
    ],
)
def test_cli_distill_bad_input_exits_2_with_one_line(
    tmp_path: Path,
    digits_idx_dir: Path,
    cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...],
    message: str,
) -> None:
    out = tmp_path / "out"
    assert main(_distill_argv(digits_idx_dir, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("secateur: error: ")
    assert message in err
    assert "Traceback" not in err
    assert not cache_dir.exists()  # failed before any teacher was trained


def test_job_config_round_trips_and_maps_to_its_parts() -> None:
    config = DistillJobConfig(
        teacher="vgg11_bn", student="vgg11_bn", student_width_mult=0.25,
        features=[["features", "features"]], teacher_epochs=3, teacher_lr=0.1, epochs=2,
    )  # fmt: skip
    assert DistillJobConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.distillation().features == (("features", "features"),)
    baseline = config.teacher_baseline()
    assert (baseline.model, baseline.epochs, baseline.lr) == ("vgg11_bn", 3, 0.1)
    assert config.student_training().epochs == 2
    for field in ("epochs", "teacher_epochs"):
        with pytest.raises(ConfigError, match=f"^{field}=0"):
            DistillJobConfig(**{field: 0})
    with pytest.raises(ConfigError, match="^teacher_lr=-1"):
        DistillJobConfig(teacher_lr=-1.0)
    with pytest.raises(ConfigError, match="unknown DistillJobConfig field"):
        DistillJobConfig.from_dict({"sparsity": 0.5})
