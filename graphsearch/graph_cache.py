"""The analysis cache: a model's channel graph kept on disk, so that a repeated `inspect`,
`export` or `optimize --resume` does not trace and analyse the model again.

The key is everything the analysis reads: the model's code (every source file that defines
one of its module classes, model.py included), its weights' names, shapes and dtypes (not
their values: training does not change the graph), the example inputs' shapes and dtypes,
the rules (each registered target with its rule's name, and the files of rules defined
outside graphsearch) and graphsearch's own code (a digest of its files: another version
analyses again). A change of any of them is a new key; old entries are simply not read.

An entry is the `ChannelGraph` pickled without the model: the model's submodules,
parameters and buffers, and the rules, are written as references (their names) and bound
to the current model's and rules' on load, so the graph shares them with the model exactly
as a fresh analysis does. The fx module is rebuilt around its saved graph
(`fx.GraphModule(modules, graph)`, no tracing). The analysis' warnings (a submodule fx could
not trace, ...) are kept with the entry and given again on a hit. An entry that cannot be
read (damaged, from another Python) is analysed afresh and written again.

The folder: `$GRAPHSEARCH_CACHE/analysis` (default `~/.cache/graphsearch/analysis`);
`GRAPHSEARCH_ANALYSIS_CACHE=0` turns the cache off.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import io
import os
import pickle
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from . import checkpoint
from .analysis import analyze
from .graph import ChannelGraph
from .rules import Rules, default_rules
from .rules.registry import describe

VERSION = 1
_PACKAGE = Path(__file__).resolve().parent
_OWN_CODE: list[str] = []  # graphsearch's digest, computed once per process


def cache_folder() -> Path | None:
    """Where entries live (None: the cache is off)."""
    if os.environ.get("GRAPHSEARCH_ANALYSIS_CACHE", "1") == "0":
        return None
    return checkpoint.cache_root() / "analysis"


def analyze_cached(model: nn.Module, example_inputs, rules: Rules | None = None,
                   folder: str | os.PathLike | None = None) -> tuple[ChannelGraph, bool]:
    """`analysis.analyze(model, example_inputs, rules)`, served from the cache when an entry
    with the same key is there; returns (graph, True if it came from the cache).
    `folder`: the cache folder (default `cache_folder()`)."""
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    rules = rules if rules is not None else default_rules()
    folder = Path(folder) if folder is not None else cache_folder()
    key = cache_key(model, example_inputs, rules) if folder is not None else None
    if key is None:  # off, or code whose files cannot be found (a class made in __main__)
        return analyze(model, example_inputs, rules), False
    path = folder / f"{key}.pkl"
    if path.exists():
        got = _load(path, model, rules)
        if got is not None:
            graph, said = got
            for message in said:
                warnings.warn(message, stacklevel=2)
            return graph, True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = analyze(model, example_inputs, rules)
    said = [str(w.message) for w in caught]
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    try:
        blob = _dump(graph, said, model, rules)
    except Exception:  # noqa: BLE001 - pickling raises PicklingError, TypeError, RuntimeError
        # a graph that holds objects pickle cannot write (one torch.export traced keeps
        # pybind11 functions) is not cached: each run analyses it again, nothing is wrong
        return graph, False
    try:
        checkpoint.write_atomic(path, blob)
    except Exception as exc:  # noqa: BLE001 - a cache that cannot be written costs only time
        warnings.warn(f"graphsearch: the analysis cache was not written ({exc})", stacklevel=2)
    return graph, False


# --------------------------------------------------------------------------- the key


def cache_key(model: nn.Module, example_inputs, rules: Rules) -> str | None:
    """The entry's name; None when some of the model's code has no file to read."""
    files = _code_files(model, rules)
    if files is None:
        return None
    h = hashlib.sha256(f"graphsearch-analysis:{VERSION}:{torch.__version__}".encode())
    h.update(_own_code().encode())
    for f in sorted(files):
        h.update(f.encode())
        try:
            h.update(hashlib.sha256(Path(f).read_bytes()).digest())
        except OSError:
            h.update(b"?")
    h.update(type(model).__qualname__.encode())
    for name, t in sorted(model.state_dict(keep_vars=True).items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
    for x in example_inputs:
        h.update((f"{tuple(x.shape)}:{x.dtype}" if isinstance(x, torch.Tensor)
                  else repr(x)).encode())
    for target, rule in sorted(((describe(t), r.name) for t, r in rules.items())):
        h.update(f"{target}={rule}\n".encode())
    return h.hexdigest()[:32]


def _own_code() -> str:
    """A digest of graphsearch's own files (the analysis, rules, passes and all)."""
    if not _OWN_CODE:
        h = hashlib.sha256()
        passes = importlib.util.find_spec("graphsearch.passes")  # the folder, not imported
        roots = [_PACKAGE, *(Path(p).resolve() for p in passes.submodule_search_locations)]
        for root in dict.fromkeys(roots):
            for f in sorted(root.rglob("*.py")):
                h.update(str(f.relative_to(root)).encode())
                h.update(f.read_bytes())
        _OWN_CODE.append(h.hexdigest())
    return _OWN_CODE[0]


def _code_files(model: nn.Module, rules: Rules) -> set[str] | None:
    """The source files of the model's module classes and of rules from outside graphsearch
    (torch's own files are covered by its version); None if one of them has none."""
    files = set()
    things = [type(m) for m in model.modules()]
    things += [r.tie for _, r in rules.items()]
    for thing in things:
        module = sys.modules.get(getattr(thing, "__module__", "") or "")
        if getattr(module, "__name__", "").split(".")[0] in ("torch", "graphsearch", "builtins"):
            continue
        try:
            f = inspect.getsourcefile(thing)
        except TypeError:
            f = None
        if not f or not Path(f).is_file():
            return None
        files.add(str(Path(f).resolve()))
    return files


# --------------------------------------------------------------------------- the entry


def _objects(model: nn.Module, rules: Rules):
    """(object, name) for everything an entry refers to instead of holding: the rules and
    each rule's functions, the model's submodules, parameters and buffers."""
    yield rules, ("rules",)
    for target, rule in rules.items():
        key = describe(target)
        yield rule, ("rule", key)
        for f in dataclasses.fields(rule):
            value = getattr(rule, f.name)
            if callable(value):
                yield value, ("rule", key, f.name)
    for name, m in model.named_modules(remove_duplicate=False):
        yield m, ("module", name)
    for name, t in model.named_parameters(remove_duplicate=False):
        yield t, ("tensor", name)
    for name, t in model.named_buffers(remove_duplicate=False):
        yield t, ("tensor", name)


def _references(model: nn.Module, rules: Rules) -> dict[int, tuple]:
    refs: dict[int, tuple] = {}
    for obj, ref in _objects(model, rules):
        refs.setdefault(id(obj), ref)
    return refs


def _resolve(model: nn.Module, rules: Rules) -> dict[tuple, Any]:
    return {ref: obj for obj, ref in _objects(model, rules)}


def _new_graph_module() -> fx.GraphModule:
    return fx.GraphModule.__new__(fx.GraphModule)


def _fill_graph_module(gm: fx.GraphModule, state: tuple) -> None:
    """The saved fx module rebuilt around its graph, its attributes the ones it had (the
    model's own submodules and tensors, by reference): no tracing. Filled in after the
    graph, which refers back to it, is whole."""
    children, parameters, buffers, graph, class_name = state
    holder = nn.Module()
    holder._modules.update(children)
    holder._parameters.update(parameters)
    holder._buffers.update(buffers)
    fx.GraphModule.__init__(gm, holder, graph, class_name)


_NUMPY_DTYPES = {torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
                 torch.float64, torch.float32, torch.float16}


def _meta_tensor(shape, stride, dtype) -> torch.Tensor:
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


def _module_attribute(fn) -> tuple | None:
    """("attribute", module, name) when the module `fn` names holds it under a name (a
    function made by a factory at import time cannot be pickled by its qualified name)."""
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    for name, value in vars(module).items() if module is not None else ():
        if value is fn:
            return ("attribute", module.__name__, name)
    return None


class _Writer(pickle.Pickler):
    def __init__(self, f, refs):
        super().__init__(f, protocol=pickle.HIGHEST_PROTOCOL)
        self.refs = refs

    def persistent_id(self, obj):
        ref = self.refs.get(id(obj))
        if ref is None and isinstance(obj, types.FunctionType) and "<locals>" in obj.__qualname__:
            ref = _module_attribute(obj)  # e.g. F.max_pool2d, made by torch's boolean_dispatch
        return ref

    def reducer_override(self, obj):
        if isinstance(obj, fx.GraphModule) and id(obj) not in self.refs:
            state = (dict(obj._modules), dict(obj._parameters), dict(obj._buffers), obj.graph,
                     type(obj).__name__)
            return _new_graph_module, (), state, None, None, _fill_graph_module
        if type(obj) is torch.Tensor and id(obj) not in self.refs and not obj.requires_grad:
            # the analysis' own small tensors (channel ids on CPU, shapes on meta): as
            # arrays and shapes, ~20x faster to read back than torch's per-tensor format
            if obj.device.type == "meta":
                return _meta_tensor, (tuple(obj.shape), tuple(obj.stride()), obj.dtype)
            if obj.device.type == "cpu" and obj.dtype in _NUMPY_DTYPES:
                return torch.from_numpy, (obj.numpy().copy(),)
        return NotImplemented


class _Reader(pickle.Unpickler):
    def __init__(self, f, objects):
        super().__init__(f)
        self.objects = objects

    def persistent_load(self, ref):
        try:
            if ref[0] == "attribute":
                return getattr(importlib.import_module(ref[1]), ref[2])
            return self.objects[tuple(ref)]
        except KeyError:
            raise pickle.UnpicklingError(f"the entry names {ref}, which the model lacks") \
                from None


def _dump(graph: ChannelGraph, said: list[str], model: nn.Module, rules: Rules) -> bytes:
    for g in graph.groups:
        g.removable  # noqa: B018 - worked out now: the entry holds the answer, not a closure
    buf = io.BytesIO()
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20 * len(graph.nodes) + 10_000))  # fx's node chain
    try:
        _Writer(buf, _references(model, rules)).dump({"graph": graph, "warnings": said})
    finally:
        sys.setrecursionlimit(limit)
    return buf.getvalue()


def _load(path: Path, model: nn.Module, rules: Rules):
    limit = sys.getrecursionlimit()
    try:
        sys.setrecursionlimit(max(limit, 100_000))
        with open(path, "rb") as f:
            entry = _Reader(f, _resolve(model, rules)).load()
        return entry["graph"], list(entry["warnings"])
    except Exception:  # noqa: BLE001 - a damaged or foreign entry: analyse afresh
        return None
    finally:
        sys.setrecursionlimit(limit)
