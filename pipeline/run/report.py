"""Render a run's results as Markdown tables (its plots: ``pipeline.run.plots``).

The report is a plain mapping (see :func:`render_markdown` for its schema; a run builds it with
``pipeline.run.run_report.RunReport.to_dict``), so it can be loaded back from ``report.json`` and
re-rendered.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.bench.timing import LatencyRow, latency_markdown
from pipeline.run.latency_report import latency_budget_markdown

logger = logging.getLogger(__name__)

MISSING = "—"
REFERENCE_MODEL = "dense"


def _count(value: Any) -> str:
    return MISSING if value is None else f"{int(value):,}"


def _percent(value: Any) -> str:
    """Accuracy as a percentage; values above 1 are taken to be percentages already."""
    if value is None:
        return MISSING
    value = float(value)
    return f"{value * 100 if value <= 1 else value:.2f}%"


def _relative_change(before: Any, after: Any) -> str:
    if before in (None, 0) or after is None:
        return MISSING
    return f"{(after - before) / before * 100:+.1f}%"


def _point_change(before: Any, after: Any) -> str:
    if before is None or after is None:
        return MISSING
    scale = 100 if max(float(before), float(after)) <= 1 else 1
    return f"{(float(after) - float(before)) * scale:+.2f} pp"


def _channels(pruned: Mapping[str, Any]) -> str:
    kept, total = pruned.get("channels_kept"), pruned.get("channels_total")
    if kept is None or not total:
        return MISSING
    return f"{kept:,} / {total:,} ({kept / total:.1%})"


def _summary_rows(report: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    dense, pruned = report.get("dense") or {}, report.get("pruned") or {}
    threshold, export = report.get("threshold") or {}, report.get("export") or {}
    acc, acc_ft = dense.get("accuracy"), pruned.get("accuracy")
    acc_before = pruned.get("accuracy_before_finetune")
    value, err = threshold.get("value"), export.get("max_abs_err")
    opset = f" (opset {export['opset']})" if export.get("opset") is not None else ""
    return [
        (
            "Parameters",
            _count(dense.get("params")),
            _count(pruned.get("params")),
            _relative_change(dense.get("params"), pruned.get("params")),
        ),
        (
            "MACs",
            _count(dense.get("macs")),
            _count(pruned.get("macs")),
            _relative_change(dense.get("macs"), pruned.get("macs")),
        ),
        ("Accuracy", _percent(acc), _percent(acc_ft), _point_change(acc, acc_ft)),
        (
            "Accuracy before fine-tune",
            MISSING,
            _percent(acc_before),
            _point_change(acc, acc_before),
        ),
        (
            "… after BN recalibration (no gradient steps)",
            MISSING,
            _percent(pruned.get("accuracy_recalibrated")),
            _point_change(acc, pruned.get("accuracy_recalibrated")),
        ),
        ("Channels kept", _count(pruned.get("channels_total")), _channels(pruned), MISSING),
        (
            "Threshold",
            MISSING,
            MISSING if value is None else f"{threshold.get('mode', '?')} = {value:.4g}",
            MISSING,
        ),
        (f"ONNX max abs err{opset}", MISSING, MISSING if err is None else f"{err:.3g}", MISSING),
    ]


def _budget_line(budget: Mapping[str, Any]) -> str:
    """The budget's outcome (target vs achieved, the fix when missed) and what its shares count."""
    line = f"**Training budget:** {budget['outcome']}"
    if budget.get("target") is None:
        return line
    unit = {"macs": "MACs", "latency": "predicted latency"}.get(
        budget.get("cost"), "prunable channel groups"
    )
    reachable = budget.get("reachable")
    floors = "" if reachable is None else f"; the layer floors let at most {reachable:.3f} recede"
    return f"{line}. Shares count the {unit}{floors}."


def _removal_line(groups: Mapping[str, Any]) -> str:
    """How the dropped groups were removed: exactly, approximately (with the error), kept back."""
    line = f"**Removal:** {groups.get('absorbed_exactly', 0)} groups removed exactly"
    approximate = groups.get("approximate", 0)
    if approximate:
        err = groups.get("approximate_rel_err", 0.0)
        line += (
            f", {approximate} approximately (prune.allow_approximate: their gated shifts "
            f"zeroed, output changed by {err:.2e} of its scale)"
        )
    held = groups.get("held_back", 0)
    if held:
        line += (
            f"; {held} selected groups kept, as only an approximation removes them "
            "(prune.allow_approximate)"
        )
    return line + "."


def _table(header: Sequence[str], align: str, rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def as_row(row: LatencyRow | Mapping[str, Any]) -> LatencyRow:
    """A latency row from ``report.json`` (a mapping) or as measured."""
    return row if isinstance(row, LatencyRow) else LatencyRow.from_mapping(row)


def _latency_section(
    raw_rows: Sequence[LatencyRow | Mapping[str, Any]], macs: Mapping[str, Any]
) -> str:
    return "## Latency\n\n" + latency_markdown([as_row(r) for r in raw_rows], macs=macs)


def _verification_section(checks: list[Mapping[str, Any]]) -> str:
    """Every check (``pipeline.core.checks.Check`` dicts): error, bound, what a wrong input would
    move, the ratio, the verdict, and the cause where it is not ``ok``."""
    rows = [
        (
            f"{c['what']}" + (f" (`{c['path']}`)" if c.get("path") else ""),
            c["precision"],
            f"{c['max_abs_err']:.2e}",
            f"{c['bound']:.2e}",
            f"{c['input_effect']:.2e}",
            f"{c['sensitivity']:.3g}x",
            f"**{c['verdict']}**" + (f": {c['cause']}" if c.get("cause") else ""),
        )
        for c in checks
    ]
    header = ["Check", "Precision", "Max abs err", "Bound", "Wrong-input effect", "Effect/bound",
              "Verdict"]  # fmt: skip
    note = (
        "A check catches any error above its bound; the wrong-input effect is how far the "
        "reference output moves when a sample's input is swapped for another's, so a check is "
        "only evidence when that effect is well above the bound (`insensitive` otherwise)."
    )
    return "## Verification\n\n" + note + "\n\n" + _table(header, ["---"] * len(header), rows)


def _int8_row(label: str, record: Mapping[str, Any]) -> tuple[str, ...]:
    check = record["check"]
    kept = record.get("excluded_nodes") or []
    return (
        f"{label} (`{record['path']}`)",
        f"{record['fp32_accuracy']:.2f}%",
        f"{record['accuracy']:.2f}%",
        f"{check['drop']:+.2f}",
        f"{record['agreement']:.2f}%",
        f"{record['max_logit_error']:.3g}",
        f"{check['wrong']['drop']:.2f} ({check['sensitivity']:.3g}x)",
        ", ".join(f"`{n}`" for n in kept) or "none",
        f"**{check['verdict']}**" + (f": {check['cause']}" if check.get("cause") else ""),
    )


def _int8_section(int8: Mapping[str, Any]) -> str:
    """The INT8 graphs: accuracy against fp32 on held-out samples, agreement, what a wrong
    INT8 model loses there, the nodes kept in float, the verdict; then how it was calibrated."""
    header = ["INT8 graph", "fp32 acc.", "INT8 acc.", "Drop (pp)", "Top-1 agreement",
              "Max logit err", "Wrong model's drop (÷ bound)", "Kept in float", "Verdict"]  # fmt: skip
    rows = [_int8_row("pruned", int8), _int8_row("dense", int8["dense"])]
    cal = int8["calibration"]
    check = int8["check"]
    lines = [
        f"Held-out: {check['measured']['samples']} samples of the {cal.get('heldout_split', 'given')} "
        f"data ({'labels' if cal.get('labelled') else 'agreement with fp32: no labels'}), never "
        f"the calibration ones; bound {check['max_drop']:g} points. The wrong model is "
        f"{check['wrong_model']}.",
        f"Calibration: {cal['calibration_samples']} samples ({cal['method']}), "
        f"{cal['format']}, weights {cal['weights']}, activations {cal['activations']}, "
        f"reduce_range {cal['reduce_range']} (CPU {cal['cpu']['machine']}, VNNI-class flags: "
        f"{', '.join(cal['cpu']['flags']) or 'none'}).",
    ]
    cost = (int8.get("fallback") or {}).get("latency")
    if cost:
        lines.append(
            "Layers kept in float cost "
            + ", ".join(
                f"{float(v['slowdown']):.2f}x at batch {b}"
                for b, v in cost.items()
                if isinstance(v, dict) and v.get("slowdown")
            )  # fmt: skip
            + " against the all-INT8 graph (ONNX Runtime CPU, one thread)."
        )
    return "## INT8\n\n" + _table(header, ["---"] * len(header), rows) + "\n\n" + "\n\n".join(lines)


PLOT_CAPTIONS = {
    "importance_hist": "Channel-group importance before pruning, with the valley and the cut",
    "kept_channels": "Channels kept per layer",
    "latency": "Latency, dense and pruned, fp32 and INT8",
}


def _figure(name: str, link: str) -> str:
    """A Markdown image; ``link`` is relative to the report, so the folder can move."""
    return f"![{PLOT_CAPTIONS.get(name, name)}]({link})"


def render_markdown(report: Mapping[str, Any], plots: Mapping[str, str] | None = None) -> str:
    """Render a run report as Markdown: before/after, latency and environment sections.

    ``plots`` (plot name, as :func:`plot_run` names them, to a path relative to the report)
    embeds each plot it holds where it belongs: the importance histogram and kept channels
    under the before/after table, the latency plot under the latency table. Only the plots
    given are linked, so a report never shows a broken image.

    Schema (every section optional): ``dense: {params, macs, accuracy}``, ``pruned: {params,
    macs, accuracy_before_finetune, accuracy, channels_kept, channels_total}``, ``threshold:
    {mode, value}``, ``export: {onnx_path, max_abs_err, opset}``, ``latency: [LatencyRow
    dicts]``, ``environment: {name: value}``. Accuracies are fractions in [0, 1] (values above 1
    are read as percentages). Missing values render as "—".

    Args:
        report: The report mapping.
        plots: Plot name to image path relative to the report; None for no plots.

    Returns:
        The Markdown text, ending with a newline.
    """
    summary = _table(
        ["", "Dense", "Pruned", "Change"], ["---", "---:", "---:", "---:"], _summary_rows(report)
    )
    sections = ["# recede report", "## Before / after\n\n" + summary]
    if report.get("groups"):
        sections[-1] += "\n\n" + _removal_line(report["groups"])
    budget = report.get("budget") or {}
    if budget.get("outcome"):
        sections.insert(1, _budget_line(budget))
    if budget.get("latency"):
        sections.insert(2, latency_budget_markdown(budget["latency"]))
    if report.get("speed"):
        sections.insert(1, f"**Speed:** {report['speed']}.")
    plots = dict(plots or {})
    onnx_path = (report.get("export") or {}).get("onnx_path")
    if onnx_path:
        sections[-1] += f"\n\nONNX file: `{onnx_path}`"
    for name in ("importance_hist", "kept_channels"):
        if name in plots:
            sections[-1] += "\n\n" + _figure(name, plots.pop(name))
    if (report.get("export") or {}).get("checks"):
        sections.append(_verification_section(report["export"]["checks"]))
    if report.get("int8"):
        sections.append(_int8_section(report["int8"]))
    if report.get("latency"):
        macs = {k: (report.get(k) or {}).get("macs") for k in (REFERENCE_MODEL, "pruned")}
        sections.append(_latency_section(report["latency"], macs))
        if "latency" in plots:
            sections[-1] += "\n\n" + _figure("latency", plots.pop("latency"))
    if plots:
        sections.append("## Plots\n\n" + "\n\n".join(_figure(n, p) for n, p in plots.items()))
    if report.get("environment"):
        items = "\n".join(f"- **{k}**: {v}" for k, v in report["environment"].items())
        sections.append("## Environment\n\n" + items)
    return "\n\n".join(sections) + "\n"
