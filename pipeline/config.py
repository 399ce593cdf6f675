"""Run configuration: frozen dataclasses that map one-to-one onto the YAML files in configs/.

Precedence is defaults, then YAML, then ``--set a.b=v`` overrides. Unknown keys are rejected with
an error that lists the valid ones. Every dataclass validates itself in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIN_OPSET = 17  # pipeline.export.onnx.MIN_OPSET: what the exports are verified at
MAX_THREADS = 256  # a fixed cap, not the CPU count: a config travels between machines


def exporter_max_opset() -> int:
    """The highest opset torch's TorchScript ONNX exporter (the one recede uses) can emit."""
    try:
        from torch.onnx import _constants
    except ImportError:
        return 20  # torch 2.x
    return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))


class ConfigError(ValueError):
    """A configuration value or key is invalid. The message says how to fix it."""


def _check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _check(name: str, ok: bool, expected: str, value: Any) -> None:
    """Raise unless ``ok``; ``expected`` reads after "must be", e.g. "in [0, 1) such as 0.9"."""
    if not ok:
        raise ConfigError(f"{name} must be {expected}, got {value!r}; set it with --set {name}=...")


def _check_types(config: Any, section: str) -> None:
    """Type-check every plain field as the YAML loader would: no bools for numbers, no nan/inf."""
    for name, tp in _field_types(type(config)).items():
        if not dataclasses.is_dataclass(tp):
            _coerce(f"{section}.{name}", getattr(config, name), tp)


@dataclass(frozen=True)
class DataConfig:
    """Dataset: ``digits`` (embedded), ``fashion_mnist``, ``cifar10``, ``cifar100``, ``imagefolder``."""

    name: str = "digits"
    root: str | None = None
    image_size: int = 32
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    train_limit: int | None = None  # use only the first N training samples (quick runs)
    skip_unreadable: bool = False  # imagefolder: leave unreadable images out (logged), not exit 2

    def __post_init__(self) -> None:
        _check_types(self, "data")
        _check_choice(
            "data.name",
            self.name,
            ("digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder"),
        )
        _check_positive("data.image_size", self.image_size)
        _check_positive("data.batch_size", self.batch_size)
        _check("data.eval_batch_size", self.eval_batch_size >= 1, ">= 1", self.eval_batch_size)
        _check(
            "data.num_workers",
            self.num_workers >= 0,
            ">= 0 (0 loads in the main process)",
            self.num_workers,
        )
        limit = self.train_limit
        _check("data.train_limit", limit is None or limit >= 1, "null (all) or >= 1", limit)


@dataclass(frozen=True)
class ModelConfig:
    """Model: ``vgg``, ``resnet20``, ``resnet56``, ``torchvision:<name>`` or ``module.path:factory``."""

    name: str = "vgg"
    width: float = 1.0
    depth: int = 11  # VGG depth: 11, 13, 16 or 19

    def __post_init__(self) -> None:
        _check_types(self, "model")
        _check_positive("model.width", self.width)
        _check("model.depth", self.depth >= 1, ">= 1", self.depth)
        if self.name in ("vgg",):
            _check_choice("model.depth", self.depth, (11, 13, 16, 19))


@dataclass(frozen=True)
class PenaltyConfig:
    """Sparsity penalty on BN scales during training.

    ``receding``: sum s(1 - log s), s = sigmoid(w + bias), on bounded BN.
    ``l1``: Network Slimming, sum |gamma| on plain BN.
    ``polarization``: t*sum|gamma| - sum|gamma - mean gamma| (Zhuang et al. 2020) on plain BN.
    ``ista``: proximal shrink of plain BN gamma after each step (Ye et al. 2018); ``strength`` is
    rho, ``cost`` picks the per-layer lambda (``memory`` or ``flops``), ``rescale`` is the
    gamma/W rescaling factor alpha (1 = off), undone after training.
    ``none``: no penalty (bounded BN is still used).

    ``bias`` (the receding shift b) defaults to 0, the value the README recommends and every
    shipped config uses: under a budget the controller sets the strength, and with b = 3 a
    healthy channel feels an 80x weaker push, so the strength must climb to ~1e3 before anything
    moves. Set 3.0 for the seed paper's fixed-strength VGG setting.
    """

    method: str = "receding"
    strength: float = 1e-4
    bias: float = 0.0
    t: float = 1.2
    cost: str = "memory"
    rescale: float = 1.0

    def __post_init__(self) -> None:
        _check_types(self, "train.penalty")
        _check_choice(
            "train.penalty.method", self.method, ("receding", "l1", "polarization", "ista", "none")
        )
        _check("train.penalty.t", self.t > 0, "> 0 (polarization uses 1.2-1.5)", self.t)
        _check_choice("train.penalty.cost", self.cost, ("memory", "flops"))
        _check_positive("train.penalty.rescale", self.rescale)
        _check_positive("train.penalty.strength", self.strength, allow_zero=True)

    @property
    def bounded(self) -> bool:
        """Whether this method trains bounded BN (otherwise plain BN gamma)."""
        return self.method in ("receding", "none")


LATENCY_BACKENDS = ("onnxruntime", "tensorrt")


@dataclass(frozen=True)
class LatencyConfig:
    """The deployment a latency budget (``train.target_cost: latency``) is measured on.

    ``clock`` times CPU runs as ``recede bench --clock`` does: ``cpu`` (the thread's CPU time,
    one thread only, robust to a loaded machine) or ``wall``; CUDA runs always need ``wall``.
    """

    backend: str = "onnxruntime"
    device: str = "cpu"
    precision: str = "fp32"
    batch: int = 1
    threads: int = 1
    clock: str = "cpu"

    def __post_init__(self) -> None:
        _check_types(self, "train.latency")
        _check_choice("train.latency.backend", self.backend, LATENCY_BACKENDS)
        _check_choice("train.latency.device", self.device, ("cpu", "cuda"))
        _check_choice("train.latency.precision", self.precision, ("fp32", "int8"))
        _check("train.latency.batch", self.batch >= 1, ">= 1 such as 1", self.batch)
        _check(
            "train.latency.threads",
            1 <= self.threads <= MAX_THREADS,
            f"in [1, {MAX_THREADS}]",
            self.threads,
        )
        _check_choice("train.latency.clock", self.clock, ("wall", "cpu"))
        if self.clock == "cpu" and (self.threads != 1 or self.device != "cpu"):
            raise ConfigError(
                f"train.latency.clock 'cpu' counts one CPU thread's time, so it needs "
                f"train.latency.threads 1 and train.latency.device cpu, got threads "
                f"{self.threads} and device {self.device!r}; set train.latency.clock=wall"
            )


@dataclass(frozen=True)
class TrainConfig:
    """SGD training. BN parameters get ``bn_lr_mult`` x the learning rate and no weight decay."""

    epochs: int = 10
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    bn_lr_mult: float = 10.0
    bn_shift: bool = False  # learn a shift beta in bounded BN (off, as in the reference code)
    bn_init_logit: float = 0.0  # initial bounded-BN logit; 0 gives importance 0.5
    bn_init: str = "constant"  # "constant" (logit bn_init_logit, plain gamma 0.5) or "normal"
    schedule: str = "cosine"
    seed: int = 0
    device: str = "auto"
    compile: bool = (
        False  # torch.compile the training forward/backward (pipeline.train.loop.maybe_compile)
    )
    penalty: PenaltyConfig = field(default_factory=PenaltyConfig)
    target: float | None = None  # fraction of prunable groups (or MACs) to recede; None: fixed λ
    target_cost: str = "groups"  # what `target` counts: "groups" or "macs"
    target_ramp: float = 0.6  # share of training over which the receded share ramps to target
    target_delay: float = 0.0  # share of training before the ramp starts (importances form first)
    receded_below: float = 0.01  # a group has receded when its importance is below this
    penalise: str = "scheduled"  # under a target: "scheduled" (the controller's set) or "all"
    strength_rate: float = 3.0  # decades the controller may move lambda per tenth of training
    target_latency_ms: float | None = None  # with target_cost latency: the latency to reach
    latency: LatencyConfig = field(default_factory=LatencyConfig)  # where it is measured

    def __post_init__(self) -> None:
        _check_types(self, "train")
        _check_positive("train.epochs", self.epochs, allow_zero=True)
        _check_positive("train.lr", self.lr)
        _check("train.momentum", 0.0 <= self.momentum < 1.0, "in [0, 1) such as 0.9", self.momentum)
        _check("train.weight_decay", self.weight_decay >= 0, ">= 0 such as 5e-4", self.weight_decay)
        _check("train.bn_lr_mult", self.bn_lr_mult > 0, "> 0 such as 10", self.bn_lr_mult)
        # numpy's seed is 32-bit; torch's would accept more.
        _check("train.seed", 0 <= self.seed < 2**32, "in [0, 2**32)", self.seed)
        _check_choice("train.schedule", self.schedule, ("cosine", "step", "constant"))
        _check_choice("train.device", self.device, ("auto", "cpu", "cuda"))
        _check_choice("train.bn_init", self.bn_init, ("constant", "normal"))
        _check_choice("train.target_cost", self.target_cost, ("groups", "macs", "latency"))
        _check_latency_budget(self)
        if self.target is not None and not 0.0 < self.target < 1.0:
            raise ConfigError(
                f"train.target must be a fraction in (0, 1) such as 0.5, or null for a fixed "
                f"penalty strength; got {self.target!r}"
            )
        if not 0.0 < self.target_ramp <= 1.0:
            raise ConfigError(f"train.target_ramp must be in (0, 1], got {self.target_ramp!r}")
        if not 0.0 < self.receded_below < 1.0:
            raise ConfigError(f"train.receded_below must be in (0, 1), got {self.receded_below!r}")
        _check_choice("train.penalise", self.penalise, ("scheduled", "all"))
        _check(
            "train.target_delay",
            self.target_delay >= 0.0 and self.target_delay + self.target_ramp <= 1.0,
            "in [0, 1 - train.target_ramp] such as 0.1",
            self.target_delay,
        )
        _check("train.strength_rate", self.strength_rate > 0, "> 0 such as 3", self.strength_rate)


def _check_latency_budget(cfg: TrainConfig) -> None:
    """``train.target_cost: latency`` takes its budget from ``train.target_latency_ms`` alone
    (a ``train.target`` beside it is not used, and training says so)."""
    ms, latency = cfg.target_latency_ms, cfg.target_cost == "latency"
    if ms is not None and not ms > 0:
        raise ConfigError(
            f"train.target_latency_ms must be a latency in milliseconds > 0 such as 0.5, got "
            f"{ms!r}; set it with --set train.target_latency_ms=..."
        )
    if latency and ms is None:
        raise ConfigError(
            "train.target_cost latency needs train.target_latency_ms (the latency to reach, in "
            "ms, e.g. --set train.target_latency_ms=0.5), got null"
        )
    if ms is not None and not latency:
        raise ConfigError(
            f"train.target_latency_ms={ms!r} is a latency budget, but train.target_cost is "
            f"{cfg.target_cost!r}; set train.target_cost=latency (or drop target_latency_ms)"
        )


@dataclass(frozen=True)
class PruneConfig:
    """Which channels to remove, and the fine-tune afterwards.

    ``threshold``: ``ratio`` prunes the ``ratio`` least important channel groups; ``auto`` cuts at
    the valley of the bimodal importance distribution; a float prunes groups below that value.
    ``scope`` (ratio only): ``global`` ranks all groups together; ``layer`` drops ``ratio`` of
    each layer's groups (``pipeline.prune.plan.select_groups``).
    """

    threshold: str | float = "auto"
    ratio: float = 0.5
    scope: str = "global"
    aggregate: str = "max"
    min_channels: int = 4
    max_layer_ratio: float = 0.95
    round_to: int = 8  # kept widths that ONNX Runtime's CPU kernels run fast (decisions.md)
    finetune_epochs: int = 3
    exact_borders: bool = True  # absorb constant channels exactly at zero-padded borders
    recalibrate: bool = True  # re-estimate BN running stats after pruning (no gradient steps)
    finetune_lr: float = 0.01
    allow_approximate: bool = False  # zero gated shifts to remove their groups (error reported)

    def __post_init__(self) -> None:
        _check_types(self, "prune")
        expected = "'auto', 'ratio' or a finite number > 0 such as 0.05"
        if isinstance(self.threshold, str):
            _check("prune.threshold", self.threshold in ("auto", "ratio"), expected, self.threshold)
        else:
            _check("prune.threshold", self.threshold > 0, expected, self.threshold)
        _check("prune.finetune_epochs", self.finetune_epochs >= 0, ">= 0", self.finetune_epochs)
        _check("prune.finetune_lr", self.finetune_lr > 0, "> 0 such as 0.01", self.finetune_lr)
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"prune.ratio must be in [0, 1), got {self.ratio!r}")
        _check_choice("prune.aggregate", self.aggregate, ("max", "mean", "sum"))
        _check_choice("prune.scope", self.scope, ("global", "layer"))
        _check(
            "prune.scope",
            self.scope == "global" or self.threshold == "ratio",
            "'global' unless prune.threshold is 'ratio' (a per-layer cut needs a ratio)",
            self.scope,
        )
        if self.min_channels < 1:
            raise ConfigError(f"prune.min_channels must be >= 1, got {self.min_channels!r}")
        if not 0.0 < self.max_layer_ratio <= 1.0:
            raise ConfigError(
                f"prune.max_layer_ratio must be in (0, 1], got {self.max_layer_ratio!r}"
            )
        _check_positive("prune.round_to", self.round_to)


@dataclass(frozen=True)
class Int8Config:
    """INT8 ONNX (``pipeline.export.int8_export``): calibration, bound and fallback.

    ``recede run`` quantizes the dense and the pruned model when ``enabled``; ``method`` is
    ``minmax``, ``entropy`` or ``percentile``; ``max_drop`` is the accuracy drop allowed, in
    points; ``fallback_limit`` is how many tensors the sensitive-layer fallback may keep in float;
    ``activations`` is ``auto`` (``uint8`` on x86, ``int8`` elsewhere and when symmetric), ``int8``
    or ``uint8``; ``symmetric`` puts every activation zero point at 0
    (TensorRT's form); ``reduce_range`` null decides 7-bit weights from the CPU (no VNNI: on).
    The defaults were measured (docs/decisions.md#int8).
    """

    enabled: bool = True
    method: str = "minmax"
    calibration_samples: int = 512
    validation_samples: int = 256
    verify_samples: int = 2000
    max_drop: float = 0.5
    fallback_limit: int = 8
    activations: str = "auto"
    symmetric: bool = False
    reduce_range: bool | None = None
    percentile: float = 99.999

    def __post_init__(self) -> None:
        _check_types(self, "export.int8")
        _check_choice("export.int8.method", self.method, ("minmax", "entropy", "percentile"))
        _check_choice("export.int8.activations", self.activations, ("auto", "int8", "uint8"))
        for key in ("calibration_samples", "validation_samples", "verify_samples"):
            value = getattr(self, key)
            _check(f"export.int8.{key}", value >= 1, ">= 1 such as 512", value)
        _check(
            "export.int8.max_drop",
            0.0 <= self.max_drop <= 100.0,
            "accuracy points in [0, 100] such as 0.5",
            self.max_drop,
        )
        _check("export.int8.fallback_limit", self.fallback_limit >= 0, ">= 0", self.fallback_limit)
        _check(
            "export.int8.percentile",
            50.0 < self.percentile <= 100.0,
            "in (50, 100] such as 99.999",
            self.percentile,
        )
        _check(
            "export.int8.symmetric",
            not (self.symmetric and self.activations == "uint8"),
            "false with export.int8.activations uint8 (symmetric activations are signed)",
            self.symmetric,
        )


@dataclass(frozen=True)
class ExportConfig:
    """ONNX export and verification; TensorRT when a GPU and tensorrt are present."""

    opset: int = 17
    atol: float = 1e-4
    tensorrt: bool = False
    fp16: bool = False
    accept_insensitive: bool = (
        False  # see pipeline.core.checks: an unverifiable export fails the run
    )
    allow_slower: bool = (
        False  # see pipeline.bench.speed_gate: a pruned model slower than dense fails
    )
    int8: Int8Config = field(default_factory=Int8Config)

    def __post_init__(self) -> None:
        _check_types(self, "export")
        top = exporter_max_opset()
        _check(
            "export.opset", MIN_OPSET <= self.opset <= top, f"in [{MIN_OPSET}, {top}]", self.opset
        )
        _check("export.atol", self.atol > 0, "> 0 such as 1e-4", self.atol)


@dataclass(frozen=True)
class BenchConfig:
    """Latency measurement: p50/p90/p99 over ``runs`` timed runs after ``warmup``.

    ``clock`` is ``wall`` (elapsed time, what a user waits) or ``cpu`` (the thread's CPU time,
    ``threads: 1`` only: what a run costs, so a speed-up survives a loaded machine; see
    ``pipeline.bench.timing.CLOCKS``).
    """

    batches: tuple[int, ...] = (1, 32)
    threads: int = 2
    runs: int = 50
    warmup: int = 10
    clock: str = "wall"

    def __post_init__(self) -> None:
        _check_types(self, "bench")
        _check(
            "bench.threads",
            1 <= self.threads <= MAX_THREADS,
            f"in [1, {MAX_THREADS}]",
            self.threads,
        )
        _check("bench.warmup", self.warmup >= 0, ">= 0", self.warmup)
        _check("bench.clock", self.clock in ("wall", "cpu"), "'wall' or 'cpu'", self.clock)
        if self.clock == "cpu" and self.threads != 1:
            raise ConfigError(
                f"bench.clock 'cpu' counts one thread's time, so it needs bench.threads 1, got "
                f"{self.threads}; set bench.threads=1 or bench.clock=wall"
            )
        if self.runs < 50:
            raise ConfigError(f"bench.runs must be >= 50 for stable p99, got {self.runs!r}")
        if not self.batches or any(b < 1 for b in self.batches):
            raise ConfigError(f"bench.batches must be positive integers, got {self.batches!r}")


@dataclass(frozen=True)
class RunConfig:
    """The whole pipeline: train -> prune -> fine-tune -> fold -> export -> verify -> bench."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# YAML 1.1 (PyYAML) reads 1e-2, 1E-3 and 5e3 as strings (it wants a dot and a signed exponent).
_DECIMAL = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")


def _to_float(path: str, value: Any) -> float:
    """A finite float from a number or a decimal string such as "1e-2"; bools and nan/inf fail."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if is_number or (isinstance(value, str) and _DECIMAL.fullmatch(value.strip())):
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            number = math.inf
        if math.isfinite(number):
            return number
    raise ConfigError(
        f"{path} expects a finite number such as 0.05 or 1e-2, got {value!r} "
        f"({type(value).__name__})"
    )


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Convert a YAML value to the annotated field type, or raise ConfigError."""
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=path)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        # str last, so that "1e-2" becomes a number where a number is allowed.
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):
            try:
                return _coerce(path, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{path}: {value!r} does not fit {tp}; " + "; ".join(errors))
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(path, v, args[0]) for v in value)
    if tp is float:
        return _to_float(path, value)
    if tp is Any or (
        isinstance(tp, type)
        and isinstance(value, tp)
        and not (tp is int and isinstance(value, bool))
    ):
        return value
    raise ConfigError(
        f"{path} expects {getattr(tp, '__name__', tp)}, got {value!r} ({type(value).__name__})"
    )


def from_dict(cls: type, data: Mapping[str, Any] | None, *, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping, rejecting unknown keys."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_), key=str)
    if unknown:
        where = f"{prefix}." if prefix else ""
        valid = ", ".join(f"{where}{k}" for k in types_)
        raise ConfigError(
            f"unknown config key(s) {[f'{where}{k}' for k in unknown]}; valid keys: {valid}"
        )
    kwargs = {k: _coerce(f"{prefix}.{k}" if prefix else k, v, types_[k]) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (tuples become lists), for YAML/JSON."""
    raw = dataclasses.asdict(config)

    def listify(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: listify(x) for k, x in v.items()}
        if isinstance(v, tuple):
            return [listify(x) for x in v]
        return v

    return listify(raw)


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``a.b=v`` overrides (v parsed as YAML) to a nested dict, returning a new dict."""
    import yaml  # here, not at the top: pipeline.models.zoo needs this module, not PyYAML

    out = yaml.safe_load(yaml.safe_dump(data)) or {}
    if not isinstance(out, dict):
        raise ConfigError(f"a config must be a mapping of sections such as train:, got {out!r}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE such as prune.ratio=0.6, got {item!r}")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:  # absent, or an empty section in the YAML file
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is a value, not a section")
        node[parts[-1]] = _parse_value(key, raw)
    return out


def _parse_value(key: str, raw: str) -> Any:
    import yaml

    try:
        return _load_yaml(raw)
    except DuplicateKeyError as err:
        raise ConfigError(f"--set {key}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(
            f"--set {key}: {raw!r} is not a YAML value; quote strings and write lists as [1, 8] "
            f"({err})"
        ) from err


class DuplicateKeyError(ConfigError):
    """A YAML mapping names one key twice (PyYAML would keep the last silently)."""


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping, at any depth.

    PyYAML keeps the last of two equal keys, so a second ``train:`` section silently dropped the
    first; merge keys (``<<: *base``) still override as YAML intends.
    """
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, typing.Hashable) and key in seen:
                    raise DuplicateKeyError(
                        f"key {key!r} appears twice in one mapping (lines {seen[key]} and "
                        f"{line}); YAML would keep only the last and drop the first silently; "
                        "expected each key once; merge the two into one"
                    )
                seen[key] = line
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass


def _read_config_file(path: Path) -> Any:
    """The YAML at ``path``; a missing, unreadable, non-UTF-8 or malformed file names itself."""
    import yaml

    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} does not exist; pass a path such as configs/demo.yaml"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte {err.object[err.start]:#04x} at "
            f"offset {err.start}); expected a UTF-8 YAML file; save it as UTF-8"
        ) from None
    except OSError as err:
        raise ConfigError(
            f"config file {str(path)!r} cannot be read ({err.strerror}); expected a readable "
            "YAML file; fix its permissions or pass another -c"
        ) from None
    try:
        return _load_yaml(text) or {}
    except DuplicateKeyError as err:
        raise ConfigError(f"config file {str(path)!r}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> RunConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``--set`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        data = _read_config_file(path)
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {str(path)!r} must be a mapping of sections such as train: and "
                f"prune:, got a {type(data).__name__} at its top level; see configs/demo.yaml"
            )
    return from_dict(RunConfig, apply_overrides(data, overrides))


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML text."""
    import yaml

    return yaml.safe_dump(to_dict(config), sort_keys=False)
