"""The ``encoder`` job (a local transformers encoder, pruned one-shot, distilled back), its text
helpers and the embedding fidelity measure, on a tiny random BERT with a hand-written vocab."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from secateur import load_model
from secateur.cli._main import main
from secateur.data import read_sentences, tokenize_batches
from secateur.errors import ConfigError, DatasetError
from secateur.measure import OnnxRunner, embed_batches, embedding_fidelity
from secateur.recipes import EncoderConfig, run_encoder
from secateur.zoo import from_transformers

transformers = pytest.importorskip("transformers")

WORDS = [
    "the",
    "a",
    "model",
    "layer",
    "weight",
    "prune",
    "small",
    "fast",
    "sparse",
    "dense",
    "tensor",
    "graph",
    "cat",
    "dog",
    "runs",
    "sees",
    "quickly",
    "slowly",
    "big",
    "red",
    "blue",
    "green",
    "network",
    "file",
    "disk",
    "speed",
    "measure",
    "report",
    "text",
]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    try:  # transformers 5 takes the vocabulary itself
        tokenizer = transformers.BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})
    except TypeError:  # transformers 4 reads it from a file
        (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
        tokenizer = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    assert tokenizer("cat dog")["input_ids"][1:3] == [tokens.index("cat"), tokens.index("dog")]
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.5,  # large weights: the layers, hence their pruning, matter
    )
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    lines = [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(160)]
    path = tmp_path_factory.mktemp("text") / "sentences.txt"
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    return path


def _argv(model: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return [
        "encoder", str(model), "--text", str(text), "--out", str(out), "--eval-sentences", "32",
        "--calibration", "16", "--max-length", "32", "--latency-runs", "20", "--threads", "1",
        "--no-progress", *extra,
    ]  # fmt: skip


def test_cli_prunes_distills_saves_and_reports(
    encoder_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    argv = _argv(encoder_dir, text_file, out, "--distill-steps", "30", "--lr", "3e-3")
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity_of_pruned_layers"] == pytest.approx(0.5)
    assert report["distill_steps"] == 30
    assert report["fidelity"] > report["fidelity_one_shot"]
    assert 0.0 < report["fidelity_one_shot"] < 1.0
    pruned = report["pruned"]
    assert pruned["params"] == report["original"]["params"]
    assert pruned["nonzero_params"] < report["original"]["nonzero_params"]
    # The compressed file is the pruned model's artifact: smaller, and lossless by default.
    assert pruned["disk_bytes"] == (out / "model.secz").stat().st_size
    assert pruned["disk_bytes"] < 0.8 * report["original"]["disk_bytes"]
    assert report["pretrained_folder_bytes"] == (out / "model" / "model.safetensors").stat().st_size
    assert report["fidelity_of_file"] == pytest.approx(report["fidelity"], abs=1e-6)
    assert pruned["latency"]["runs"] == 20
    for measured in (pruned, report["original"]):  # ONNX Runtime timed in the same loop
        assert measured["onnx_latency"]["runtime"].startswith("onnxruntime")
        assert measured["onnx_latency"]["runs"] == 20
    assert "Fidelity" in (out / "report.md").read_text()
    assert "ONNX Runtime" in (out / "report.md").read_text()

    # The saved folder reloads offline, holds the pruned weights and gives the same embeddings.
    reloaded = transformers.AutoModel.from_pretrained(out / "model", local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "model", local_files_only=True)
    linears = [
        m for n, m in reloaded.named_modules() if isinstance(m, nn.Linear) and "pooler" not in n
    ]
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    assert zeros == sum(m.weight.numel() for m in linears) // 2
    original = transformers.AutoModel.from_pretrained(encoder_dir, local_files_only=True)
    sentences = read_sentences(text_file)
    random.Random(0).shuffle(sentences)  # the job's split with its default seed
    held_out = sentences[:32]
    batches = tokenize_batches(tokenizer, held_out, 64, max_length=32)
    fidelity = embedding_fidelity(reloaded, embed_batches(original, batches), batches)
    assert fidelity == pytest.approx(report["fidelity"], abs=1e-5)
    assert not list(out.glob(".model*"))  # no temp folder left behind
    for path in (out / "model", out / "model" / "model.safetensors"):  # readable as a report is
        assert path.stat().st_mode & 0o044 == (out / "report.md").stat().st_mode & 0o044


def test_python_api_prunes_to_two_of_four_with_wanda(
    encoder_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    config = EncoderConfig(
        model=str(encoder_dir),
        text=str(text_file),
        method="wanda",
        nm="2:4",
        eval_sentences=32,
        calibration=8,
        out=str(tmp_path / "out"),
        file_values="int8",
        latency_runs=20,
        progress=False,
    )
    result = run_encoder(config)
    assert result.distill_steps == 0 and result.fidelity == result.fidelity_one_shot
    assert result.fidelity_of_file == pytest.approx(result.fidelity, abs=0.02)  # int8 values
    assert result.fidelity_of_file != result.fidelity
    assert result.pruned.disk_bytes == result.compressed_path.stat().st_size
    reloaded = transformers.AutoModel.from_pretrained(result.model_path, local_files_only=True)
    weight = reloaded.encoder.layer[0].intermediate.dense.weight
    assert torch.all((weight.reshape(-1, 4) != 0).sum(-1) <= 2)
    assert EncoderConfig.from_dict(config.to_dict()) == config


def test_cli_structured_removes_heads_and_neurons_and_reloads(
    encoder_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    argv = _argv(encoder_dir, text_file, out, "--method", "structured", "--distill-steps", "20")
    assert main([*argv, "--lr", "3e-3", "--onnx"]) == 0
    report = json.loads((out / "report.json").read_text())
    original, pruned = report["original"], report["pruned"]
    # 2 layers: 2 heads -> 1 and 64 FFN neurons -> 32 each; the hidden size (32) stays.
    assert sorted(map(tuple, report["widths"])) == [(2, 1), (2, 1), (64, 32), (64, 32)]
    assert report["removed_units"] == 66 and report["refused"] == []
    assert pruned["params"] < original["params"] and pruned["macs"] < original["macs"]
    assert 0.0 < report["fidelity_one_shot"] < report["fidelity"] <= 1.0
    assert report["weights_file_bytes"] == (out / "model.safetensors").stat().st_size
    assert report["fidelity_of_file"] == pytest.approx(report["fidelity"], abs=1e-6)
    assert "physically removed" in (out / "report.md").read_text()

    # secateur's checkpoint reloads at its pruned widths; the tokenizer sits beside it.
    model = load_model(out / "model.safetensors").model
    assert sum(p.numel() for p in model.parameters()) == pruned["params"]
    assert model.encoder.layer[0].intermediate.dense.out_features == 32
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "tokenizer", local_files_only=True)
    sentences = read_sentences(text_file)
    random.Random(0).shuffle(sentences)
    batches = tokenize_batches(tokenizer, sentences[:32], 64, max_length=32)
    original_model = transformers.AutoModel.from_pretrained(encoder_dir, local_files_only=True)
    fidelity = embedding_fidelity(model, embed_batches(original_model, batches), batches)
    assert fidelity == pytest.approx(report["fidelity"], abs=1e-5)
    assert not (out / "model").exists() and not list(out.glob(".tokenizer*"))

    # model.onnx: the pruned model at its widths, any batch and length, faithful in ONNX Runtime
    assert report["onnx_file_bytes"] == (out / "model.onnx").stat().st_size
    assert report["fidelity_onnx"] == pytest.approx(report["fidelity"], abs=1e-4)
    runner = OnnxRunner(out / "model.onnx")
    assert runner.input_names == ("input_ids", "attention_mask")
    first = batches[0]
    with torch.no_grad():
        expected = model(input_ids=first["input_ids"], attention_mask=first["attention_mask"])
    got = runner(input_ids=first["input_ids"], attention_mask=first["attention_mask"])[0]
    torch.testing.assert_close(got, expected.last_hidden_state, rtol=1e-3, atol=1e-4)
    assert "model.onnx" in (out / "report.md").read_text()


def test_structured_reconstruction_raises_one_shot_fidelity(
    encoder_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    fidelity = {}
    for reconstruct in (False, True):
        config = EncoderConfig(
            model=str(encoder_dir),
            text=str(text_file),
            method="structured",
            kinds="channel",
            reconstruct=reconstruct,
            eval_sentences=32,
            calibration=64,
            out=str(tmp_path / f"out-{reconstruct}"),
            latency_runs=20,
            progress=False,
        )
        fidelity[reconstruct] = run_encoder(config).fidelity_one_shot
        assert EncoderConfig.from_dict(config.to_dict()) == config
    assert fidelity[True] > fidelity[False] + 0.01


def test_cli_reads_a_recipe_and_flags_win(
    encoder_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("encoder:\n  method: magnitude\n  sparsity: 0.3\n  seed: 4\n")
    out = tmp_path / "out"
    assert main(_argv(encoder_dir, text_file, out, "--recipe", str(recipe), "--seed", "5")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["method"] == "magnitude" and report["config"]["seed"] == 5
    assert report["sparsity_of_pruned_layers"] == pytest.approx(0.3, abs=1e-3)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--dense-targets", "--method", "wanda"), "dense_targets applies to method=sparsegpt"),
        (("--eval-sentences", "500"), "distinct sentences, but eval_sentences=500"),
        (("--sparsity", "1.5"), "sparsity=1.5"),
        (("--distill-steps", "0"), "distill_steps=0"),
        (("--ratio", "0.3"), "ratio applies to method=structured only"),
        (("--method", "structured", "--sparsity", "0.3"), "sparsity applies to the other"),
        (("--method", "structured", "--criterion", "taylor"), "needs a loss"),
        (("--method", "structured", "--kinds", "head,hidden"), "may not include hidden"),
        (("--method", "structured", "--kinds", "heads"), "kinds=['heads'] is not valid"),
        (("--method", "structured", "--ratio", "1"), "ratio=1"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(
    encoder_dir: Path,
    text_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...],
    message: str,
) -> None:
    out = tmp_path / "out"
    assert main(_argv(encoder_dir, text_file, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("secateur: error: ")
    assert message in err
    assert not (out / "model").exists()


def test_cli_bad_paths_exit_2_with_one_line(
    encoder_dir: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    cases = [
        (_argv(tmp_path, text_file, out), "holds no config.json"),
        (_argv(encoder_dir, tmp_path / "none.txt", out), "cannot read text file"),
        (["encoder", "--text", str(text_file)], "no model folder given"),
        (["encoder", str(encoder_dir)], "no text given"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (out / "model").exists()


def test_read_sentences_skips_blanks_and_repeats(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text(" one two \n\nthree\none two\n  \nfour\n", encoding="utf-8")
    assert read_sentences(path) == ["one two", "three", "four"]
    path.write_text("\n \n", encoding="utf-8")
    with pytest.raises(DatasetError, match="has no sentence"):
        read_sentences(path)
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DatasetError, match="not UTF-8"):
        read_sentences(path)


def test_tokenize_batches_by_length_keeps_every_text_and_pads_less(
    encoder_dir: Path, text_file: Path
) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(encoder_dir, local_files_only=True)
    texts = read_sentences(text_file)
    plain = tokenize_batches(tokenizer, texts, 16, max_length=32)
    grouped = tokenize_batches(tokenizer, texts, 16, max_length=32, by_length=True, seed=1)

    def decoded(batches: list[dict]) -> list[str]:
        return [
            tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            for b in batches
            for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True)
        ]

    assert sorted(decoded(grouped)) == sorted(decoded(plain)) == sorted(texts)
    assert decoded(plain) == texts  # text order kept
    padding = [sum(int((b["attention_mask"] == 0).sum()) for b in x) for x in (plain, grouped)]
    assert padding[1] < padding[0] / 2


def test_embedding_fidelity_is_one_for_the_same_model_and_checks_shapes() -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    batches = [torch.randn(5, 8), torch.randn(3, 8)]
    reference = embed_batches(model, batches)
    assert reference.shape == (8, 4)
    assert torch.allclose(reference.norm(dim=-1), torch.ones(8))
    assert embedding_fidelity(model, reference, batches) == pytest.approx(1.0)
    with torch.no_grad():
        model.weight.neg_()
        model.bias.neg_()
    assert embedding_fidelity(model, reference, batches) == pytest.approx(-1.0)
    with pytest.raises(ConfigError, match="compute both from the same batches"):
        embedding_fidelity(model, reference[:4], batches)


def test_from_transformers_rebuilds_the_same_model_with_a_spec(encoder_dir: Path) -> None:
    original = transformers.AutoModel.from_pretrained(encoder_dir, local_files_only=True).eval()
    twin = from_transformers(original)
    assert twin.secateur_spec["name"] == "hf.bert"
    assert twin.secateur_spec["kwargs"]["hidden_size"] == 32
    ids = torch.randint(5, len(WORDS) + 5, (2, 7))
    with torch.no_grad():
        assert torch.equal(twin(ids).last_hidden_state, original(ids).last_hidden_state)
    with pytest.raises(ConfigError, match="has no transformers config"):
        from_transformers(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="pass task= naming the model's head"):
        from_transformers(original, task="masked-lm")


def test_onnx_without_onnxruntime_fails_before_any_work(
    encoder_dir: Path,
    text_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxruntime" else real(name, *a),
    )
    out = tmp_path / "out"
    assert main(_argv(encoder_dir, text_file, out, "--onnx")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs onnxruntime" in err
    assert not out.exists() or not any(out.iterdir())
