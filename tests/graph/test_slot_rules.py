"""The slot engine's rule registry: every op handled before has a rule, an op without one is a
barrier, and registering a rule is all it takes to make an op pass channels through."""

import copy

import pytest
import torch
from torch import nn

from pipeline.graph import slot_rules
from pipeline.graph.channel_graph import build_channel_graph
from pipeline.graph.channel_slots import SlotInterpreter  # noqa: F401 - loads the registered rules
from pipeline.graph.slot_layers import batch_norm, conv, linear
from pipeline.graph.slot_rules import MODULE_OPS, Slots, module_rule, op_rule, register_op
from pipeline.prune.plan import make_plan
from pipeline.prune.remove import apply_plan_, zero_groups_

# The op names the interpreter's if-chain handled before the registry (its eight tables).
HANDLED_BEFORE = {
    *[
        "relu",
        "relu_",
        "relu6",
        "leaky_relu",
        "elu",
        "selu",
        "celu",
        "gelu",
        "silu",
        "mish",
        "hardswish",
        "hardtanh",
        "tanh",
    ],
    *[
        "dropout",
        "dropout2d",
        "neg",
        "abs",
        "identity",
        "contiguous",
        "clone",
        "detach",
        "float",
        "half",
        "double",
        "to",
    ],
    *["type", "type_as", "softsign", "tanhshrink", "stochastic_depth"],
    *["sigmoid", "hardsigmoid", "exp", "softplus", "cos", "sigmoid_"],
    *[
        "max_pool2d",
        "avg_pool2d",
        "adaptive_avg_pool2d",
        "adaptive_max_pool2d",
        "interpolate",
        "upsample",
    ],
    *["pad", "max_pool1d", "avg_pool1d", "adaptive_avg_pool1d"],
    *[
        "view",
        "reshape",
        "permute",
        "transpose",
        "flatten",
        "unflatten",
        "squeeze",
        "unsqueeze",
        "expand",
        "expand_as",
    ],
    *[
        "cat",
        "concat",
        "stack",
        "split",
        "chunk",
        "unbind",
        "narrow",
        "t",
        "movedim",
        "getitem",
        "__getitem__",
        "roll",
    ],
    *["flip", "repeat"],
    *[
        "add",
        "add_",
        "iadd",
        "__add__",
        "__radd__",
        "__iadd__",
        "sub",
        "sub_",
        "isub",
        "__sub__",
        "__rsub__",
    ],
    *[
        "mul",
        "mul_",
        "imul",
        "__mul__",
        "__rmul__",
        "__imul__",
        "truediv",
        "div",
        "div_",
        "__truediv__",
    ],
    *["mean", "sum", "amax", "amin"],
}


def test_registry_covers_every_op_handled_before():
    assert slot_rules.registered_ops() >= HANDLED_BEFORE
    assert set(MODULE_OPS.values()) <= slot_rules.registered_ops()
    assert op_rule("erf") is None  # an op nobody registered stays unknown


def test_layer_rules_follow_subclasses():
    class MyConv(nn.Conv2d):
        pass

    assert module_rule(MyConv(3, 3, 1)) is conv
    assert module_rule(nn.Linear(2, 2)) is linear
    assert module_rule(nn.BatchNorm2d(2)) is batch_norm
    assert module_rule(nn.BatchNorm3d(2)) is None  # no rule: a barrier, never guessed
    assert module_rule(nn.ReLU()) is None  # named by MODULE_OPS, handled by the op rule


def test_an_op_has_one_rule():
    with pytest.raises(ValueError, match="already has the rule"):
        register_op("relu")(lambda interp, n, op, value: None)


class Erf(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.b2(self.c2(torch.erf(self.b1(self.c1(x)))))


def _b1_groups(graph):
    return [g for g in graph.prunable_groups if any(n == "b1" for n, _ in g.bn_channels)]


def test_registering_a_rule_makes_an_unknown_op_pass_channels(monkeypatch):
    torch.manual_seed(0)
    model, x = Erf().eval(), torch.randn(2, 3, 4, 4)
    graph = build_channel_graph(model, x)
    assert [b.op for b in graph.barriers] == ["erf (unknown op)"] and not _b1_groups(graph)

    monkeypatch.setattr(slot_rules, "_OP_RULES", dict(slot_rules._OP_RULES))

    @register_op("erf")
    def erf(interp, n, op, value):  # erf(0) == 0: ids and flags pass through
        x = interp.tensor_args(n)[0]
        return Slots(x.ids, x.zero, x.const)

    graph = build_channel_graph(model, x)
    groups = _b1_groups(graph)
    assert not graph.barriers and len(groups) == 4
    masked = zero_groups_(copy.deepcopy(model), graph, [groups[0].id], shifts=[groups[0].id])
    pruned = apply_plan_(copy.deepcopy(model), make_plan(graph, [groups[0].id]))
    with torch.no_grad():
        assert torch.allclose(pruned(x), masked(x), atol=1e-6)
        assert pruned.c2.in_channels == 3
