"""Per-layer cost tables: output channels, parameters and MACs of every conv/linear layer,
before and after a prune, with the whole model's totals and a one-line summary.

Counts come from ``pipeline.graph.costs.count_params`` and ``pipeline.graph.costs.count_layer_macs`` (the
same counter as ``count_macs``), so a table's totals equal the numbers in ``report.json``. Rows
are the channel graph's conv and linear layers; BN, activation and pooling costs appear only in
the totals (their parameters and, for MACs, nothing: see ``count_macs``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from pipeline.graph.channel_graph import ChannelGraph
from pipeline.prune.plan import PrunePlan, layer_widths


@dataclass(frozen=True)
class Costs:
    """Parameters and per-sample MACs of a layer or a whole model."""

    params: int
    macs: int


@dataclass(frozen=True)
class LayerRow:
    """One conv/linear layer: kept and total output channels, costs before and after."""

    name: str
    kind: str
    channels: tuple[int, int]
    before: Costs
    after: Costs


@dataclass(frozen=True)
class LayerTable:
    """Every conv/linear layer of a model and the model's totals, before and after a prune.

    ``compared`` is False for a model alone (``recede inspect``): ``after`` equals ``before``.
    """

    rows: tuple[LayerRow, ...]
    before: Costs
    after: Costs
    compared: bool = True

    def render(self) -> str:
        """A fixed-width text table: before -> after columns for a prune, shares for a model."""
        return _render_pruned(self) if self.compared else _render_model(self)

    def summary(self) -> str:
        """One line: params and MACs (before -> after and the kept share for a prune)."""
        b, a = self.before, self.after
        if not self.compared:
            return (
                f"{len(self.rows)} conv/linear layers, {human(b.params)} params, "
                f"{human(b.macs)} MACs per sample"
            )
        return (
            f"params {human(b.params)} -> {human(a.params)} ({percent(a.params, b.params)} kept), "
            f"MACs {human(b.macs)} -> {human(a.macs)} ({percent(a.macs, b.macs)} kept), "
            f"{sum(r.channels[0] < r.channels[1] for r in self.rows)} of {len(self.rows)} "
            "conv/linear layers narrowed"
        )


def human(n: float) -> str:
    """``n`` with a K/M/G suffix and three significant digits (``1.23M``); exact below 1000."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:g}"


def percent(part: float, whole: float) -> str:
    """``part`` as a share of ``whole`` (``"-"`` when ``whole`` is 0)."""
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def _costs(model: nn.Module, input_shape: tuple[int, ...], names: Sequence[str]):
    from pipeline.graph.costs import count_layer_macs, count_params

    modules, macs = dict(model.named_modules()), count_layer_macs(model, input_shape)
    layers = {n: Costs(count_params(modules[n]), macs.get(n, 0)) for n in names}
    return layers, Costs(count_params(model), macs[""])


def layer_table(
    model: nn.Module,
    graph: ChannelGraph,
    input_shape: tuple[int, ...],
    pruned: nn.Module | None = None,
    plan: PrunePlan | None = None,
) -> LayerTable:
    """The table of ``model`` (and of ``pruned`` made from it by ``plan``, when given).

    Args:
        model: The model ``graph`` was traced from.
        graph: Its channel graph; its conv/linear layers are the rows, in graph order.
        input_shape: Per-sample input shape, e.g. ``(3, 32, 32)``.
        pruned: The pruned model (same module names); None: ``model`` alone.
        plan: The plan ``pruned`` was made by, for the kept channel counts.
    """
    widths = layer_widths(graph, plan, kinds=("conv", "linear"))
    before, total_before = _costs(model, input_shape, list(widths))
    after, total_after = (
        _costs(pruned, input_shape, list(widths)) if pruned is not None else (before, total_before)
    )
    rows = tuple(LayerRow(n, graph.layers[n].kind, widths[n], before[n], after[n]) for n in widths)
    return LayerTable(rows, total_before, total_after, compared=pruned is not None)


def _align(lines: list[list[str]]) -> str:
    """Columns padded to their widest cell; the first column left-aligned, the rest right."""
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in lines
    )


def _render_pruned(table: LayerTable) -> str:
    head = ["layer", "channels", "kept", "params", "->", "kept", "MACs", "->", "kept"]
    lines = [head]
    for r in table.rows:
        (k, t), b, a = r.channels, r.before, r.after
        lines.append(
            [r.name, f"{k}/{t}", percent(k, t), human(b.params), human(a.params),
             percent(a.params, b.params), human(b.macs), human(a.macs), percent(a.macs, b.macs)]
        )  # fmt: skip
    b, a = table.before, table.after
    lines.append(
        ["total (whole model)", "", "", human(b.params), human(a.params),
         percent(a.params, b.params), human(b.macs), human(a.macs), percent(a.macs, b.macs)]
    )  # fmt: skip
    return _align(lines)


def _render_model(table: LayerTable) -> str:
    lines = [["layer", "kind", "channels", "params", "share", "MACs", "share"]]
    b = table.before
    for r in table.rows:
        lines.append(
            [r.name, r.kind, str(r.channels[1]), human(r.before.params),
             percent(r.before.params, b.params), human(r.before.macs),
             percent(r.before.macs, b.macs)]
        )  # fmt: skip
    lines.append(["total (whole model)", "", "", human(b.params), "", human(b.macs), ""])
    return _align(lines)
