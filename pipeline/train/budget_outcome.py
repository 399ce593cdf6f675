"""Whether a training budget was reached, and what to change when it cannot be or was not.

Two kinds of line come from here: the warning before training that the layer floors cap the
receded share below ``train.target`` (:func:`warn_unreachable`), and the verdict after it
(:func:`budget_outcome`, which the log, ``report.json``'s ``budget`` section and ``report.md``
print). Both print achieved beside target, and both follow two rules so that they can never
contradict themselves:

- compare with a tolerance relative to the target, never a fixed slack: a fixed 0.02 called
  "receded 0.000 of target 0.020" reached;
- print enough digits that two different numbers read differently, and never advise a value
  that reads the same as the current one (float32 group weights once summed the floors' exact
  0.5 to 0.4999999981, and the stock demo advised lowering 0.500 to <= 0.500).
"""

from __future__ import annotations

import logging

from pipeline.config import PruneConfig, TrainConfig

logger = logging.getLogger(__name__)

BUDGET_TOLERANCE = 0.02
"""A receded share at least ``(1 - BUDGET_TOLERANCE) x target`` counts as reached: the share
moves in steps of one group (or of its MACs), and the controller holds it at the target, so a
run that ends a step short has still done what was asked."""

SAME_SHARE = 1e-9
"""Shares (in [0, 1]) this close are the same share: the rounding of a sum of weights."""


def budget_reached(target: float | None, receded: float | None) -> bool | None:
    """Whether training reached ``target`` within the relative tolerance (None without a budget)."""
    if target is None or receded is None:
        return None
    return receded >= target * (1.0 - BUDGET_TOLERANCE)


def below(value: float, target: float) -> bool:
    """Whether ``value`` is really below ``target``, not by rounding alone."""
    return value < target - SAME_SHARE


def shares(*values: float) -> tuple[str, ...]:
    """Shares (in [0, 1]) printed with 3 decimals, or more until two that differ by more than
    ``SAME_SHARE`` read differently and each one above it shows two significant digits
    (``0.0196`` beside ``0.0200``); 11 decimals always suffice."""
    for digits in range(3, 12):
        text = [f"{v:.{digits}f}" for v in values]
        distinct = all(
            a != b or abs(x - y) <= SAME_SHARE
            for (a, x) in zip(text, values, strict=True)
            for (b, y) in zip(text, values, strict=True)
        )
        legible = all(abs(v) <= SAME_SHARE or abs(v) >= 10 ** (1 - digits) for v in values)
        if distinct and legible:
            break
    return tuple(text)


def floor_advice(prune: PruneConfig | None, most: float) -> str:
    """What can still be changed when the layer floors cap the receded share at ``most``:
    never a key already at its limit (``prune.max_layer_ratio`` 1, ``prune.min_channels`` 1),
    and never a target of 0 or one that reads as high as the current one (the caller checks
    that ``most`` is below it)."""
    ratio = prune.max_layer_ratio if prune is not None else 0.0
    floor = prune.min_channels if prune is not None else 2
    changes = []
    if ratio < 1.0:
        changes.append("raise prune.max_layer_ratio")
    if floor > 1:
        changes.append("lower prune.min_channels")
    if float(most) > 0.0:  # the printed value: train.target must be above 0
        changes.append(f"lower train.target to <= {most}")
    if not changes:
        return "the model's layers are too narrow for any budget: set train.target to null"
    return ", or ".join(changes)


def warn_unreachable(cfg: TrainConfig, prune: PruneConfig, reachable: float) -> bool:
    """Log a warning, before any training, when the layer floors (``prune.min_channels``,
    ``prune.max_layer_ratio``) cap the receded share below ``cfg.target``; return whether
    they do."""
    if cfg.target is None or not below(reachable, cfg.target):
        return False
    want, most = shares(cfg.target, reachable)
    logger.warning(
        "train.target %s cannot be reached: prune.min_channels %d and prune.max_layer_ratio "
        "%s let at most %s of the %s recede, and the strength would climb to its cap "
        "chasing the rest; %s",
        want,
        prune.min_channels,
        f"{prune.max_layer_ratio:g}",
        most,
        "MACs" if cfg.target_cost == "macs" else "prunable groups",
        floor_advice(prune, most),
    )
    return True


def budget_outcome(
    target: float | None,
    receded: float | None,
    reachable: float | None = None,
    prune: PruneConfig | None = None,
) -> str:
    """One line: whether training reached its budget (achieved beside target), and what to
    change when it did not.

    ``reachable`` (the most the layer floors let recede, known before training) picks the
    advice: a target above it needs looser floors or a lower target, as training longer cannot
    help; otherwise training ran out of time (more epochs) or the target is too ambitious.
    ``prune`` (the floors trained against; None: unknown) leaves out advice to move a key
    already at its limit.
    """
    reached = budget_reached(target, receded)
    if reached is None:
        return "no budget (train.target is null): fixed penalty strength"
    got, want = shares(receded, target)
    if reached:
        within = "" if receded >= target else f" (within the {BUDGET_TOLERANCE:.0%} tolerance)"
        return f"budget reached: receded {got} of target {want}{within}"
    if reachable is not None and below(reachable, target * (1.0 - BUDGET_TOLERANCE)):
        most = shares(reachable, target)[0]
        fix = f"the layer floors let at most {most} recede: {floor_advice(prune, most)}"
    elif prune is not None and prune.max_layer_ratio >= 1.0:
        fix = "train longer (train.epochs) or lower train.target"
    else:
        fix = "train longer (train.epochs), raise prune.max_layer_ratio, or lower train.target"
    return f"budget MISSED: receded {got}, target {want}; {fix}"
