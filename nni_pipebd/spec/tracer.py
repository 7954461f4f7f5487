"""The torch.fx tracer of a split: the leaf modules and functions a model's library (timm) and its user declare."""

from __future__ import annotations

import difflib
import inspect
import os
import sys
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import fx, nn

from ..imports import ImportPathError, import_object

__all__ = ["TraceError", "LeafTracer", "library_notrace", "resolve_leaf_modules", "resolve_autowrap_functions",
           "concrete_defaults", "trace_graph"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.abspath(__file__))
_NEAR = 4


class TraceError(ValueError):
    """A model cannot be traced symbolically, or a leaf module / autowrapped function named for it does not exist."""


def library_notrace() -> Tuple[List[type], List[Callable]]:
    """The modules and functions model libraries declare untraceable: timm's FX registries
    (``timm.layers._fx.get_notrace_modules()`` / ``get_notrace_functions()``), the lists its own feature extractor
    traces with. timm is never imported here: a timm model has imported it already (else the lists are empty).
    torchvision declares none (its models trace as they are)."""
    if "timm" not in sys.modules:
        return [], []
    try:
        from timm.layers import _fx
    except ImportError:  # a timm without FX registries (older than 0.9)
        return [], []
    return list(_fx.get_notrace_modules()), list(_fx.get_notrace_functions())


def _classes_in(model: nn.Module) -> Dict[str, List[type]]:
    found: Dict[str, List[type]] = {}
    for module in model.modules():
        for cls in type(module).__mro__:
            if cls is nn.Module:
                break
            if cls not in found.setdefault(cls.__name__, []):
                found[cls.__name__].append(cls)
    return found


def resolve_leaf_modules(model: nn.Module, names: Sequence[str], key: str = "model.teacher.leaf_modules",
                         base_dir: Optional[str] = None) -> List[Type[nn.Module]]:
    """The module classes ``names`` denote: import paths (``package.module.Class``) or names of classes in ``model``.

    Raises
    ------
    TraceError
        A name that neither imports nor names a class of the model's modules (the message lists close names), or
        an import path that is not an ``nn.Module`` subclass.
    """
    classes = _classes_in(model)
    resolved = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise TraceError(f"{key} = {list(names)!r}: {name!r} is not a class name or import path")
        if name in classes:
            resolved.extend(classes[name])
            continue
        if "." not in name and ":" not in name:
            close = difflib.get_close_matches(name, list(classes), n=_NEAR)
            raise TraceError(f"{key}: {type(model).__name__} has no module of class {name!r}; close names: "
                             f"{close or '-'}; give a class of the model or an import path (package.module.Class)")
        try:
            cls = import_object(name, key, base_dir)
        except ImportPathError as err:
            raise TraceError(str(err)) from None
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TraceError(f"{key}: {name!r} is a {type(cls).__name__}, not a torch.nn.Module class")
        resolved.append(cls)
    return resolved


def _functions_in(model: nn.Module) -> Dict[str, Callable]:
    """Module-level functions the model's module classes can call: the globals of their modules."""
    found: Dict[str, Callable] = {}
    for cls in {cls for group in _classes_in(model).values() for cls in group}:
        for name, value in vars(sys.modules.get(cls.__module__, object)).items():
            if inspect.isfunction(value) and value.__module__ == cls.__module__:
                found.setdefault(name, value)
    return found


def resolve_autowrap_functions(model: nn.Module, names: Sequence[str], key: str = "model.teacher.autowrap_functions",
                               base_dir: Optional[str] = None) -> List[Callable]:
    """The functions ``names`` denote: import paths (``package.module:function``) or names of module-level
    functions in the modules that define the model's classes.

    Raises
    ------
    TraceError
        A name that neither imports nor is such a function (the message lists close names).
    """
    functions = None
    resolved = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise TraceError(f"{key} = {list(names)!r}: {name!r} is not a function name or import path")
        if "." in name or ":" in name:
            try:
                resolved.append(import_object(name, key, base_dir))
            except ImportPathError as err:
                raise TraceError(str(err)) from None
            continue
        functions = _functions_in(model) if functions is None else functions
        if name not in functions:
            close = difflib.get_close_matches(name, list(functions), n=_NEAR)
            raise TraceError(f"{key}: no function {name!r} in the modules of {type(model).__name__}'s classes; "
                             f"close names: {close or '-'}; give an import path (package.module:function)")
        resolved.append(functions[name])
    return resolved


def concrete_defaults(model: nn.Module) -> Dict[str, Any]:
    """The arguments of ``model.forward`` that have defaults, bound to them (torch.fx ``concrete_args``): only
    arguments without a default are inputs (timm's ``VisionTransformer.forward(x, attn_mask=None, is_causal=False)``
    takes one)."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in parameters if p.kind in kinds and p.default is not inspect.Parameter.empty}


class LeafTracer(fx.Tracer):
    """A :class:`torch.fx.Tracer` that does not enter ``leaf_modules`` (besides torch's own) and records calls of
    ``autowrap_functions`` as single nodes, as timm's feature extractor traces; it remembers the module it was in
    when tracing failed.

    Parameters
    ----------
    leaf_modules : sequence of type
        Module classes (and their subclasses) that become one ``call_module`` node each.
    autowrap_functions : sequence of callable
        Module-level functions that become one ``call_function`` node each.
    """

    def __init__(self, leaf_modules: Sequence[type] = (), autowrap_functions: Sequence[Callable] = ()):
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self.leaf_modules = tuple(leaf_modules)
        self.path: List[Tuple[str, nn.Module]] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaf_modules) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: Tuple, kwargs: Dict[str, Any]) -> Any:
        self.path.append((self.path_of_module(m), m))
        out = super().call_module(m, forward, args, kwargs)
        self.path.pop()  # not on failure: the path then names the module tracing broke in
        return out


def _drop_concrete_placeholders(graph: fx.Graph, model: nn.Module, names: Sequence[str]) -> None:
    """Remove the placeholders torch.fx keeps for ``concrete_args`` together with the checks on them (they guard
    the specialised values and feed nothing the output needs), so the graph has the real inputs only.

    torch.fx makes one placeholder per parameter of ``forward``, in order (renamed when a name is taken)."""
    parameters = list(inspect.signature(model.forward).parameters)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(parameters) != len(placeholders):
        return
    output = next(n for n in graph.nodes if n.op == "output")
    order = {n: i for i, n in enumerate(graph.nodes)}
    for parameter, node in zip(parameters, placeholders):
        if parameter not in names:
            continue
        closure, frontier = set(), [node]
        while frontier:
            current = frontier.pop()
            if current not in closure:
                closure.add(current)
                frontier.extend(current.users)
        if output in closure:
            continue  # the bound default reaches the output: leave the graph as traced
        for dead in sorted(closure, key=order.__getitem__, reverse=True):
            graph.erase_node(dead)


def _where(err: BaseException) -> Tuple[Optional[traceback.FrameSummary], Optional[traceback.FrameSummary]]:
    """The frames of ``err``'s traceback outside torch and this package (the model's code): the innermost one (where
    tracing broke) and the outermost function the last ``forward`` there called on the way (what to autowrap)."""
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if not os.path.abspath(f.filename).startswith((_TORCH_DIR, _OWN_DIR))]
    if not frames:
        return None, None
    forwards = [i for i, f in enumerate(frames) if f.name == "forward"]
    called = frames[forwards[-1] + 1:] if forwards else frames
    return frames[-1], next((f for f in called if f.name not in ("<module>", "<lambda>", "<genexpr>")), None)


def _failure(model: nn.Module, tracer: LeafTracer, err: Exception) -> TraceError:
    """The error for a failed trace: where it broke (module, file, line, code) and the config key that fixes it."""
    first = str(err).splitlines()[0] if str(err) else repr(err)
    frame, outer = _where(err)
    inside = [(name, module) for name, module in tracer.path if name]
    parts = [f"cannot trace {type(model).__name__}.forward with torch.fx ({type(err).__name__}: {first})"]
    if inside:
        name, module = inside[-1]
        parts.append(f" inside module {name!r} ({type(module).__name__})")
    if frame is not None:
        parts.append(f" at {frame.filename}:{frame.lineno} in {frame.name}(): `{(frame.line or '').strip()}`")
    hints = []
    if outer is not None:
        module_name = next((m for m, mod in list(sys.modules.items())
                            if getattr(mod, "__file__", None) and os.path.abspath(mod.__file__)
                            == os.path.abspath(outer.filename)), None)
        candidate = getattr(sys.modules.get(module_name or ""), outer.name, None)
        if inspect.isfunction(candidate):
            hints.append(f"model.teacher.autowrap_functions: [{module_name + ':' + outer.name!r}] (calls of it "
                         "become one node)")
    if inside:
        cls = type(inside[-1][1])
        hints.append(f"model.teacher.leaf_modules: [{cls.__module__ + '.' + cls.__qualname__!r}] (tracing does not "
                     "enter it; the split cannot cut inside it)")
    if not hints:
        hints.append("make the forward traceable (no Python control flow on tensor values), or move the untraceable "
                     "part into a module and list its class in model.teacher.leaf_modules")
    return TraceError("".join(parts) + "; fix: " + " or ".join(hints))


def trace_graph(model: nn.Module, leaf_modules: Sequence[type] = (),
                autowrap_functions: Sequence[Callable] = ()) -> fx.GraphModule:
    """Trace ``model`` with :class:`LeafTracer`: the library's declarations (:func:`library_notrace`) plus
    ``leaf_modules`` and ``autowrap_functions``, the forward's defaulted arguments bound (:func:`concrete_defaults`).

    Raises
    ------
    TraceError
        The forward cannot be traced; the message names the module and the code line where tracing broke and
        the config key (``model.teacher.leaf_modules`` / ``autowrap_functions``) that fixes it.
    """
    modules, functions = library_notrace()
    tracer = LeafTracer(modules + list(leaf_modules), functions + list(autowrap_functions))
    concrete = concrete_defaults(model)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as err:  # fx raises TraceError, TypeError, NotImplementedError, ... on untraceable code
        raise _failure(model, tracer, err) from err
    _drop_concrete_placeholders(graph, model, list(concrete))
    graph.lint()
    return fx.GraphModule(tracer.root, graph, type(model).__name__)
