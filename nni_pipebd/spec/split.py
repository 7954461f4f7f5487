"""Split any traceable model into blocks at named modules (torch.fx), exactly: functional ops between modules stay."""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..plan.cost import forward_macs, layer_macs
from ..plan.partition import balanced_boundaries
from .tracer import TraceError, resolve_autowrap_functions, resolve_leaf_modules, trace_graph

__all__ = ["SplitError", "SplitPoint", "TracedModel", "trace_model", "split_model", "REPEATED_BLOCKS"]

Boundary = Union[int, str]
LeafModule = Union[str, type]
Function = Union[str, Callable]
_NEAR = 6
REPEATED_BLOCKS = 4
"""Blocks the repeated units (encoder layers) of a model whose resolution never drops form by default, at most."""


class SplitError(ValueError):
    """A model cannot be traced, or cannot be split where asked."""


@dataclass(frozen=True)
class SplitPoint:
    """A place where the model can be cut: exactly one tensor flows from everything before it to everything after.

    Attributes
    ----------
    name : str
        The outermost module that starts here (a name of ``model.named_modules()``), or the name of the functional
        op that starts here when no module does.
    position : int
        Index of the first operation after the cut in the traced graph's execution order.
    shape : tuple of int
        Per-sample shape of the tensor crossing the cut (on the probe input).
    macs_before : int
        Estimated multiply-accumulates (convolutions and linear layers) of one sample before the cut.
    """

    name: str
    position: int
    shape: Tuple[int, ...]
    macs_before: int


class TracedModel:
    """A model traced with torch.fx (:func:`~nni_pipebd.spec.tracer.trace_graph`) and run once on a probe input.

    Knows every valid split point (one tensor crossing), which module starts where, and the per-sample shape of
    each value. Build it with :func:`trace_model`.
    """

    def __init__(self, model: nn.Module, graph_module: fx.GraphModule, sample: torch.Tensor):
        self.model = model
        self.graph_module = graph_module
        nodes = list(graph_module.graph.nodes)
        self.ops = [n for n in nodes if n.op not in ("placeholder", "output", "get_attr")]
        position = {n: i for i, n in enumerate(self.ops)}
        inputs = [n for n in nodes if n.op == "placeholder"]
        for n in inputs:
            position[n] = -1
        end = len(self.ops)
        last_use = {n: max((position.get(u, end) if u.op != "output" else end) for u in n.users)
                    for n in list(position) if n.users}
        # Values live across the cut before position p: defined before p and used at or after p.
        live: Dict[fx.Node, None] = {}
        self.crossing: List[List[fx.Node]] = []
        defined = inputs + self.ops
        index = 0
        for p in range(end + 1):
            while index < len(defined) and position[defined[index]] < p:
                if defined[index] in last_use:
                    live[defined[index]] = None
                index += 1
            for n in [n for n in live if last_use[n] < p]:
                del live[n]
            self.crossing.append(list(live))
        self.first: Dict[str, int] = {}
        self.last: Dict[str, int] = {}
        for p, node in enumerate(self.ops):
            for qualname in self._stack(node):
                self.first.setdefault(qualname, p)
                self.last[qualname] = p
        self.node_macs = [self._macs(node) for node in self.ops]
        self.modules = dict(model.named_modules())
        self.sample_shape = tuple(sample.shape[1:])

    @staticmethod
    def _stack(node: fx.Node) -> List[str]:
        """Qualified names of the modules ``node`` runs inside, outermost first."""
        names = [value[0] for value in node.meta.get("nn_module_stack", {}).values()]
        if node.op == "call_module" and (not names or names[-1] != node.target):
            names.append(str(node.target))
        return names

    def _macs(self, node: fx.Node) -> int:
        if node.op != "call_module":
            return 0
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, (tuple, list)) and meta and not hasattr(meta, "shape"):  # nn.MultiheadAttention's pair
            meta = meta[0]
        shape = getattr(meta, "shape", None)
        if shape is None:
            return 0
        module = self.graph_module.get_submodule(str(node.target))
        macs = layer_macs(module, torch.Size(shape)[1:].numel())
        if macs or not any(layer_macs(m, 1) for m in module.modules()):
            return macs
        # a leaf module tracing did not enter (timm's MobileViT or attention blocks): its layers, counted by hooks
        source = node.all_input_nodes[0] if len(node.all_input_nodes) == 1 else None
        shape_in = getattr(source.meta.get("tensor_meta"), "shape", None) if source is not None else None
        if shape_in is None:
            return 0
        try:
            return forward_macs(copy.deepcopy(module).eval(), tuple(shape_in[1:]))
        except (RuntimeError, TypeError, ValueError):  # it needs more than its one traced input: not estimated
            return 0

    def shape(self, position: int) -> Optional[Tuple[int, ...]]:
        """Per-sample shape of the one tensor crossing the cut before ``position`` (None if the cut is not valid)."""
        crossing = self.crossing[position]
        if len(crossing) != 1:
            return None
        meta = crossing[0].meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        return None if shape is None or len(shape) < 1 else tuple(shape[1:])

    def valid(self, position: int) -> bool:
        """Whether the cut before ``position`` is a split point (one tensor crosses, and both sides compute)."""
        return 0 < position < len(self.ops) and self.shape(position) is not None

    def name_at(self, position: int) -> str:
        """The outermost module starting at ``position``, else the functional op there."""
        node = self.ops[position]
        for qualname in self._stack(node):
            if self.first[qualname] == position:
                return qualname
        return node.name

    def split_points(self) -> List[SplitPoint]:
        """Every valid split point, in execution order."""
        points, macs = [], 0
        for p in range(len(self.ops)):
            if self.valid(p):
                points.append(SplitPoint(self.name_at(p), p, self.shape(p), macs))
            macs += self.node_macs[p]
        return points

    @property
    def total_macs(self) -> int:
        return sum(self.node_macs)

    # ---------------------------------------------------------------------------------------------
    # Boundaries
    # ---------------------------------------------------------------------------------------------

    def position(self, boundary: Boundary) -> int:
        """The split position a boundary names: a module name, a functional op's node name, or a child index.

        Raises
        ------
        SplitError
            Unknown name, a module the forward never runs, or a point where not exactly one tensor crosses.
        """
        children = [name for name, _ in self.model.named_children()]
        if isinstance(boundary, int) and not isinstance(boundary, bool):
            if not 0 <= boundary < len(children):
                raise SplitError(f"boundary {boundary} is not a child index of {type(self.model).__name__} "
                                 f"(it has {len(children)} children: {children}); give a module name instead")
            name = children[boundary]
        elif isinstance(boundary, str):
            name = boundary
        else:
            raise SplitError(f"boundary {boundary!r} must be a module name (as in named_modules()) or a child index")
        if name in self.first:
            p = self.first[name]
        else:
            by_node = [p for p, node in enumerate(self.ops) if node.name == name]
            if not by_node:
                if name in self.modules:
                    raise SplitError(f"module {name!r} is never called by {type(self.model).__name__}.forward, so "
                                     f"the model cannot be split there; split points: {self._near(None)}")
                close = difflib.get_close_matches(name, list(self.first), n=_NEAR)
                raise SplitError(f"{type(self.model).__name__} has no module {name!r}; close names: {close or '-'}; "
                                 f"all split points: `nni-pipebd blocks CONFIG`")
            p = by_node[0]
        if p == 0:
            raise SplitError(f"boundary {name!r} is where the model starts; the first block would be empty "
                             f"(boundaries are the first modules of blocks 1..N-1)")
        if not self.valid(p):
            crossing = self.crossing[p]
            why = (f"{len(crossing)} values cross it ({', '.join(n.name for n in crossing)}): the point is inside a "
                   "branch (e.g. a residual connection)" if len(crossing) != 1 else
                   f"the value crossing it ({crossing[0].name}) is not a tensor")
            raise SplitError(f"cannot split {type(self.model).__name__} before {name!r}: {why}; "
                             f"valid split points near it: {self._near(p)}")
        return p

    def _near(self, position: Optional[int]) -> List[str]:
        points = self.split_points()
        if position is not None:
            points = sorted(points, key=lambda s: abs(s.position - position))
        return [s.name for s in points[:_NEAR]]

    def head_start(self) -> int:
        """Where the classifier head begins: at the outermost module holding the last layer with parameters, moved
        back over parameter-free ops outside the feature modules (pooling, flatten) and over trailing pointwise units
        (a 1x1 convolution that widens the last feature map for the classifier, as in MobileNet and EfficientNet)."""
        with_params = [p for p, node in enumerate(self.ops) if self._has_params(node)]
        if not with_params:
            raise SplitError(f"{type(self.model).__name__} has no layer with parameters; give explicit boundaries")
        last = with_params[-1]
        stack = self._stack(self.ops[last])
        head = self.first[stack[0]] if stack and self.valid(self.first[stack[0]]) else max(
            (p for p in range(1, last + 1) if self.valid(p)), default=None)
        if head is None:
            raise SplitError(f"{type(self.model).__name__} has no split point before its last layer "
                             f"({self.ops[last].name}); give explicit boundaries")
        for p in range(head - 1, 0, -1):
            if self._in_parametrised_module(self.ops[p]):
                break
            if self.valid(p):
                head = p
        while True:  # trailing pointwise feature units (a 1x1 conv to the head's width) belong to the head
            unit = self._pointwise_unit_before(head)
            if unit is None:
                break
            head = self.first[unit]
        while not self._pools(self.ops[head]) and self.valid(head + 1):  # activations stay with the features
            head += 1
        return head

    def _pointwise_unit_before(self, position: int) -> Optional[str]:
        """The outermost module ending just before ``position`` if it is a pointwise unit on a feature map: it starts
        at a split point where a map [C, H, W] crosses, and its layers with parameters are 1x1 convolutions and
        normalisations only (no spatial convolution, no linear layer)."""
        for name in self._stack(self.ops[position - 1]):
            first = self.first[name]
            if self.last[name] != position - 1 or first == 0 or name not in self.modules:
                continue
            if not self.valid(first) or len(self.shape(first)) < 3:
                return None
            leaves = [m for m in self.modules[name].modules() if next(m.parameters(recurse=False), None) is not None]
            pointwise = all((isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)) or "Norm" in type(m).__name__
                            for m in leaves)
            return name if pointwise else None
        return None

    def _pools(self, node: fx.Node) -> bool:
        """Whether ``node`` pools or reshapes (changes the shape of its input), as the ops leading to a head do."""
        kind = type(self.graph_module.get_submodule(str(node.target))).__name__ if node.op == "call_module" else \
            getattr(node.target, "__name__", str(node.target))
        if "pool" in kind.lower():
            return True
        shapes = [getattr(n.meta.get("tensor_meta"), "shape", None) for n in (node, *node.all_input_nodes[:1])]
        return shapes[0] is None or len(shapes) < 2 or shapes[0] != shapes[1]

    def _has_params(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return any(True for _ in self.graph_module.get_submodule(str(node.target)).parameters())
        return any(arg.op == "get_attr" for arg in node.all_input_nodes)

    def _in_parametrised_module(self, node: fx.Node) -> bool:
        if self._has_params(node):
            return True
        return any(any(True for _ in self.modules[name].parameters())
                   for name in self._stack(node) if name in self.modules)

    def default_positions(self) -> List[int]:
        """Default split: a new block at each unit that reduces the spatial resolution, and the head.

        Resolutions are compared at the cuts where modules start (the outputs forward hooks would see). A unit is the
        outermost module around a resolution reduction that holds only that reduction and starts and ends at split
        points. A unit with parameters (a strided convolution block) starts the new block; after a parameter-free one
        (pooling) the new block starts at the next split point. A reduction in the first unit (the stem) stays in
        block 0. A model whose resolution never drops (a vision transformer) is split between its repeated units
        instead (:meth:`repeated_positions`). The classifier head (:meth:`head_start`) is the last block.
        """
        head = self.head_start()
        cuts = [0] + [p for p in range(1, head) if self.valid(p) and self.name_at(p) in self.first] + [head]
        shapes = {p: self._feature_shape(p) for p in cuts}
        events = [self._reducing_op(a, b) for a, b in zip(cuts, cuts[1:])
                  if shapes[a] and shapes[b] and len(shapes[a]) == len(shapes[b])
                  and torch.Size(shapes[b][1:]).numel() < torch.Size(shapes[a][1:]).numel()]
        starts = set()
        for event in events:
            start = next(p for p in cuts if p > event)
            for name in self._stack(self.ops[event]):
                first, end = self.first[name], self.last[name] + 1
                inside = sum(1 for e in events if first <= e < end)
                if inside == 1 and (first == 0 or self.valid(first)) and self.valid(end):
                    start = first if any(True for _ in self.modules[name].parameters()) else end
                    break
            if 0 < start < head:
                starts.add(start)
        if not starts:
            starts.update(self.repeated_positions(head))
        return sorted(starts) + [head]

    def repeated_units(self, end: int) -> List[str]:
        """The longest run of sibling modules of one class that follow each other in the forward before ``end``,
        each after the first starting at a split point (a transformer's encoder layers); ties go to the costlier run.
        Empty when no class repeats."""
        siblings: Dict[str, List[str]] = {}
        for name in self.first:
            if name in self.modules and name and self.first[name] < end and self.last[name] < end:
                siblings.setdefault(name.rpartition(".")[0], []).append(name)
        best: List[str] = []

        def cost(run: List[str]) -> int:
            return sum(self.node_macs[self.first[run[0]]:self.last[run[-1]] + 1])

        for names in siblings.values():
            run: List[str] = []
            for name in sorted(names, key=self.first.__getitem__) + [None]:
                if name is not None and run and type(self.modules[name]) is type(self.modules[run[-1]]) and \
                        self.first[name] > self.last[run[-1]] and self.valid(self.first[name]):
                    run.append(name)
                    continue
                if len(run) > 1 and (len(run), cost(run)) > (len(best), cost(best) if best else -1):
                    best = run
                run = [] if name is None else [name]
        return best

    def repeated_positions(self, head: int, blocks: int = REPEATED_BLOCKS) -> List[int]:
        """Where blocks 1..k-1 start when the :meth:`repeated_units` before ``head`` are grouped into ``k = min(
        blocks, units)`` contiguous blocks of balanced MACs: what comes before the first unit (the embedding) is
        costed with it, what follows the last (a final norm) with that one."""
        units = self.repeated_units(head)
        if len(units) < 2:
            return []
        starts = [self.first[name] for name in units]
        costs = [float(sum(self.node_macs[a:b])) for a, b in zip(starts, starts[1:] + [head])]
        costs[0] += sum(self.node_macs[:starts[0]])
        groups = balanced_boundaries(costs, min(blocks, len(units)))
        return [starts[i] for i in groups[1:]]

    def _reducing_op(self, begin: int, end: int) -> int:
        """The first op in ``[begin, end)`` whose output has a lower resolution than its input (else ``begin``)."""
        for p in range(begin, end):
            node = self.ops[p]
            shapes = [getattr(n.meta.get("tensor_meta"), "shape", None) for n in (node, *node.all_input_nodes[:1])]
            if len(shapes) == 2 and all(s is not None and len(s) >= 4 for s in shapes) and \
                    len(shapes[0]) == len(shapes[1]) and shapes[0][2:].numel() < shapes[1][2:].numel():
                return p
        return begin

    def _feature_shape(self, position: int) -> Optional[Tuple[int, ...]]:
        """Per-sample shape of a feature map (at least [C, H, W]) at a cut, the input or the output; else None."""
        if position == 0:
            shape = self.sample_shape
        elif position == len(self.ops):
            shape = getattr(self.ops[-1].meta.get("tensor_meta"), "shape", None)
            shape = None if shape is None else tuple(shape[1:])
        else:
            shape = self.shape(position)
        return shape if shape is not None and len(shape) >= 3 else None

    def split(self, positions: Sequence[int]) -> List[nn.Module]:
        """Blocks cut at ``positions`` (strictly increasing valid split points); their composition is the model."""
        positions = list(positions)
        if any(a >= b for a, b in zip(positions, positions[1:])):
            names = [self.name_at(p) for p in positions]
            raise SplitError(f"boundaries {names} are not in execution order; list them as the forward runs them")
        output = next(n for n in self.graph_module.graph.nodes if n.op == "output")
        bounds = [0] + positions + [len(self.ops)]
        blocks = []
        for k, (begin, end) in enumerate(zip(bounds, bounds[1:])):
            graph = fx.Graph()
            source = self.crossing[begin][0] if begin else next(
                n for n in self.graph_module.graph.nodes if n.op == "placeholder" and n.users)
            env = {source: graph.placeholder(source.name)}

            def lookup(node: fx.Node) -> fx.Node:
                if node not in env and node.op == "get_attr":  # parameters used functionally go where they are used
                    env[node] = graph.node_copy(node)
                return env[node]

            for node in self.ops[begin:end]:
                env[node] = graph.node_copy(node, lookup)
            graph.output(fx.map_arg(output.args[0], lookup) if end == len(self.ops) else env[self.crossing[end][0]])
            blocks.append(fx.GraphModule(self.graph_module, graph, class_name=f"TeacherBlock{k}"))
        return blocks


def trace_model(model: nn.Module, sample: torch.Tensor, leaf_modules: Sequence[LeafModule] = (),
                autowrap_functions: Sequence[Function] = ()) -> TracedModel:
    """Trace ``model`` (in eval mode) with torch.fx and propagate ``sample`` to know every value's shape.

    Parameters
    ----------
    model : torch.nn.Module
        The model; its library's untraceable modules and functions (timm's FX registries) are leaves already.
    sample : torch.Tensor
        A small input batch.
    leaf_modules : sequence of str or type
        More module classes tracing must not enter: classes, import paths or names of classes in the model
        (``model.teacher.leaf_modules``).
    autowrap_functions : sequence of str or callable
        More functions recorded as one node: functions, import paths or names of module-level functions of the
        model's modules (``model.teacher.autowrap_functions``).

    Raises
    ------
    SplitError
        The forward cannot be traced symbolically (the message names the module and code line where tracing broke
        and the config key that fixes it), takes more than one input, or fails on ``sample``.
    """
    training = [m.training for m in model.modules()]
    model.eval()
    try:
        try:
            leaves = [c for c in leaf_modules if isinstance(c, type)] + resolve_leaf_modules(
                model, [c for c in leaf_modules if not isinstance(c, type)])
            functions = [f for f in autowrap_functions if callable(f)] + resolve_autowrap_functions(
                model, [f for f in autowrap_functions if not callable(f)])
            graph_module = trace_graph(model, leaves, functions)
        except TraceError as err:
            raise SplitError(str(err)) from err.__cause__
        inputs = [n.name for n in graph_module.graph.nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise SplitError(f"{type(model).__name__}.forward takes {len(inputs)} inputs ({inputs}); blockwise "
                             "distillation needs a model of one input tensor")
        with torch.no_grad():
            try:
                ShapeProp(graph_module).propagate(sample)
            except Exception as err:  # the model's own error on this input
                raise SplitError(f"{type(model).__name__} fails on an input of shape {tuple(sample.shape)} "
                                 f"({type(err).__name__}: {str(err).splitlines()[-1] if str(err) else err!r}); "
                                 "check the data's image_size and channels against the model") from err
    finally:
        for module, flag in zip(model.modules(), training):
            module.training = flag
    return TracedModel(model, graph_module, sample)


def split_model(model: nn.Module, sample: torch.Tensor,
                boundaries: Optional[Sequence[Boundary]] = None, leaf_modules: Sequence[LeafModule] = (),
                autowrap_functions: Sequence[Function] = ()) -> Tuple[List[nn.Module], List[str]]:
    """Split ``model`` into blocks whose composition computes exactly ``model(x)``.

    Parameters
    ----------
    model : torch.nn.Module
        Any model whose forward torch.fx can trace, with one input tensor (arguments with defaults keep them).
    sample : torch.Tensor
        A small input batch (N, ...) used to find shapes.
    boundaries : sequence of str or int, optional
        The first module of blocks 1..N-1, by name (``named_modules()``, e.g. ``["layer2", "layer3", "fc"]``), by the
        name of a functional op (as listed by :meth:`TracedModel.split_points`), or by index of a direct child.
        Default: :meth:`TracedModel.default_positions`.
    leaf_modules, autowrap_functions : sequence
        Module classes tracing must not enter and functions recorded as one node (see :func:`trace_model`).

    Returns
    -------
    blocks : list of torch.nn.Module
        ``torch.fx.GraphModule`` blocks sharing the model's submodules.
    names : list of str
        The boundary names used (one per block after the first).
    """
    traced = trace_model(model, sample, leaf_modules, autowrap_functions)
    if boundaries is None:
        positions = traced.default_positions()
    else:
        positions = [traced.position(b) for b in boundaries]
    return traced.split(positions), [traced.name_at(p) for p in positions]
