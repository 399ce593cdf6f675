"""Report rendering: Markdown tables carry the numbers, plots are real PNG files."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.bench import LatencyRow
from pipeline.report import (
    plot_importance_histogram,
    plot_kept_channels,
    plot_latency,
    render_markdown,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ROWS = [
    LatencyRow("torch", "cpu", "dense", 1, 2, 4.0, 4.5, 5.0),
    LatencyRow("torch", "cpu", "pruned", 1, 2, 2.0, 2.2, 2.5),
    LatencyRow("onnxruntime", "cpu", "dense", 1, 2, 3.0, 3.1, 3.3),
    LatencyRow("onnxruntime", "cpu", "pruned", 1, 2, 1.2, 1.3, 1.4),
    LatencyRow("torch", "cpu", "dense", 32, 2, 40.0, 41.0, 45.0),
    LatencyRow("torch", "cpu", "pruned", 32, 2, 20.0, 21.0, 23.0),
]

REPORT = {
    "dense": {"params": 1_234_567, "macs": 40_000_000, "accuracy": 0.9123},
    "pruned": {
        "params": 456_789,
        "macs": 10_000_000,
        "accuracy_before_finetune": 0.85,
        "accuracy": 0.9080,
        "channels_kept": 300,
        "channels_total": 1200,
    },
    "threshold": {"mode": "otsu", "value": 0.0123},
    "export": {"onnx_path": "runs/x/pruned.onnx", "max_abs_err": 3.1e-07, "opset": 17},
    "latency": [r.to_dict() for r in ROWS],
    "environment": {"torch": "2.14.1", "cpu": "Test CPU, 2 cores available", "cuda": None},
}


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG_MAGIC) and len(data) > 2000


def test_markdown_contains_the_numbers() -> None:
    text = render_markdown(REPORT)
    for expected in [
        "1,234,567",
        "456,789",
        "40,000,000",
        "10,000,000",
        "-63.0%",
        "-75.0%",
        "91.23%",
        "90.80%",
        "85.00%",
        "-0.43 pp",
        "| Channels kept | 1,200 | 300 / 1,200 (25.0%) |",
        "otsu = 0.0123",
        "3.1e-07",
        "opset 17",
        "runs/x/pruned.onnx",
        "Test CPU, 2 cores available",
    ]:
        assert expected in text, expected
    assert "| torch | cpu | pruned | 1 | 2 | 2.000 | 2.200 | 2.500 | 2.00× |" in text
    assert "| onnxruntime | cpu | pruned | 1 | 2 | 1.200 | 1.300 | 1.400 | 2.50× |" in text


def test_markdown_tolerates_missing_sections() -> None:
    text = render_markdown({"dense": {"params": 10}})
    assert "| Parameters | 10 | — | — |" in text
    assert "Latency" not in text and "Environment" not in text


def test_importance_histogram_png(tmp_path) -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([np.abs(rng.normal(0, 1e-3, 900)), rng.normal(1, 0.1, 300)])
    path = plot_importance_histogram(values, tmp_path / "hist.png", threshold=0.2)
    assert _is_png(path)


def test_importance_histogram_rejects_empty(tmp_path) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        plot_importance_histogram([], tmp_path / "hist.png")
    assert not (tmp_path / "hist.png").exists()


def test_kept_channels_png_with_sixty_layers(tmp_path) -> None:
    kept = {f"stage{i // 10}.block{i % 10}.conv": (i % 7 + 1, 16) for i in range(60)}
    path = plot_kept_channels(kept, tmp_path / "kept.png")
    assert _is_png(path)


def test_kept_channels_rejects_kept_above_total(tmp_path) -> None:
    with pytest.raises(ValueError, match="kept <= total"):
        plot_kept_channels({"conv": (5, 4)}, tmp_path / "kept.png")


def test_latency_png_from_rows_and_dicts(tmp_path) -> None:
    assert _is_png(plot_latency(ROWS, tmp_path / "lat.png"))
    assert _is_png(plot_latency(REPORT["latency"], tmp_path / "lat2.png"))
