"""What a model costs in measured latency: per-layer tables, interpolated, as a function of the
channel groups it keeps.

A :class:`LatencyModel` is plain data: for every conv and linear layer a table of its latency
measured on the deployment backend (``pipeline.bench.latency_pieces`` builds it from small ONNX
pieces, one layer at a few widths), and an affine calibration of the table sum against the whole
model measured at a few width profiles (``pipeline.bench.latency_profiles``)::

    predicted_ms = offset_ms + scale * sum_L T_L(kept_in_L, kept_out_L)

``T_L`` interpolates the layer's table linearly on each axis (bilinear over the grid, exact for
``a + b*cin + c*cout + d*cin*cout``, which is what a conv's arithmetic is). Alignment is part of
the table, because it is what a MAC count cannot see (:class:`Blocking`). ONNX Runtime's CPU
convolutions run in a blocked layout, in blocks of 16 channels with AVX-512 (8 with AVX2), and
only when both widths are multiples of 4. Measured on this machine (2026-12-07, VGG-11 w0.5 at
28 px, batch 1, one thread): widths 28/60/124/252 and 24/56/120/248 cost what 32/64/128/256 cost
(padded to the block), while 31/63/127/255 cost 2.4x as much (the slow path). So a width that
is a multiple of the quantum costs its padded width on the aligned grid, and any other width
interpolates among measured slow widths.

Two ways to read a table:

- **exact** (``exact=True``): integer widths, alignment classes as above. The latency cut and the
  reports use it.
- **smooth** (``exact=False``): continuous widths on the aligned grid alone, each at its width
  plus half a block (the padding a cut rounded to the block adds on average), so a group
  half-way to receding counts half. The budget controller uses it: a step function of the
  widths would let a half-receded layer look slower than a dense one. The cut then rounds
  widths up to the block where that is no slower (``pipeline.prune.latency_cut``): the padded
  channels are free.

:class:`KeptLatency` maps kept groups to layer widths through the channel graph, as
:class:`pipeline.graph.costs.KeptMacs` does for MACs, and has the same ``removed_share``, so the
budget controller takes either.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from pipeline.graph.channel_graph import ChannelGraph

SCHEMA = 1
KINDS = ("conv", "depthwise", "linear")


def ceil_to(width: float, multiple: int) -> int:
    """``width`` rounded up to a multiple of ``multiple``."""
    return int(math.ceil(width / multiple - 1e-9)) * multiple


def axis_points(
    full: int, align: int, quantum: int, prunable: bool, multiple: int = 1
) -> tuple[int, ...]:
    """Widths to measure on one axis of a layer of ``full`` channels.

    Multiples of ``align`` at about 1/8, 1/4, 1/2, 3/4 and all of ``full`` (the smallest one
    included, as layer floors reach it), ``full`` itself, and three widths that are not
    multiples of ``quantum`` (just above one block, about half and all of ``full``): the two
    classes of :class:`LayerTable`. A fixed axis has one point. ``multiple`` (a grouped conv's
    groups) divides every point.
    """
    if not prunable or full <= 1:
        return (full,)
    step = align * multiple // math.gcd(align, multiple)
    points = {full}
    for f in (0.0, 0.125, 0.25, 0.5, 0.75, 1.0):
        w = ceil_to(max(1.0, f * full), step)
        if w <= full:
            points.add(w)
    for start in (full - 1, full // 2 + 1, align + 1):
        w = start - start % multiple
        while w > 0 and w % quantum == 0:
            w -= multiple
        if 0 < w < full:
            points.add(w)
    return tuple(sorted(points))


def _bracket(points: Sequence[int], x: float) -> list[tuple[int, float]]:
    """(index, weight) pairs interpolating ``x`` linearly among sorted ``points``; beyond the
    ends the outermost two extrapolate linearly; one point scales in proportion."""
    if len(points) == 1:
        return [(0, x / points[0] if points[0] else 1.0)]
    hi = next((i for i, p in enumerate(points) if p >= x), len(points) - 1)
    hi = min(max(hi, 1), len(points) - 1)
    lo = hi - 1
    t = (x - points[lo]) / (points[hi] - points[lo])
    return [(lo, 1.0 - t), (hi, t)]


@dataclass(frozen=True)
class Blocking:
    """How the backend computes channels: in blocks of ``align``, and only when a width is a
    multiple of ``quantum`` (ONNX Runtime's CPU: blocks of 16 with AVX-512 or 8 with AVX2,
    quantum 4); a width that is not runs a slower path."""

    align: int
    quantum: int

    def fast(self, width: float) -> bool:
        return float(width).is_integer() and int(width) % self.quantum == 0

    def padded(self, width: float, full: int) -> float:
        """The width a fast layer computes: up to its block, never past the layer's own."""
        return min(ceil_to(width, self.align), full)

    def smooth(self, width: float, full: int) -> float:
        """A continuous stand-in for the padding: half a block on average."""
        return min(width + (self.align - 1) / 2, full)


def _axis(
    points: Sequence[int], x: float, full: int, blocking: Blocking, exact: bool, pad: bool
) -> list[tuple[int, float]]:
    """Interpolation (index, weight) pairs on one axis; see :meth:`LayerTable.latency_ms`.
    ``pad`` marks an input axis, whose slow widths have measured points of their own."""
    aligned = [i for i, p in enumerate(points) if p % blocking.align == 0 or p == full]
    if not exact:
        chosen, x = aligned, blocking.smooth(x, full)
    elif not pad:  # an output axis: every point is aligned or the full width
        chosen = list(range(len(points)))
        x = blocking.padded(x, full) if blocking.fast(x) else x
    elif x in points and not blocking.fast(x):
        return [(points.index(int(x)), 1.0)]
    elif blocking.fast(x):
        chosen, x = [i for i in aligned if blocking.fast(points[i])], blocking.padded(x, full)
    else:
        chosen = [i for i, p in enumerate(points) if not blocking.fast(p)]
    chosen = chosen or list(range(len(points)))
    return [(chosen[i], w) for i, w in _bracket([points[i] for i in chosen], x)]


@dataclass(frozen=True)
class LayerTable:
    """The measured latency of one conv or linear layer at a grid of widths.

    ``ms[i][j]`` is the layer alone at ``in_points[i]`` input and ``out_points[j]`` output
    channels (a depthwise conv has one axis: ``out_points`` is empty and ``ms[i][0]`` is the
    conv at ``in_points[i]`` channels), the backend's per-call overhead subtracted.
    """

    name: str
    kind: str
    full_in: int
    full_out: int
    in_points: tuple[int, ...]
    out_points: tuple[int, ...]
    ms: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        rows, cols = len(self.in_points), max(1, len(self.out_points))
        if self.kind not in KINDS or len(self.ms) != rows or any(len(r) != cols for r in self.ms):
            raise ValueError(
                f"latency table of {self.name!r}: expected kind in {KINDS} and a "
                f"{rows}x{cols} grid, got kind {self.kind!r} and "
                f"{len(self.ms)}x{len(self.ms[0]) if self.ms else 0}"
            )

    def latency_ms(self, cin: float, cout: float, blocking: Blocking, exact: bool = True) -> float:
        """Interpolated latency at ``cin`` input and ``cout`` output channels.

        Exact: a width that is a multiple of the quantum costs what its padding to the block
        costs, among the aligned points; any other input width interpolates among the measured
        slow points (it takes the backend off its blocked path); an output width that is not
        a multiple of the quantum interpolates unpadded (the reader pays, on its input axis).
        Smooth: the aligned points, at the width plus half a block.
        """
        rows = _axis(self.in_points, cin, self.full_in, blocking, exact, pad=True)
        if self.kind == "depthwise":
            return max(0.0, sum(w * self.ms[i][0] for i, w in rows))
        cols = _axis(self.out_points, cout, self.full_out, blocking, exact, pad=False)
        return max(0.0, sum(wi * wj * self.ms[i][j] for i, wi in rows for j, wj in cols))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LayerTable:
        return cls(
            raw["name"], raw["kind"], int(raw["full_in"]), int(raw["full_out"]),
            tuple(int(p) for p in raw["in_points"]), tuple(int(p) for p in raw["out_points"]),
            tuple(tuple(float(v) for v in row) for row in raw["ms"]),
        )  # fmt: skip


@dataclass(frozen=True)
class Profile:
    """One whole-model measurement: ``fit`` (calibrates) or ``held-out`` (tests the fit)."""

    role: str
    label: str
    table_ms: float  # the sum of the layer tables at this profile's widths (exact)
    predicted_ms: float
    measured_ms: float

    @property
    def error(self) -> float:
        return (self.predicted_ms - self.measured_ms) / self.measured_ms


@dataclass(frozen=True)
class LatencyModel:
    """Layer tables, their calibration and where they were measured; see the module docstring.

    ``deployment`` is the ``train.latency`` section measured on; ``key`` is what the cache files
    it under (``pipeline.bench.latency_cache``); ``table_error`` is the largest relative error of
    the prediction on the held-out profiles (None if none were measured).
    """

    layers: tuple[LayerTable, ...]
    align: int
    quantum: int
    offset_ms: float
    scale: float
    deployment: dict[str, Any]
    key: dict[str, Any] = field(default_factory=dict)
    profiles: tuple[Profile, ...] = ()
    table_error: float | None = None
    build_seconds: float = 0.0
    overhead_ms: float = 0.0  # the per-call cost subtracted from every piece

    def table_ms(self, widths: Mapping[str, tuple[float, float]], exact: bool = True) -> float:
        """Sum of the layer tables at ``widths`` (layer name -> (cin, cout)); a layer not named
        is at full width."""
        total = 0.0
        for t in self.layers:
            cin, cout = widths.get(t.name, (t.full_in, t.full_out))
            total += t.latency_ms(cin, cout, self.blocking, exact)
        return total

    def predict_ms(self, widths: Mapping[str, tuple[float, float]], exact: bool = True) -> float:
        """Predicted latency of the whole model at ``widths``."""
        return self.offset_ms + self.scale * self.table_ms(widths, exact)

    @property
    def blocking(self) -> Blocking:
        return Blocking(self.align, self.quantum)

    @property
    def dense_ms(self) -> float:
        return self.predict_ms({})

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["schema"] = SCHEMA
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LatencyModel:
        if raw.get("schema") != SCHEMA:
            raise ValueError(f"latency model schema {raw.get('schema')!r}, expected {SCHEMA}")
        return cls(
            layers=tuple(LayerTable.from_dict(t) for t in raw["layers"]),
            align=int(raw["align"]),
            quantum=int(raw["quantum"]),
            offset_ms=float(raw["offset_ms"]),
            scale=float(raw["scale"]),
            deployment=dict(raw["deployment"]),
            key=dict(raw.get("key") or {}),
            profiles=tuple(Profile(**p) for p in raw.get("profiles") or ()),
            table_error=raw.get("table_error"),
            build_seconds=float(raw.get("build_seconds", 0.0)),
            overhead_ms=float(raw.get("overhead_ms", 0.0)),
        )

    def describe(self) -> str:
        """The deployment in words: ``onnxruntime cpu fp32, batch 1, 1 thread, cpu clock``."""
        d = self.deployment
        threads = f"{d['threads']} thread{'s' if d['threads'] != 1 else ''}"
        return (
            f"{d['backend']} {d['device']} {d['precision']}, batch {d['batch']}, {threads}, "
            f"{d['clock']} clock"
        )


def layer_widths(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(input, output) channels of every conv and linear of ``model``, by qualified name: the
    widths a pruned model actually has, whatever plan made it."""
    widths = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            widths[name] = (m.in_channels, m.out_channels)
        elif isinstance(m, torch.nn.Linear):
            widths[name] = (m.in_features, m.out_features)
    return widths


class KeptLatency:
    """Predicted latency as a function of the groups a model keeps (``KeptMacs``'s interface).

    ``kept[j]`` (0 to 1, fractional while training) is how much of group ``group_ids[j]`` is
    kept; groups not listed always count as kept. ``removed_share`` reads the tables smoothly
    (see the module docstring) and is what the budget controller drives.
    """

    def __init__(self, graph: ChannelGraph, latency: LatencyModel, group_ids: tuple) -> None:
        position = {g: j for j, g in enumerate(group_ids)}
        n = len(group_ids)
        self.latency, self._names = latency, []
        rows_in, rows_out = [], []
        for t in latency.layers:
            layer = graph.layers.get(t.name)
            if layer is None or (len(layer.in_groups), len(layer.out_groups)) != (
                t.full_in,
                t.full_out,
            ):
                got = None if layer is None else (len(layer.in_groups), len(layer.out_groups))
                raise ValueError(
                    f"the latency table was measured for another model: layer {t.name!r} is "
                    f"{t.full_in}->{t.full_out} channels there and {got} here; rebuild it for "
                    "this model (it is cached per model, see pipeline.bench.latency_cache)"
                )
            rows_in.append(_counts(layer.in_groups, position, n))
            rows_out.append(_counts(layer.out_groups, position, n))
            self._names.append(t.name)
        self._in = torch.stack(rows_in) if rows_in else torch.zeros(0, n + 1)
        self._out = torch.stack(rows_out) if rows_out else torch.zeros(0, n + 1)
        self.dense = self.latency_ms(torch.ones(n), exact=False)

    def widths(self, kept: torch.Tensor) -> dict[str, tuple[float, float]]:
        """Layer name -> (kept input, kept output) channels when groups are kept by ``kept``."""
        k = torch.cat([kept.double().cpu(), torch.ones(1, dtype=torch.float64)])
        cin, cout = (self._in @ k).tolist(), (self._out @ k).tolist()
        return {name: (a, b) for name, a, b in zip(self._names, cin, cout, strict=True)}

    def latency_ms(self, kept: torch.Tensor, *, exact: bool = False) -> float:
        """Predicted ms with groups kept by ``kept``; ``exact`` rounds widths to channels."""
        widths = self.widths(kept)
        if exact:
            widths = {k: (round(a), round(b)) for k, (a, b) in widths.items()}
        return self.latency.predict_ms(widths, exact=exact)

    def removed_share(self, kept: torch.Tensor) -> float:
        """Share of the dense predicted latency (smooth) that the removal takes away."""
        return 1.0 - self.latency_ms(kept) / max(self.dense, 1e-30)


def _counts(groups: tuple[int, ...], position: Mapping[int, int], n: int) -> torch.Tensor:
    """How many channels of a layer each listed group holds; unlisted ones in the last slot."""
    row = torch.zeros(n + 1, dtype=torch.float64)
    for g in groups:
        row[position.get(g, n)] += 1.0
    return row


def latency_share(cost: KeptLatency, target_ms: float) -> float:
    """The share of the dense predicted latency that must go to reach ``target_ms``.

    Raises:
        ValueError: ``target_ms`` is not below the dense model's predicted latency.
    """
    share = 1.0 - target_ms / cost.dense
    if not share > 0.0:
        raise ValueError(
            f"train.target_latency_ms {target_ms:g} is not below the dense model's predicted "
            f"{cost.dense:.4g} ms ({cost.latency.describe()}): nothing needs to be pruned; set "
            f"train.target_latency_ms below {cost.dense:.4g}"
        )
    return share
