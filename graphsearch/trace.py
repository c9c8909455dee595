"""Tracing: nn.Module -> torch.fx graph, plus every node's output shape.

Shapes are propagated on meta tensors (no memory, no arithmetic), so analysing a large model
costs no real forward pass. A submodule that fx cannot trace becomes a leaf, with a warning
naming it, instead of a crash; if a leaf cannot run on meta tensors either, the shapes come
from one real forward pass and `Traced.shape_mode` says so. That pass also notes every node
that reads a tensor's value into Python (`item()`, `int()`, `float()`, `bool()`, an `if` on a
tensor: no meta tensor has a value): `Traced.value_reads`, which an export cannot follow.

A submodule that fails on a Python condition is traced once more with the example inputs'
values at hand: a condition on sizes (`if H % patch: interpolate`) follows the branch the
example takes (with a warning: the graph holds for inputs of those sizes); one on tensor
values still makes a leaf. Tracing leaves no fx value behind in the modules' attributes (a
cache filled while traced), and a rule may rewrite its node's neighbourhood first
(`Rule.fuse`: a weight-standardised convolution's chain becomes one node).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from .errors import TraceFailure
from .rules import default_rules


def _parametrized(m: torch.nn.Module, qualname: str) -> bool:
    """A module whose weight a parametrization computes (`weight_norm`), or a part of that
    computation: traced through (a torch.nn module is a leaf by default), so that the
    computation is seen (its class's rule would slice a parameter it no longer has)."""
    # is_parametrized reads `m.parametrizations`, which most modules lack: while fx traces,
    # each miss goes through fx's attribute wrapper and an AttributeError. Asked only of a
    # module that can have one (a submodule of that name, or an attribute of the object).
    owns = "parametrizations" in m._modules or "parametrizations" in vars(m) or \
        hasattr(type(m), "parametrizations")
    return (owns and parametrize.is_parametrized(m)) or ".parametrizations." in f".{qualname}."


class _LeafFallbackTracer(fx.Tracer):
    """A tracer that turns untraceable submodules into leaves instead of failing."""

    def __init__(self, rules=None) -> None:
        super().__init__()  # (fx builds one without arguments when it copies a GraphModule)
        self.untraceable: dict[str, str] = {}
        self.rules = rules if rules is not None else default_rules()

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if qualname in self.untraceable:
            return True
        if self.rules.traced_as(m) is not None or _parametrized(m, qualname):
            return False
        # A module whose rule applies to it whole (a user's registered block, a subclass of a
        # known module that keeps its forward) stays one node, so that the rule sees it.
        return super().is_leaf_module(m, qualname) or \
            (qualname != "" and self.rules.keeps_whole(m))

    def call_module(self, m, forward, args, kwargs):
        plain = self.rules.traced_as(m)
        if plain is not None and self.path_of_module(m) not in self.untraceable:
            forward = functools.partial(plain, m)
        stack_before = list(self.module_stack.keys())
        last_before = self.graph._root.prev  # the graph's last node before this call
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - any tracing failure makes the module a leaf
            qualname = self.path_of_module(m)
            if qualname == "" or qualname in self.untraceable:
                raise
            # fx's module stack is not exception safe: drop what the failed call pushed.
            for key in list(self.module_stack.keys())[len(stack_before):]:
                del self.module_stack[key]
            # Nor is the graph: the failed attempt's nodes (a batch norm bound to buffers of
            # the module that becomes a leaf, a value a later node names) go, newest first.
            while self.graph._root.prev is not last_before:
                self.graph.erase_node(self.graph._root.prev)  # its users, newer, went first
            self.untraceable[qualname] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            return super().call_module(m, forward, args, kwargs)


_UNKNOWN = object()


class _ShapeSpecialisingTracer(_LeafFallbackTracer):
    """The fallback tracer that also runs the model on its example inputs while it traces, so
    that every proxy has a value, and follows a Python condition on sizes (MobileViT: `if
    new_h != H: interpolate`) the way the example inputs go, instead of giving up on the
    module. A condition on tensor *values* (`x.sum() > 0`, `x.item()`) still fails, and
    that module stays a leaf. Values come from a copy of the model (a batch norm in train
    mode updates its statistics there, not in the user's model)."""

    def __init__(self, rules, example_inputs: tuple, model: torch.nn.Module) -> None:
        super().__init__(rules)
        self.inputs = [tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, a)
                       for a in example_inputs]  # an in-place op must not reach the user's
        self.copy = copy.deepcopy(model)
        self.values: dict[fx.Node, Any] = {}
        self.from_data: set[fx.Node] = set()  # Python numbers read from tensor values
        self.specialised: dict[str, int] = {}  # module -> conditions on sizes followed

    def _value(self, a):
        if isinstance(a, fx.Proxy):
            return self.values.get(a.node, _UNKNOWN)
        if isinstance(a, (tuple, list)):
            return type(a)(self._value(x) for x in a)
        if isinstance(a, dict):
            return {k: self._value(x) for k, x in a.items()}
        if isinstance(a, slice):
            return slice(self._value(a.start), self._value(a.stop), self._value(a.step))
        return a

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,
                     proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                     proxy_factory_fn)
        flat, _ = torch.utils._pytree.tree_flatten((args, kwargs))
        proxies = [a for a in flat if isinstance(a, fx.Proxy)]
        try:
            a, kw = self._value(args), self._value(kwargs)
            if any(v is _UNKNOWN for v in torch.utils._pytree.tree_flatten((a, kw))[0]):
                raise LookupError
            with torch.no_grad(), self._computing():
                if kind == "placeholder":
                    value = self.inputs.pop(0) if self.inputs else _UNKNOWN
                elif kind == "get_attr":
                    value = functools.reduce(getattr, target.split("."), self.copy)
                elif kind == "call_module":
                    value = self.copy.get_submodule(target)(*a, **kw)
                elif kind == "call_method":
                    value = getattr(a[0], target)(*a[1:], **kw)
                else:
                    value = target(*a, **kw)
        except Exception:  # noqa: BLE001 - no value: a condition on it fails as in fx
            value = _UNKNOWN
        node = proxy.node
        self.values[node] = value
        if not isinstance(value, torch.Tensor):
            shape_query = self.rules.reads_metadata(kind, target, args)
            for p in proxies:
                if p.node in self.from_data or (
                        isinstance(self.values.get(p.node), torch.Tensor) and not shape_query):
                    self.from_data.add(node)
        return proxy

    @contextlib.contextmanager
    def _computing(self):
        self.computing = True
        try:
            yield
        finally:
            self.computing = False

    def call_module(self, m, forward, args, kwargs):
        if getattr(self, "computing", False):  # a value, computed by the model's copy: while
            return forward(*args, **kwargs)  # fx traces, every module call comes here
        return super().call_module(m, forward, args, kwargs)

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self.values.get(obj.node, _UNKNOWN)
        if obj.node in self.from_data or not isinstance(value, (bool, int, float)):
            return super().to_bool(obj)
        where = next(reversed(self.module_stack.keys()), "") if self.module_stack else ""
        self.specialised[where] = self.specialised.get(where, 0) + 1
        return bool(value)


@dataclass
class Traced:
    module: fx.GraphModule
    # node name -> output value on meta (a tensor, a tuple of tensors, an int, ...)
    values: dict[str, Any]
    untraceable: dict[str, str] = field(default_factory=dict)
    shape_mode: str = "meta"
    # node name -> who, in words ("submodule 'gate' (Gate)"): reads a tensor's value into
    # Python during the forward (found by the real pass only; none when shapes are "meta")
    value_reads: dict[str, str] = field(default_factory=dict)
    front_end: str = "fx"  # or "export" (graphsearch.export_trace: a graph of ATen ops)
    # why the batch is fixed in the graph ("" where it is not: fx, or a dynamic export)
    static_batch: str = ""
    # `(ctx) -> None` run after the rules, before the groups form (a Hugging Face config's
    # widths: graphsearch.hf.config_ties)
    constraints: list = field(default_factory=list)


def trace(model: torch.nn.Module, example_inputs: tuple, rules=None) -> Traced:
    """Trace `model` with fx and record the output of every node on meta tensors.

    `rules` (a `graphsearch.rules.Rules`) says which modules stay whole and which keep their
    input's shape (their meta kernels are skipped)."""
    if rules is None:
        rules = default_rules()
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    if isinstance(model, fx.GraphModule):
        gm, untraceable = model, {}
    else:
        tracer = _LeafFallbackTracer(rules)
        try:
            with _attributes_restored(model):
                graph = tracer.trace(model)
        except Exception as exc:  # noqa: BLE001
            raise TraceFailure(
                f"torch.fx could not trace {type(model).__name__}: {exc}. Write data-dependent "
                "Python control flow with tensor ops (torch.where(condition, a, b)), or move "
                "it into a submodule (kept as an opaque leaf: its channels are not pruned, "
                "and optimize exports the model only if the exporters can follow it)."
            ) from exc
        if any("control flow" in why for why in tracer.untraceable.values()):
            graph, tracer = _retrace_on_shapes(model, example_inputs, rules, graph, tracer)
        gm = _graph_module(tracer.root, graph, type(model).__name__)
        fused = fuse(gm, rules)
        if tracer.untraceable:
            gm.graph.eliminate_dead_code()  # nodes left by the failed attempts
        if fused or tracer.untraceable:
            gm.recompile()  # once, for both changes
        untraceable = tracer.untraceable
        for name, count in getattr(tracer, "specialised", {}).items():
            if any(name == u or name.startswith(u + ".") for u in tracer.untraceable):
                continue  # the module failed later on anyway: it is a leaf
            warnings.warn(
                f"graphsearch: {count} Python condition(s) on tensor sizes in "
                f"{repr(name) if name else 'the forward'} follow the branch the example inputs "
                "take; the analysis and the slim model hold for inputs of those sizes.",
                stacklevel=2)
        for name, why in untraceable.items():
            warnings.warn(
                f"graphsearch: submodule '{name}' could not be traced by torch.fx ({why}); "
                "it is kept as an opaque leaf and the channels it touches are not pruned.",
                stacklevel=2,
            )
    reads: dict[str, str] = {}
    try:
        values = propagate_shapes(gm, example_inputs, rules)
        mode = "meta"
    except Exception as meta_exc:  # noqa: BLE001 - some ops have no meta kernel, or a
        # module reads tensor values (`if x.sum().item() > 0`): one real pass, noting who
        try:
            with torch.no_grad():
                values = _propagate(gm, tuple(example_inputs), record_as_meta=True,
                                    rules=rules, reads=reads)
            failed = getattr(meta_exc, "graphsearch_node", None)
            if failed is not None and failed not in reads and \
                    any(k in str(meta_exc) for k in _VALUE_ON_META):  # tolist(), numpy()
                reads[failed] = _who(gm, next(n for n in gm.graph.nodes if n.name == failed))
        except Exception as exc:  # noqa: BLE001 - the model does not run on its inputs
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise TraceFailure(
                f"{type(model).__name__} does not run on its example inputs "
                f"({type(exc).__name__}: {first}); check example_inputs() or INPUT_SHAPE "
                "in model.py") from exc
        mode = "real"
    return Traced(gm, values, untraceable, mode, reads)


def _graph_module(root, graph: fx.Graph, name: str) -> fx.GraphModule:
    """The traced module, as `fx.GraphModule(root, graph, name)` builds it, with two
    differences in cost only: its Python code is generated on first use (a call, `.code`, a
    pickle), not here (the analysis reads only the graph, and generating and compiling the
    code of a large model's forward is a tenth of its analysis: fx's own lazy module, as
    torch's compilers use it); and its submodules are copied by `_copy_targets`."""
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule as module_class
    except ImportError:  # an older or newer torch without it: compiled now
        module_class = fx.GraphModule
    gm = module_class(torch.nn.Module(), fx.Graph(), name)  # (nothing to copy yet)
    gm.training = root.training
    _copy_targets(root, gm, graph)
    gm.graph = graph
    # what fx's constructor takes from the graph besides (the tracer, for a pickle)
    if graph._tracer_cls and "<locals>" not in graph._tracer_cls.__qualname__:
        gm._tracer_cls = graph._tracer_cls
    if graph._tracer_extras:
        gm._tracer_extras = graph._tracer_extras
    return gm


def _copy_targets(root: torch.nn.Module, gm: fx.GraphModule, graph: fx.Graph) -> None:
    """fx's copy of every get_attr and call_module target of `graph` from `root` into `gm`
    (`torch.fx.graph_module._copy_attr`, in node order): a fresh plain module for each
    module on the way, the target itself at the end, nothing under a target already copied
    whole. With one lookup per path: fx looks every prefix of every target up again, in
    nn.Module's `__getattr__`, each first miss an AttributeError (a twentieth of a
    convolutional network's analysis)."""
    paths: dict[str, tuple] = {}  # a path walked so far -> (the original, its copy)
    for node in graph.nodes:
        if node.op != "get_attr" and node.op != "call_module":
            continue
        *prefix, field = node.target.split(".")
        f, t, path = root, gm, ""
        for item in prefix:
            path += "." + item
            if path not in paths:
                original, here = getattr(f, item), getattr(t, item, None)
                if here is None:
                    here = torch.nn.Module()
                    setattr(t, item, here)
                paths[path] = (original, here)
            f, t = paths[path]
            if f is t:  # under a target copied whole
                break
        else:
            orig = getattr(f, field)
            if isinstance(orig, torch.Tensor) and not isinstance(orig, torch.nn.Parameter):
                t.register_buffer(field, orig)
            else:
                setattr(t, field, orig)
            paths[path + "." + field] = (orig, orig)


def _retrace_on_shapes(model, example_inputs, rules, graph, tracer):
    """A submodule failed on Python control flow: trace again with the example inputs'
    values at hand, following conditions on sizes. Kept only if fewer modules stay leaves."""
    retracer = None
    try:
        retracer = _ShapeSpecialisingTracer(rules, tuple(example_inputs), model)  # deep copy
        with _attributes_restored(model):
            regraph = retracer.trace(model)
    except Exception:  # noqa: BLE001 - keep the first trace
        return graph, tracer
    finally:
        if retracer is not None:
            retracer.copy = retracer.values = None  # a model's worth of tensors
    if len(retracer.untraceable) < len(tracer.untraceable):
        return regraph, retracer
    return graph, tracer


def fuse(gm: fx.GraphModule, rules) -> int:
    """Apply each node's rule's `fuse` rewrite (a weight-standardised convolution's chain
    becomes one node); returns how many nodes were rewritten."""
    fused = 0
    # a module's rule with a rewrite (none of the project's: they are on functions), else
    # no walk over the modules (one is a few ms on a large model)
    on_modules = any(r.fuse is not None for t, r in rules.items() if isinstance(t, type))
    modules = dict(gm.named_modules()) if on_modules else {}
    for node in list(gm.graph.nodes):
        if node._erased:
            continue  # erased by an earlier rewrite
        if node.op == "call_module" and not on_modules:
            continue
        rule = rules.rule_for(node, modules.get(node.target) if node.op == "call_module"
                              else None)
        if rule is not None and rule.fuse is not None and rule.fuse(gm, node):
            fused += 1
    if fused:
        gm.graph.eliminate_dead_code()
    return fused


_MODULE_INTERNALS = ("_parameters", "_buffers", "_modules")
_MODULE_INTERNALS_SET = frozenset(_MODULE_INTERNALS)
_CONTAINERS = (dict, list, set)


@contextlib.contextmanager
def _attributes_restored(model: torch.nn.Module):
    """Undo what tracing wrote into the modules' plain attributes. A module that caches a
    computed tensor (LeViT's attention-bias cache: `self.cache[key] = table[:, idx]`) stores
    an fx Proxy there while traced; left in place, the next trace of the same model would
    read it back: a node of the old graph (fx: "referenced nonexistent value")."""
    saved = []
    for m in model.modules():
        attrs = dict(m.__dict__)  # (a C-level copy: this runs for every module)
        for k in _MODULE_INTERNALS:
            attrs.pop(k, None)
        contents = {k: v.copy() for k, v in attrs.items() if type(v) in _CONTAINERS}
        saved.append((m, attrs, contents))
    try:
        yield
    finally:
        for m, attrs, contents in saved:
            d = m.__dict__
            for k in [k for k in d.keys() - attrs.keys() - _MODULE_INTERNALS_SET
                      if isinstance(d[k], fx.Proxy)]:
                del d[k]  # a traced value kept by the module (fx's own new
                # attributes, constants such as `_tensor_constant0`, are real tensors: kept)
            for k, old in contents.items():  # the same container, with its old contents
                v = attrs[k]
                v.clear()
                v.update(old) if isinstance(v, (dict, set)) else v.extend(old)
            d.update(attrs)


def _to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.empty(x.shape, dtype=x.dtype, device="meta")
    return x


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple, rules=None, real: bool = False
                     ) -> dict[str, Any]:
    """Every node's output on meta tensors (no memory, no arithmetic): node name -> value.
    `real`: compute on the given (real) inputs, record as meta (an op without meta kernel)."""
    if real:
        with torch.no_grad():
            return _propagate(gm, tuple(example_inputs), record_as_meta=True, rules=rules)
    rec = _Recorder(gm, record_as_meta=False, rules=rules)
    state = {}
    for name, value in gm.state_dict(keep_vars=True).items():
        owner, _, attr = name.rpartition(".")
        if owner in rec.deferred and isinstance(value, torch.Tensor):
            rec.deferred[owner][attr] = value
        else:
            state[f"gm.{name}"] = _to_meta(value)
    meta_inputs = tuple(tree_map(_to_meta, tuple(example_inputs)))
    return torch.func.functional_call(_Holder(gm, rec), state, meta_inputs, strict=False,
                                      tie_weights=False)


class _Holder(torch.nn.Module):
    """Runs the recorder inside functional_call so that parameters are swapped for meta ones."""

    def __init__(self, gm: fx.GraphModule, recorder: "_Recorder") -> None:
        super().__init__()
        self.gm = gm
        self.recorder = recorder

    def forward(self, *args):
        self.recorder.run(*args)
        return self.recorder.recorded


class _ValueReads(TorchDispatchMode):
    """Notes a read of a tensor's value into Python: `item()`, `int()`, `float()`, `bool()`
    and an `if` on a tensor all reach `aten._local_scalar_dense` (`tolist()` does not)."""

    def __init__(self) -> None:
        super().__init__()
        self.hit = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.hit = True
        return func(*args, **(kwargs or {}))


# node.meta key: MACs of a module that reads tensor values, counted in the real pass on the
# example inputs (all samples); the analysis's cost of an opaque leaf uses it
REAL_MACS = "graphsearch_real_macs"


def _flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False)


# what torch says when a value is read from a meta tensor
_VALUE_ON_META = ("cannot be called on meta tensors", "Cannot copy out of meta tensor")


def _who(gm: fx.GraphModule, n: fx.Node) -> str:
    if n.op == "call_module":
        return f"submodule '{n.target}' ({type(gm.get_submodule(n.target)).__name__})"
    what = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", n.target)
    return f"node '{n.name}' ({what}) of the model's forward"


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, record_as_meta: bool, rules=None,
                 reads: dict | None = None) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.record_as_meta = record_as_meta
        self.reads = reads  # filled with the nodes that read tensor values (real runs)
        self.recorded: dict[str, Any] = {}
        # On meta tensors (not a real run), an op's output metadata is a function of its
        # inputs' metadata: repeated blocks (a ResNet stage, a ViT's layers) run each kernel
        # once per distinct call (see `_MetaMemo`).
        self.memo = _MetaMemo() if not record_as_meta and reads is None else None
        # Modules whose output has their input's shape (the rule says so): on meta tensors
        # their (sometimes slow, decomposed) kernels are skipped.
        self.same_shape: set[str] = set()
        # Modules whose rule says they are pure (`Rule.pure`, for their own class): the memo
        # may reuse their output metadata; functions and methods as `Rules.pure_call` says.
        self.pure: set[str] = set()
        # Modules whose rule computes their output on meta tensors (`Rule.meta`)
        self.quick: dict[str, Any] = {}
        self.known = known = rules if rules is not None else default_rules()
        for n in gm.graph.nodes:
            if n.op == "call_module":
                m = self.submodules[n.target]
                found = known.module_rule(m)
                if rules is not None and found is not None and found[0].same_shape and \
                        rules.keeps_whole(m):
                    self.same_shape.add(n.target)
                if found is not None and found[0].meta is not None and \
                        known.keeps_whole(m) and found[1] is type(m):
                    self.quick[n.target] = found[0].meta
                if known.pure_module(m):
                    self.pure.add(n.target)
        # Modules whose output their rule gives (`same_shape`, `Rule.meta`) read none of
        # their own parameters and buffers: the meta pass leaves those out of its swap
        # (`propagate_shapes`; a model's worth of meta tensors otherwise), here by name, and
        # gives the module meta copies only if its kernel runs after all. Not a module that
        # an attribute read names, nor one that another module's kernel may call.
        self.deferred: dict[str, dict[str, Any]] = {}
        if self.memo is not None and not self.memo.off:
            answered = self.same_shape | self.quick.keys()
            read = {n.target.rsplit(".", k)[0] for n in gm.graph.nodes if n.op == "get_attr"
                    for k in range(1, n.target.count(".") + 1)}  # (the modules on the way)
            inside = {id(c) for n in gm.graph.nodes if n.op == "call_module" and
                      n.target not in answered for c in self.submodules[n.target].modules()}
            self.deferred = {t: {} for t in answered if id(self.submodules[t]) not in inside
                             and t not in read}

    def _quick(self, op: str, target, args, kwargs):
        """The output from the rule's `meta` (None: run the kernel)."""
        if self.memo is None or self.memo.off:
            return None
        if op == "call_module":
            meta = self.quick.get(target)
            if meta is None:
                return None
            m = self.submodules[target]
            if any(getattr(m, name, None) for name in _HOOK_DICTS):  # a hook sees every call
                return None
            return meta(m, args, kwargs)
        rule = self.known.call_rule(op, target)
        return rule.meta(target, args, kwargs) if rule is not None and \
            rule.meta is not None else None

    def call_module(self, target, args, kwargs):
        if target in self.same_shape and args and isinstance(args[0], torch.Tensor) and \
                args[0].is_meta:
            return args[0]
        out = self._quick("call_module", target, args, kwargs)
        if out is not None:
            return out
        own = self.deferred.get(target)
        if own:  # its kernel runs after all: on its own state, on meta
            state = {k: _to_meta(v) for k, v in own.items()}
            return torch.func.functional_call(self.submodules[target], state, args, kwargs,
                                              strict=False, tie_weights=False)
        if self.memo is not None and target in self.pure:
            return self.memo.run(("call_module", self.submodules[target]),
                                 super().call_module, target, args, kwargs)
        return super().call_module(target, args, kwargs)

    def call_function(self, target, args, kwargs):
        out = self._quick("call_function", target, args, kwargs)
        if out is not None:
            return out
        if self.memo is not None and self.known.pure_call("call_function", target):
            return self.memo.run(("call_function", target), super().call_function, target,
                                 args, kwargs)
        return super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        out = self._quick("call_method", target, args, kwargs)
        if out is not None:
            return out
        if self.memo is not None and args and type(args[0]) in _PLAIN_TENSORS and \
                self.known.pure_call("call_method", target):
            return self.memo.run(("call_method", target), super().call_method, target, args,
                                 kwargs)
        return super().call_method(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        if self.reads is not None and n.op in ("call_module", "call_function", "call_method"):
            counter = _flop_counter() if n.op == "call_module" else contextlib.nullcontext()
            with counter, _ValueReads() as mode:
                out = super().run_node(n)
            if mode.hit:
                self.reads[n.name] = _who(self.module, n)
                if n.op == "call_module":  # the branch the example takes, counted for real
                    n.meta[REAL_MACS] = counter.get_total_flops() / 2  # (zeros may take
                    # another: `if x.mean() > 0: return x + self.conv(x)`)
        else:
            try:
                # fx's run_node without its bookkeeping for graphs built while a graph runs
                # (a node-meta context and a debug line, two context managers a node): this
                # run builds none
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                out = getattr(self, n.op)(n.target, args, kwargs)
            except Exception as exc:
                if not hasattr(exc, "graphsearch_node"):  # the node the meta pass failed at
                    exc.graphsearch_node = n.name
                raise
        self.recorded[n.name] = tree_map(_to_meta, out) if self.record_as_meta else out
        return out


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_HOOK_DICTS = frozenset({
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"})


class _Unkeyable(Exception):
    """An argument whose output metadata may depend on more than what the key records."""


_SCALARS = frozenset({bool, int, str, type(None), type(Ellipsis), torch.dtype, torch.device,
                      torch.memory_format, torch.layout})
_SEQUENCES = frozenset({tuple, list, torch.Size, fx.immutable_collections.immutable_list})
_MAPPINGS = frozenset({dict, fx.immutable_collections.immutable_dict})


def _key(a):
    """A hashable key of an argument that determines an op's output metadata on meta
    tensors; `_Unkeyable` if unsure."""
    t = type(a)
    if t in _SCALARS:
        return (t, a)
    if t in _PLAIN_TENSORS:
        if not a.is_meta or a.requires_grad or a.is_conj() or a.is_neg() \
                or a.layout != torch.strided:
            raise _Unkeyable
        return (t, tuple(a.shape), a.stride(), a.dtype, a.storage_offset())
    if t in _SEQUENCES:
        return (t, tuple([_key(x) for x in a]))
    if t is float:
        if a != a:  # nan: equal to nothing, keep it distinct from every other key
            raise _Unkeyable
        return (t, a, math.copysign(1.0, a))  # -0.0 is not 0.0 to every op
    if t is slice:
        return (t, _key(a.start), _key(a.stop), _key(a.step))
    if t in _MAPPINGS:
        return (t, tuple([(_key(k), _key(v)) for k, v in a.items()]))
    raise _Unkeyable


def _module_key(m: torch.nn.Module):
    """The configuration, parameters and buffers of a torch.nn module and its children, or
    `_Unkeyable` (a hook, an attribute the key cannot describe)."""
    parts = [type(m)]
    for name, v in m.__dict__.items():
        if name[0] != "_" or name == "_qkv_same_embed_dim":
            parts.append((name, _key(v)))
        elif name in _HOOK_DICTS:
            if v:
                raise _Unkeyable
        elif name == "_parameters" or name == "_buffers":
            parts.append((name, tuple([(k, _key(t)) for k, t in v.items()])))
        elif name == "_modules":
            parts.append((name, tuple([(k, _module_key(c) if c is not None else None)
                                       for k, c in v.items()])))
        elif isinstance(v, (torch.Tensor, torch.nn.Module)):
            raise _Unkeyable
    return tuple(parts)


def _global_hooks() -> bool:
    from torch.nn.modules import module as _m

    return any(getattr(_m, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks", "_global_forward_hooks_always_called"))


def _meta_out(out):
    """A description of an op's output to rebuild it from (None: not rebuildable)."""
    if type(out) is torch.Tensor:
        if not out.is_meta or out.requires_grad or out.is_conj() or out.is_neg() or \
                out.layout != torch.strided or out.storage_offset():
            return None
        return (tuple(out.shape), out.stride(), out.dtype)
    if out is None:
        return ()
    if type(out) in (tuple, list):
        parts = [_meta_out(o) for o in out]
        return None if any(p is None for p in parts) or all(p == () for p in parts) \
            else (type(out), parts)
    return None


def _rebuild(desc):
    if desc == ():
        return None
    if type(desc[0]) is tuple:  # (shape, stride, dtype)
        return torch.empty_strided(desc[0], desc[1], dtype=desc[2], device="meta")
    return desc[0](_rebuild(d) for d in desc[1])


class _MetaMemo:
    """Output metadata of meta-tensor ops already run in this pass, by op and the metadata of
    their arguments: a hit builds fresh meta tensors of the same shapes, strides and dtypes
    instead of running the (often Python, decomposed) meta kernel again. Only ops that write
    nothing (no in-place op, no module with hooks) and whose arguments are fully described
    by the key (meta tensors, plain Python constants) are remembered."""

    def __init__(self) -> None:
        self.seen: dict = {}
        # off under global module hooks, or a torch function/dispatch mode (a user's
        # counter, profiler): they may expect to see every call
        self.off = _global_hooks() or torch._C._len_torch_function_stack() > 0 or \
            torch._C._len_torch_dispatch_stack() > 0

    def run(self, op, fn, target, args, kwargs):
        if self.off:
            return fn(target, args, kwargs)
        try:
            if op[0] == "call_module":  # a module's key: its configuration and parameters
                op = (op[0], _module_key(op[1]))
            key = (op, _key(args), _key(kwargs))
            desc = self.seen.get(key)
        except Exception:  # noqa: BLE001 - unkeyable (or unhashable): run the kernel
            return fn(target, args, kwargs)
        if desc is not None:
            return _rebuild(desc)
        out = fn(target, args, kwargs)
        try:
            desc = _meta_out(out)
        except Exception:  # noqa: BLE001 - an output the memo cannot describe
            desc = None
        if desc is not None and desc != ():  # a tensor, or a tuple holding one
            self.seen[key] = desc
        return out


def _propagate(gm: fx.GraphModule, args: tuple, record_as_meta: bool, rules=None,
               reads: dict | None = None) -> dict[str, Any]:
    rec = _Recorder(gm, record_as_meta, rules, reads)
    rec.run(*args)
    return rec.recorded


_propagate_meta = propagate_shapes  # the name other modules used before
