"""What a model costs: exact MACs and parameters, and what each channel group and BN layer saves.

What removing one channel group saves: memory (Ye et al. 2018) or MACs, per group.

Both walk the traced channel graph, so grouped, depthwise and flatten->Linear readers count
exactly the weights they hold per channel (a Linear reading a flattened ``C x H x W`` map holds
``H * W`` input positions per channel, each with ``out_features`` weights).

For a group ``g``, over every conv/linear layer ``L`` with ``g`` among its channels:

- ``memory`` (the "memory cost per channel" of Ye et al.'s reference code):
  ``(sum_out k_w k_h c_in/groups + sum_in k'_w k'_h c'_out/groups' + sum_bn H_l W_l) / (I_w I_h)``:
  the weights of the filters ``g`` produces, the weights of every reader's slice that reads ``g``,
  and the area of ``g``'s feature map at each BN that gates it, over the input image area. A
  depthwise conv holds one filter per channel, counted once (as an output).
- ``macs``: the same weights, each multiplied by its layer's output positions per sample
  (:func:`output_positions`: ``H_L W_L`` for a conv, the tokens or pixels of a Linear over the
  last axis, 1 for a Linear on ``(B, C)``, summed over every call of a module called more than
  once): the multiply-accumulates per sample that disappear with the group.

Both are first-order: removing two groups that meet in one layer saves a little less than the sum
(the weights between them are counted twice). They weigh groups against each other; exact MACs of
a pruned model come from :func:`count_macs`.

The exact counters live here too: :func:`count_params`, :func:`count_macs` (one forward pass
under ``FlopCounterMode``) and :func:`count_layer_macs` (the same per module).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from pipeline.graph.channel_graph import ChannelGraph, LayerChannels
from pipeline.layers.bn import bn_modules

COST_FORMS = ("memory", "macs")


def _channels(m: nn.Module, out: torch.Tensor) -> int:
    """How many channels ``m``'s output has along the axis the channel graph reads."""
    if isinstance(m, nn.Linear):
        return m.out_features  # the last axis: (B, F), tokens (B, N, F), channels-last (B, H, W, F)
    if isinstance(m, nn.Conv2d):
        return m.out_channels
    features = getattr(m, "num_features", None)
    return features if isinstance(features, int) else (out.shape[1] if out.dim() > 1 else 1)


def output_positions(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Output positions of one sample at every module, summed over the module's calls.

    A position is one place a layer's channel vector is computed: ``H * W`` for a conv or a BN,
    ``N`` for a Linear over tokens ``(B, N, C)``, ``H * W`` for a channels-last Linear
    ``(B, H, W, C)``, 1 for a Linear on ``(B, C)``. It is what a forward hook sees (the output's
    elements over its channels, on a batch-1 example), so a module called twice counts both
    calls and no layout is assumed.
    """
    positions: Counter[str] = Counter()

    def record(name: str, m: nn.Module, _args: tuple, out: object) -> None:  # returns None
        if isinstance(out, torch.Tensor):
            positions[name] += out.numel() // max(1, _channels(m, out))

    one_sample_with_hooks(model, example, lambda _name, _m: True, record)
    return dict(positions)


def one_sample_with_hooks(
    model: nn.Module,
    example: torch.Tensor,
    hooked: Callable[[str, nn.Module], bool],
    record: Callable[[str, nn.Module, tuple, object], None],
) -> None:
    """One eval, no-grad forward of ``example[:1]`` calling ``record(name, module, inputs,
    output)`` after every module ``hooked`` accepts (``record`` must return None: a forward hook
    that returns a value replaces the output); the hooks are removed and the model's mode
    restored after."""
    hooks = [
        m.register_forward_hook(lambda mod, args, out, name=name: record(name, mod, args, out))
        for name, m in model.named_modules()
        if hooked(name, m)
    ]
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was)


def _weights_per_channel(m: nn.Module, layer: LayerChannels) -> tuple[int, int]:
    """Weights one output channel and one input position of ``m`` hold."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    k = m.kernel_size[0] * m.kernel_size[1]
    per_out = k * m.in_channels // m.groups
    per_in = 0 if layer.depthwise else k * m.out_channels // m.groups
    return per_out, per_in


def group_costs(
    model: nn.Module, graph: ChannelGraph, example: torch.Tensor, form: str = "memory"
) -> dict[int, float]:
    """Raw cost of every group in ``graph`` (all groups, prunable or not), in ``form`` units."""
    if form not in COST_FORMS:
        raise ValueError(f"cost form must be one of {COST_FORMS}, got {form!r}")
    modules, areas = dict(model.named_modules()), output_positions(model, example)
    image_area = example.shape[-1] * example.shape[-2]
    cost: Counter[int] = Counter()
    for name, layer in graph.layers.items():
        area = areas.get(name, 1)
        if layer.kind == "bn":
            if form == "memory":
                for g, n in Counter(layer.out_groups).items():
                    cost[g] += n * area
            continue
        per_out, per_in = _weights_per_channel(modules[name], layer)
        scale = area if form == "macs" else 1
        for g, n in Counter(layer.out_groups).items():
            cost[g] += n * per_out * scale
        for g, n in Counter(layer.in_groups).items():
            cost[g] += n * per_in * scale
    norm = image_area if form == "memory" else 1
    return {g.id: cost[g.id] / norm for g in graph.groups}


class KeptMacs:
    """Exact MACs of a model's conv and linear layers as a function of the groups it keeps.

    A layer's MACs are ``scale * kept_in * kept_out`` (``scale`` = kernel area x output
    positions summed over its calls / conv groups, as a forward hook counts them; a depthwise
    conv: ``scale * kept_out``), so removing two groups that meet in one
    layer saves exactly what it does, unlike the first-order ``group_costs``. ``kept`` may be
    fractional (a group half-way to receding counts half), which makes it a smooth measure of how
    far training has gone. Groups not listed (unprunable) always count as kept.
    """

    def __init__(
        self, model: nn.Module, graph: ChannelGraph, example: torch.Tensor, group_ids: tuple
    ) -> None:
        position = {g: j for j, g in enumerate(group_ids)}
        n = len(group_ids)
        modules, areas = dict(model.named_modules()), output_positions(model, example)
        self._layers: list[tuple[torch.Tensor, torch.Tensor, float, bool]] = []
        for name, layer in graph.layers.items():
            if layer.kind == "bn":
                continue
            m = modules[name]
            kernel = 1 if isinstance(m, nn.Linear) else m.kernel_size[0] * m.kernel_size[1]
            groups = 1 if isinstance(m, nn.Linear) or layer.depthwise else m.groups
            index_in = torch.tensor([position.get(g, n) for g in layer.in_groups])
            index_out = torch.tensor([position.get(g, n) for g in layer.out_groups])
            scale = kernel * areas.get(name, 1) / groups
            self._layers.append((index_in, index_out, scale, layer.depthwise))
        self.dense = self.macs(torch.ones(n))

    def macs(self, kept: torch.Tensor) -> float:
        """MACs per sample when group ``j`` is kept to the extent ``kept[j]`` (0 to 1)."""
        k = torch.cat([kept.double().cpu(), torch.ones(1, dtype=torch.float64)])
        total = 0.0
        for index_in, index_out, scale, depthwise in self._layers:
            out = float(k[index_out].sum())
            total += scale * (out if depthwise else float(k[index_in].sum()) * out)
        return total

    def removed_share(self, kept: torch.Tensor) -> float:
        """Share of the dense MACs that disappears when ``kept`` groups are kept."""
        return 1.0 - self.macs(kept) / max(self.dense, 1e-30)


def _channel_groups(graph: ChannelGraph) -> dict[str, tuple[int, ...]]:
    """BN name -> the group id of each of its channels."""
    return {name: layer.out_groups for name, layer in graph.layers.items() if layer.kind == "bn"}


def layer_costs(
    model: nn.Module, graph: ChannelGraph, example: torch.Tensor, form: str = "memory"
) -> dict[str, float]:
    """Normalised lambda_l, ISTA's penalty weight, for every affine BN in ``model`` (module order).

    For the channels of BN layer l (every affine BN, wherever it sits: after a conv, after a
    concat, pre-activation):

    - ``memory`` (default): the "memory cost per channel" of Ye et al.'s reference code,
      ``lambda_l = (k_w k_h c_{l-1} + sum_{l' reading l} k'_w k'_h c' + H_l W_l) / (I_w I_h)``:
      the weights of the filter producing a channel, the weights of every reader's slice that
      reads it (grouped, depthwise and flatten->Linear readers counted exactly), and the
      channel's feature map area, all over the input image area. Computed per channel group by
      :func:`group_costs` and averaged over the BN's channels (equal to the formula when each
      channel is its own group, as in a VGG).
    - ``flops``: the multiply-accumulates per sample one channel accounts for in its producer
      and its readers (``group_costs(..., "macs")``).

    Deliberate difference from the reference: both are normalised to a mean of 1 over layers,
    so ``rho`` keeps its meaning across models and input sizes.
    """
    if form not in ("memory", "flops"):
        raise ValueError(f"cost form must be 'memory' or 'flops', got {form!r}")
    per_group = group_costs(model, graph, example, "memory" if form == "memory" else "macs")
    channels = _channel_groups(graph)
    raw = {}
    for name in bn_modules(model):
        if name not in channels:
            raise ValueError(
                f"BN {name!r} was not traced into the channel graph, so ISTA cannot weigh it; "
                "check `recede inspect` for barriers around it"
            )
        groups = channels[name]
        raw[name] = sum(per_group[g] for g in groups) / len(groups)
    mean = sum(raw.values()) / max(1, len(raw))
    return {k: v / mean for k, v in raw.items()}


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of one sample, in eval mode.

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs // 2), which counts matrix
    multiplies and convolutions; elementwise ops, norms and pooling are not counted. The count
    is of a second forward pass: a pruned conv's constant-channel correction is a conv over a
    ones map computed once per input size and then added as a stored tensor (as the folded and
    exported model does), so it is not a per-sample cost.

    Args:
        model: The network; a copy is run, so its mode is left alone.
        input_shape: Per-sample shape, e.g. ``(3, 32, 32)``.
    """
    return count_layer_macs(model, input_shape).get("", 0)


def count_layer_macs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """``count_macs`` per module: qualified name -> MACs of one sample inside it ("" is all).

    A module's count includes its children's; a module called twice counts both calls.
    """
    from torch.utils.flop_counter import FlopCounterMode

    net = copy.deepcopy(model).eval()
    param = next(net.parameters(), None)
    x = torch.zeros(1, *input_shape, device=param.device if param is not None else "cpu")
    with torch.no_grad():
        net(x)  # fills per-size caches (a pruned conv's constant correction) the copy lost
        with FlopCounterMode(display=False) as counter:
            net(x)
    root = type(net).__name__ + "."  # the counter names modules "<RootClass>.<qualified name>"
    macs = {"": int(counter.get_total_flops()) // 2}
    for name, by_op in counter.get_flop_counts().items():
        if name.startswith(root):
            macs[name[len(root) :]] = int(sum(by_op.values())) // 2
    return macs
