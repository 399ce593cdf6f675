"""Tracing a model into a ``torch.fx`` graph whose module boundaries key the pruning plan.

``trace_with_leaves`` tries plain symbolic tracing (torch.nn layers, bounded BN and BN
subclasses such as timm's ``BatchNormAct2d`` stay leaves), then tracing with the example's
values beside every proxy (branches on shapes and devices resolve), then keeps the submodule
that still fails whole, found from the traceback. ``pipeline.graph.channel_graph`` pins what is kept
whole as a barrier.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Collection

import torch
import torch.fx as fx
from torch import nn
from torch.fx.experimental.meta_tracer import MetaProxy, MetaTracer

from pipeline.layers.bn import BN_TYPES

logger = logging.getLogger(__name__)


class GraphError(ValueError):
    """The model cannot be traced or has nothing to prune. The message says why and what to do."""


MAX_FALLBACK_LEAVES = 64  # retries of the tracing fallback before giving up


class _Leaves:
    """Which modules the tracers keep whole (mixed into both tracers below)."""

    leaves: frozenset[str] = frozenset()  # submodules kept whole because fx cannot trace them

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # Subclasses of torch.nn layers (bounded BN, corrected convs) stay whole, like their bases;
        # so do BN subclasses such as timm's BatchNormAct2d (see pipeline.layers.bn_act).
        return (
            qualname in self.leaves
            or isinstance(m, (*BN_TYPES, nn.Conv2d, nn.Linear))
            or super().is_leaf_module(m, qualname)  # type: ignore[misc]
        )


class _Tracer(_Leaves, fx.Tracer):
    def __init__(self, leaves: Collection[str] = ()) -> None:
        super().__init__()
        self.leaves = frozenset(leaves)


class _ValueProxy(MetaProxy):
    """A proxy that knows its value's device (``MetaProxy`` answers a placeholder "meta") and
    its size along dim 0 (``MetaProxy.size(0)`` tests ``if dim``, so it returned the whole
    shape and ``x.size(0)`` was recorded as ``x.size()``)."""

    def size(self, dim: int | None = None) -> object:
        args = () if dim is None else (dim,)
        value = getattr(self, "_tensor_meta", None)
        if value is not None:
            return value.size(*args)
        return self.tracer.create_proxy("call_method", "size", (self, *args), {})

    @property
    def device(self) -> torch.device:
        value = getattr(self, "_tensor_meta", None)
        return value.device if value is not None else super().device


class _ShapeTracer(_Leaves, MetaTracer):
    """fx tracing with the example's concrete values beside every proxy.

    torch's ``MetaTracer`` carries meta tensors; here it carries the real example instead
    (batch 1), because leaf modules run their own forward on it with their real parameters.

    ``x.shape[-1] < 7`` then evaluates to a plain bool, so branches on shapes, as in timm's VGG
    ``ConvMlp``, trace; the graph is specialised to the example's shape. That is enough here:
    the graph only tells which channels move together, and ``remove_groups`` verifies the
    removal at the example and at a larger size.
    """

    allow_insert_stateless_mods = False  # never add modules to the user's model

    def __init__(self, leaves: Collection[str], example: torch.Tensor) -> None:
        super().__init__()
        self.leaves = frozenset(leaves)
        self.example = example
        self._running_leaf = False

    def proxy(self, node: fx.Node) -> MetaProxy:
        return _ValueProxy(node, self)

    def create_proxy(self, kind: str, target, args, kwargs, *rest, **more) -> MetaProxy:  # noqa: ANN001
        # MetaTracer computes a leaf module's value by running its forward; the submodules that
        # forward calls (a BatchNormAct2d's activation, an opaque block's convs) must run as
        # plain code then, not be recorded as nodes of the graph being traced.
        self._running_leaf = kind == "call_module"
        try:
            return super().create_proxy(kind, target, args, kwargs, *rest, **more)
        finally:
            self._running_leaf = False

    def call_module(self, m: nn.Module, forward, args, kwargs):  # noqa: ANN001, ANN201
        if self._running_leaf:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def trace(self, root: nn.Module, concrete_args=None) -> fx.Graph:  # noqa: ANN001
        first = next(iter(inspect.signature(root.forward).parameters))
        meta = {first: self.example}
        with warnings.catch_warnings(), torch.no_grad():  # values only; no autograd history
            warnings.simplefilter("ignore")  # "Could not compute metadata" where a value fails
            return super().trace(root, meta_args=meta, concrete_args=concrete_args)


def _offending_submodule(model: nn.Module, err: BaseException) -> str | None:
    """Qualified name of the innermost submodule whose ``forward`` was running when fx failed.

    Read from the traceback's frames: a frame whose ``self`` is one of ``model``'s submodules is
    that module's code. ``None`` when the failure is in the root module's own forward.
    """
    names = {id(m): n for n, m in model.named_modules() if n}
    found, tb = None, err.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if id(owner) in names:
            found = names[id(owner)]
        tb = tb.tb_next
    return found


def trace_with_leaves(
    model: nn.Module, example: torch.Tensor | None = None
) -> tuple[fx.GraphModule, dict[str, str]]:
    """fx-trace ``model``; what fx cannot trace is retried with shapes, then kept whole.

    First plain symbolic tracing. If that fails and an ``example`` is given, tracing is retried
    with the example's concrete shapes (``_ShapeTracer``: control flow on shapes resolves). A
    submodule that still fails is retried as a leaf (an opaque module), found from the
    traceback. Returns the graph module and ``{submodule: why it was kept whole}``. The channel
    graph pins the inputs and outputs of those leaves as barriers, so an untraceable corner
    costs only its own channels.

    Raises:
        GraphError: the root module's own forward is untraceable, or the fallback gives up.
    """
    leaves: dict[str, str] = {}
    with_shapes = False
    while True:
        try:
            tracer = _ShapeTracer(leaves, example) if with_shapes else _Tracer(leaves)
            graph = tracer.trace(model)
            if with_shapes:
                logger.info("traced with the example's shapes %s", tuple(example.shape))
            return fx.GraphModule(model, graph, class_name=type(model).__name__), leaves
        except Exception as err:  # fx raises many types; re-raise with guidance
            if example is not None and not with_shapes:
                with_shapes = True  # retry whole, with concrete shapes, before keeping parts whole
                continue
            culprit = _offending_submodule(model, err)
            if culprit is None or culprit in leaves or len(leaves) >= MAX_FALLBACK_LEAVES:
                raise GraphError(
                    f"torch.fx could not trace {type(model).__name__}"
                    + (f" (kept whole: {', '.join(leaves)})" if leaves else "")
                    + f": {type(err).__name__}: {err}. Data-dependent Python control flow is "
                    "not traceable; wrap that part in a leaf module or make the branch depend "
                    "on constructor arguments only."
                ) from err
            first = (str(err).strip().splitlines() or [""])[0][:120]
            leaves[culprit] = f"torch.fx cannot trace it: {type(err).__name__}: {first}"
            logger.info("tracing fallback: keeping %s whole (%s)", culprit, leaves[culprit])


def trace(model: nn.Module) -> fx.GraphModule:
    """fx-trace ``model`` keeping torch.nn layers, BN subclasses and untraceable parts as leaves."""
    return trace_with_leaves(model)[0]
