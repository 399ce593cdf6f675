"""Report rendering: Markdown tables carry the numbers, plots are real PNG files."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.bench.timing import LatencyRow
from pipeline.run.plots import (
    importance_figure,
    plot_importance_histogram,
    plot_kept_channels,
    plot_latency,
)
from pipeline.run.report import render_markdown

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
    assert "| torch | cpu | pruned | fp32 | 1 | 2 | 2.000 | 2.200 | 2.500 | 2.00× |" in text
    assert "| onnxruntime | cpu | pruned | fp32 | 1 | 2 | 1.200 | 1.300 | 1.400 | 2.50× |" in text


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


def _polarised(zeros: int = 0) -> np.ndarray:
    """688 receded groups spread over decades, 688 kept near 0.5, and ``zeros`` exact zeros."""
    rng = np.random.default_rng(0)
    receded, kept = 10 ** rng.normal(-4.5, 0.6, 688), 10 ** rng.normal(-0.3, 0.15, 688)
    return np.concatenate([receded, kept, np.zeros(zeros)])


def _legend(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_importance_histogram_shows_the_valley_and_the_cut_on_a_log_axis() -> None:
    fig = importance_figure(_polarised(), threshold=0.02)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    # log bins: the receded mode spreads over many bars instead of one under the cut
    heights = [p.get_height() for p in ax.patches if p.get_height() > 0]
    assert len(heights) > 20 and max(heights) < 688 / 2
    valley, cut = _legend(fig)
    assert valley.startswith("valley: no group between") and "688 below, 688 above" in valley
    assert cut == "cut 0.02: 688 of 1376 groups below"
    labels = {t.get_text() for t in ax.texts}
    assert labels == {"valley", "cut"}
    (span,) = [p for p in ax.patches if p.get_label().startswith("valley")]
    left, right = span.get_x(), span.get_x() + span.get_width()
    assert (_polarised()[:688].max(), _polarised()[688:].min()) == pytest.approx((left, right))


def test_importance_histogram_counts_exact_zeros_and_says_when_there_is_no_valley() -> None:
    assert "300 exactly 0" in _legend(importance_figure(_polarised(zeros=300)))[0]
    one_mode = 1 / (1 + np.exp(-np.random.default_rng(0).normal(0, 3, 500)))
    (note,) = _legend(importance_figure(one_mode))
    assert note.startswith("no valley to cut in:")


def test_underflowed_importances_share_the_grey_bar_so_the_kept_mode_keeps_its_bars() -> None:
    underflow = np.concatenate([_polarised(zeros=10), np.full(40, 1e-30)])
    fig = importance_figure(underflow)
    assert fig.axes[0].get_xlim()[0] > 1e-10  # 8 decades under the largest, not 30
    grey = _legend(fig)[0]
    assert grey.startswith("50 below") and "10 of them exactly 0" in grey


def test_markdown_embeds_the_plots_it_is_given() -> None:
    plots = {"importance_hist": "importance_hist.png", "latency": "latency.png", "x": "x.png"}
    text = render_markdown(REPORT, plots)
    hist = text.index("](importance_hist.png)")
    assert text.index("## Before / after") < hist < text.index("## Latency")
    assert text.index("## Latency") < text.index("](latency.png)")
    assert "## Plots\n\n![x](x.png)" in text
    assert "kept_channels" not in text and "![" not in render_markdown(REPORT)


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
