"""Reports render measured figures and compute nothing but ratios of them."""

from __future__ import annotations

import dataclasses

from rich.console import Console

from secateur.measure import Accuracy, Latency, LayerSparsity, Metrics
from secateur.report import comparison_table, markdown_report

LAT = Latency(
    median_ms=2.0,
    p90_ms=2.5,
    runs=30,
    warmup=5,
    batch_size=1,
    threads=2,
    device="cpu",
    runtime="pytorch x eager",
)
BEFORE = Metrics(
    params=1000,
    nonzero_params=1000,
    macs=5000,
    nonzero_macs=5000,
    latency=LAT,
    disk_bytes=4096,
    accuracy=Accuracy(top1=0.9, samples=100, split="test"),
    layers=(LayerSparsity("fc1", 900, 900),),
)
AFTER = BEFORE.replace(
    nonzero_params=200,
    nonzero_macs=1250,
    accuracy=Accuracy(top1=0.895, samples=100, split="test"),
    layers=(LayerSparsity("fc1", 900, 100),),
    latency=dataclasses.replace(LAT, median_ms=1.0),
)


def test_markdown_report_shows_measured_figures_and_conditions() -> None:
    text = markdown_report(
        BEFORE, AFTER, title="t", setup=[("model", "m")], notes=["dense file note"]
    )
    assert "| non-zero parameters | 1,000 | 200 | 5.00× smaller |" in text
    assert "| top-1 accuracy | 90.00% | 89.50% | -0.50 pts |" in text
    assert "| weights file on disk | 4,096 B | 4,096 B | same |" in text
    assert "| latency, median | 2.000 ms | 1.000 ms | 2.00× smaller |" in text
    assert "batch 1, 2 threads, cpu, pytorch x eager, median of 30 runs after 5 warm-up" in text
    assert "| fc1 | 900 | 100 | 88.9% |" in text
    assert "- dense file note" in text and "| model | m |" in text


def test_unmeasured_figures_say_so() -> None:
    bare = BEFORE.replace(latency=None, disk_bytes=None, accuracy=None)
    text = markdown_report(bare, bare, title="t")
    assert "| latency, median | – | – | not measured |" in text
    assert "| top-1 accuracy | – | – | not measured |" in text


def test_terminal_table_renders_every_row() -> None:
    console = Console(width=120, record=True)
    console.print(comparison_table(BEFORE, AFTER))
    out = console.export_text()
    for label in (
        "top-1 accuracy",
        "non-zero parameters",
        "MACs (dense kernels)",
        "weights file on disk",
    ):
        assert label in out
    assert "5.00× smaller" in out
