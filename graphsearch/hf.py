"""Hugging Face `transformers` models: which widths their config governs, and the config a
pruned one needs.

A `PreTrainedModel` is rebuilt from its config by `from_pretrained`, so a pruned model must
keep every parameter's shape a function of its config. This module asks the model's own
class which parameter dims each width field governs (`hidden_size`, `intermediate_size`,
`num_attention_heads`, `num_key_value_heads`): it builds the class on the meta device from
the config with one field doubled and notes the dims that changed. The analysis then ties
(`config_ties`) every dim a field governs to one of them, index by index, so that any plan
keeps widths the config can state: uniform across layers (these configs hold one number per
field), hidden channels in whole heads where the head size is derived from the hidden size
(BERT, GPT-2, ViT: `head_dim = hidden_size / num_attention_heads`), and a channel dim no
field governs (or several do) is not pruned. Attention heads are units already (the
attention rule ties each head's dims), and grouped-query attention's query heads are tied
to their key/value head by the graph (`repeat_kv`), so `num_key_value_heads` and the query
groups stay consistent; one key/value head that every query head shares (multi-query
attention: Falcon's, made by the query heads' fused projection) is kept as a group of its
own, so the query heads follow `num_attention_heads` alone (a count the class does not
read, Falcon's derived `num_key_value_heads`, stays); rotary embeddings and causal masks
carry no channels.

After slimming, `pretrained_edits` gives the new config values and the plain attributes
(`split_size`, `num_heads`, `all_head_size`, ...) that the class built from that config has,
to be set on the user's modules (see `graphsearch.inplace`).

`transformers` is optional: nothing here imports it; a model is a `PreTrainedModel` only if
`transformers` was imported by whoever built it.
"""

from __future__ import annotations

import copy
import inspect
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import UserError

# the config fields probed as widths: those whose name says so (an int, or each int of a
# list: a CNN's `hidden_sizes` per stage), less those that size positions, vocabularies,
# layers or kernels (which change no channel dim anyway, but cost a probe each)
# (a head's own width, `head_dim`, is no field to prune: heads are the attention's units)
_WIDTH_WORDS = ("hidden", "intermediate", "heads", "embed", "inner", "width", "ffn",
                "d_model", "d_ff", "n_embd", "n_head", "filters", "neck", "channels", "dim",
                "size")
_NOT_WIDTH = ("vocab", "position", "layers", "max_", "image_size", "patch_size", "num_labels",
              "kernel", "stride", "window", "bucket", "length", "_len", "num_channels",
              "chunk", "sample", "pad", "token", "mel", "rate", "depth", "range", "eps",
              "head_dim", "d_kv", "head_size", "rotary")
# a field some configs leave None and derive in the model (GPT-2's MLP: 4 * hidden_size):
# written out before probing, so that the hidden size does not govern the MLP's width
_DERIVED = {"n_inner": lambda c: 4 * c.hidden_size}
_SIMPLE = (int, float, bool, str, tuple, type(None))
# the fields that size attention (standard names; a config's attribute_map translates them)
_ATTENTION_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads")


def is_pretrained(model) -> bool:
    """A `transformers.PreTrainedModel` (without importing transformers)."""
    tf = sys.modules.get("transformers")
    base = getattr(tf, "PreTrainedModel", None) if tf is not None else None
    return base is not None and isinstance(model, base)


def call_kwargs(model: nn.Module) -> dict:
    """Keyword arguments for tracing and checking a Hugging Face model: no key/value cache
    (an object export cannot return) and plain tuples as outputs where the forward names
    them (its output class is a pytree of tensors anyway)."""
    if not is_pretrained(model):
        return {}
    params = inspect.signature(model.forward).parameters
    kwargs = {}
    if "use_cache" in params:
        kwargs["use_cache"] = False
    if "return_dict" in params:  # (not through **kwargs: export cannot take a constant there)
        kwargs["return_dict"] = False
    return kwargs


class Called(nn.Module):
    """`model` called with `call_kwargs(model)`, as the graph was traced (a Hugging Face
    model without its key/value cache); any other model as it is."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.kwargs = model, call_kwargs(model)

    def forward(self, *args):
        return self.model(*args, **self.kwargs)


def _config_value(config, key: str):
    """A field's value; `key` "name" or "name[i]" (an element of a list field)."""
    name, _, index = key.partition("[")
    try:
        value = getattr(config, name)
    except AttributeError:
        return None
    return value[int(index[:-1])] if index else value


def _set_config_value(config, key: str, value) -> None:
    name, _, index = key.partition("[")
    if index:
        items = list(getattr(config, name))
        items[int(index[:-1])] = value
        value = type(getattr(config, name))(items)
    setattr(config, name, value)


def width_fields(config) -> list[str]:
    """The keys of the config's width fields ("hidden_size", "hidden_sizes[2]", ...)."""
    names = set(config.to_dict()) - set(getattr(config, "attribute_map", {}))  # no aliases
    keys = []
    for name in sorted(names):
        low = name.lower()
        if not any(w in low for w in _WIDTH_WORDS) or any(w in low for w in _NOT_WIDTH):
            continue
        value = _config_value(config, name)
        if _is_width(value):
            keys.append(name)
        elif isinstance(value, (list, tuple)) and value and all(_is_width(v) for v in value):
            keys += [f"{name}[{i}]" for i in range(len(value))]
    return keys


def _is_width(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _explicit(config):
    """A copy of `config` with the derived width fields written out."""
    config = copy.deepcopy(config)
    for name, derive in _DERIVED.items():
        if hasattr(config, name) and getattr(config, name) is None:
            setattr(config, name, derive(config))
    return config


def _shapes(model: nn.Module, config) -> dict[str, tuple]:
    """Parameter and buffer shapes of `type(model)` built from `config` on the meta device."""
    with torch.device("meta"):
        skeleton = type(model)(config)
    return {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}


def _computed_values(model: nn.Module, config) -> dict[str, float]:
    """The float attributes of the modules of `type(model)` built from `config` (meta
    device): values its forward computes with that its config sets (Gemma's embedding scale,
    sqrt(hidden_size), which `from_pretrained` recomputes: it is no saved tensor)."""
    with torch.device("meta"):
        skeleton = type(model)(config)
    return {f"{path}.{k}" if path else k: v for path, m in skeleton.named_modules()
            for k, v in vars(m).items() if type(v) is float}


@dataclass
class Governed:
    """Which config field sets each parameter dim's width: (name, dim) -> fields."""

    fields: dict[tuple[str, int], set] = field(default_factory=dict)
    values: dict[str, int] = field(default_factory=dict)  # the fields' values as analysed
    # fields keyed "name" or "name[i]" (see `width_fields`)
    # field -> the computed values (`_computed_values`) it sets besides widths
    sets_values: dict[str, list] = field(default_factory=dict)
    # a count that alone governs no dim -> the width field it divides (their quotient, a
    # head's size or a group's width, stays: Segformer's num_attention_heads[i] and
    # hidden_sizes[i], wav2vec2's num_conv_pos_embedding_groups and hidden_size)
    follows: dict[str, str] = field(default_factory=dict)
    # counts whose doubling changes nothing the class builds (Falcon's num_key_value_heads
    # since transformers 5.25: derived in its config, one for multi-query attention, whose
    # attention counts its own): a plan cannot change them, and they follow nothing
    unused: set = field(default_factory=set)


def governed_dims(model: nn.Module) -> Governed:
    """Probe `type(model)` with each width field doubled; the dims that changed are that
    field's. A field the class refuses doubled (heads not dividing the hidden size) governs
    nothing of its own."""
    base = _explicit(model.config)
    ref = _shapes(model, base)
    out = Governed()
    for name in width_fields(base):
        value = _config_value(base, name)
        out.values[name] = value
        probe = copy.deepcopy(base)
        _set_config_value(probe, name, 2 * value)
        try:
            shapes = _shapes(model, probe)
        except Exception:  # noqa: BLE001 - an invalid combination: the field follows another
            continue
        for key, shape in ref.items():
            other = shapes.get(key)
            if other is None or len(other) != len(shape):
                continue
            for d, (a, b) in enumerate(zip(shape, other)):
                if a != b:
                    out.fields.setdefault((key, d), set()).add(name)
    out.sets_values = _fields_setting_values(model, base, list(out.values))
    out.follows, out.unused = _counts_followed(model, base, out)
    return out


def _numbers(model: nn.Module, config) -> dict:
    """The int and float attributes of the modules of `type(model)` built from `config`
    (meta device), and the sizes of its tensors: what a config field sets."""
    with torch.device("meta"):
        skeleton = type(model)(config)
    out = {f"{path}.{k}" if path else k: v for path, m in skeleton.named_modules()
           for k, v in vars(m).items() if type(v) in (int, float)}
    for k, t in skeleton.state_dict().items():
        out.update({f"{k}[dim {d}]": n for d, n in enumerate(t.shape)})
    return out


def _counts_followed(model: nn.Module, base, governed: Governed) -> tuple[dict[str, str], set]:
    """For each width field that alone governs no parameter dim (a head count, a grouped
    convolution's group count), the width field it divides: the one whose doubling alone
    changes some size the model computes (a head's size, a group's width) that doubling the
    count too puts back. A field of the same index ("name[i]") is tried first; a field whose
    doubling changes nothing (unused by this class) follows none, and is returned apart."""
    alone = {next(iter(f)) for f in governed.fields.values() if len(f) == 1}
    counts = [k for k in governed.values if k not in alone]
    if not counts:
        return {}, set()
    ref = _numbers(model, base)
    probes: dict[tuple, dict] = {}

    def probe(*names):
        if names not in probes:
            config = copy.deepcopy(base)
            for name in names:
                _set_config_value(config, name, 2 * _config_value(base, name))
            probes[names] = _numbers(model, config)
        return probes[names]

    out, unused = {}, set()
    for h in counts:
        try:
            if probe(h) == ref:
                unused.add(h)  # (a field this class does not use)
                continue
        except Exception:  # noqa: BLE001 - a value the class refuses doubled
            continue
        index = h.partition("[")[2]
        candidates = sorted((f for f in governed.values if f in alone),
                            key=lambda f: f.partition("[")[2] != index)
        for f in candidates:
            try:
                changed = [k for k, v in probe(f).items() if k in ref and ref[k] != v]
                both = probe(f, h)
            except Exception:  # noqa: BLE001 - a combination the class refuses
                continue
            if any(both.get(k) == ref[k] for k in changed):
                out[h] = f
                break
    return out, unused


def _fields_setting_values(model: nn.Module, base, names: list[str]) -> dict[str, list]:
    """The width fields whose value the model also computes with (`_computed_values`), found
    by doubling every field at once (so that a head size derived from the hidden size and
    the head count stays) and then every field but one: a value that stays only when `f`
    stays is `f`'s."""
    def doubled(skip=None):
        probe = copy.deepcopy(base)
        for name in names:
            if name != skip:
                _set_config_value(probe, name, 2 * _config_value(base, name))
        return probe

    ref = _computed_values(model, base)
    try:
        changed = {k for k, v in _computed_values(model, doubled()).items() if ref.get(k) != v}
    except Exception:  # noqa: BLE001 - a combination the class refuses: nothing found
        return {}
    out = {}
    for name in names if changed else ():
        try:
            values = _computed_values(model, doubled(skip=name))
        except Exception:  # noqa: BLE001
            continue
        kept = sorted(k for k in changed if values.get(k) == ref.get(k))
        if kept:
            out[name] = kept
    return out


def config_ties(model: nn.Module):
    """The analysis constraint of a Hugging Face model: `(ctx) -> None`, run after its rules
    (see the module docstring)."""
    governed = governed_dims(model)

    alias = getattr(model.config, "attribute_map", {})
    attention = {alias.get(f, f) for f in _ATTENTION_FIELDS}

    def constrain(ctx) -> None:
        lines: dict[str, list] = {}
        for name, b in ctx.bindings.items():
            for d, atoms in b.dims.items():
                fields = governed.fields.get((name, d), set())
                if len(fields) > 1 and fields <= attention:
                    # key/value heads of a head size derived from the hidden size (Qwen2:
                    # kv_heads * hidden / heads): whole heads, tied to their query group
                    # and the query heads to the hidden size's blocks: it follows them
                    continue
                if len(fields) != 1:
                    why = "no config field states" if not fields else \
                        f"several config fields ({', '.join(sorted(fields))}) state"
                    ctx.fix(atoms, f"{why} the width of {name}[dim {d}]: a pruned "
                                   f"{type(model).__name__} would not load from its config")
                    continue
                fname = next(iter(fields))
                if fname in governed.sets_values:
                    ctx.fix(atoms, f"{type(model).__name__} computes "
                                   f"{', '.join(governed.sets_values[fname])} from {fname}: "
                                   "pruned, it would compute otherwise once reloaded")
                    continue
                lines.setdefault(next(iter(fields)), []).append((name, d, atoms))
        for fname, found in lines.items():
            base = min(len(a) for _, _, a in found)
            rep = np.asarray(next(a for _, _, a in found if len(a) == base))
            for name, d, atoms in found:
                atoms = np.asarray(atoms)
                if len(atoms) == base:
                    ctx.atoms.union(atoms, rep)
                    continue
                classes = ctx.find(atoms)
                if np.isin(classes, ctx.find(rep)).all():
                    continue  # tied already (the bias of a weight done before)
                # a fused projection (q, k and v of every head in one weight): its units
                # (heads, tied by the attention) in order, each tied to its share of the
                # field's width, whatever the layout: (3, heads, hd) or (heads, 3, hd); a
                # width that is a multiple of the field's (ConvNeXt's MLP: 4 x hidden, no
                # field of its own): as many units to each of the field's channels
                units = list(dict.fromkeys(classes.tolist()))
                if len(atoms) % base or (base % len(units) and len(units) % base):
                    ctx.fix(atoms, f"{name}[dim {d}] does not split into {fname}'s width")
                    continue
                share, per = max(1, base // len(units)), max(1, len(units) // base)
                for k, unit in enumerate(units):
                    at = (k // per) * share
                    ctx.atoms.union(atoms[classes == unit],
                                    np.resize(rep[at:at + share], int((classes == unit).sum())))

    constrain.governed = governed
    return constrain


@dataclass
class PretrainedEdits:
    """What a pruned Hugging Face model changes besides its tensors."""

    config: dict[str, tuple] = field(default_factory=dict)  # field (or "name[i]") -> (old, new)
    assign: dict[str, Any] = field(default_factory=dict)  # config attribute -> its new value
    attributes: dict[str, tuple] = field(default_factory=dict)  # "module.attr" -> (old, new)


def pretrained_edits(model: nn.Module, governed: Governed, slim_state: dict) -> PretrainedEdits:
    """The config values and module attributes of `model` pruned to the tensors of
    `slim_state` (name -> tensor, the slim module's): each width field scaled as the dims it
    governs were; a head count that governs no dim of its own follows the hidden size (the
    head size stays). The class built from the new config must have exactly the slim shapes;
    otherwise `UserError`."""
    config = model.config
    new = dict(governed.values)
    scale: dict[str, tuple] = {}
    for (name, d), fields in governed.fields.items():
        if len(fields) != 1 or name not in slim_state:
            continue
        fname = next(iter(fields))
        old_len = tuple(model.state_dict()[name].shape)[d] if name in model.state_dict() \
            else None
        if old_len:
            scale.setdefault(fname, (old_len, slim_state[name].shape[d]))
    for fname, (old_len, new_len) in scale.items():
        new[fname] = _exact(governed.values[fname] * new_len, old_len, fname)
    alias = getattr(config, "attribute_map", {})  # the standard names of this config's fields
    for fname, follows in ((alias.get(a, a), alias.get(b, b)) for a, b in (
            ("num_attention_heads", "hidden_size"), ("num_key_value_heads", "num_attention_heads"))):
        if fname in governed.values and fname not in scale and \
                fname not in governed.unused and follows in new:
            new[fname] = _exact(governed.values[fname] * new[follows], governed.values[follows],
                                fname)
    for fname, follows in governed.follows.items():  # (found by probing: list fields too)
        if fname not in scale and new.get(fname) == governed.values[fname] and \
                follows in scale:
            new[fname] = _exact(governed.values[fname] * new[follows], governed.values[follows],
                                fname)
    edits = PretrainedEdits()
    for fname, value in new.items():
        old = _config_value(config, fname)  # None where the model derives it: written out
        if value != old:
            edits.config[fname] = (old, value)
    target = _explicit(config)
    for fname, (_, value) in edits.config.items():
        _set_config_value(target, fname, value)
    for fname in edits.config:
        name = fname.partition("[")[0]
        edits.assign[name] = getattr(target, name)
    with torch.device("meta"):
        skeleton = type(model)(target)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    for name, t in slim_state.items():
        if name in shapes and shapes[name] != tuple(t.shape):
            raise UserError(
                f"in-place pruning: {type(model).__name__} built from the pruned config "
                f"({', '.join(f'{k}={v[1]}' for k, v in edits.config.items())}) has "
                f"{name} of shape {shapes[name]}, the plan gives {tuple(t.shape)}: the config "
                "cannot state this plan; use passes.slim's module")
    mine = dict(model.named_modules())
    for path, sm in skeleton.named_modules():
        m = mine.get(path)
        if m is None or _module_class(m) is not _module_class(sm):
            continue
        for k, v in vars(sm).items():
            if k.startswith("_") or k == "training" or not isinstance(v, _SIMPLE):
                continue
            old = vars(m).get(k, v)
            if old != v and type(v) is float:  # (the analysis keeps such fields whole)
                raise UserError(
                    f"in-place pruning: {type(model).__name__} built from the pruned config "
                    f"computes {path}.{k} = {v:g}, not {old:g}: reloaded, it would compute "
                    "otherwise; use passes.slim's module")
            if old != v and isinstance(old, type(v)):
                edits.attributes[f"{path}.{k}" if path else k] = (old, v)
    return edits


def _module_class(m: nn.Module) -> type:
    """The class of `m`, the one it was made from where a parametrization (weight norm)
    made it a class of its own (one per module: the rebuilt model's is another)."""
    return type(m).__bases__[0] if parametrize.is_parametrized(m) else type(m)


def _exact(num: int, den: int, fname: str) -> int:
    if num % den:
        raise UserError(f"in-place pruning: the plan leaves {fname} at {num / den:g}, not a "
                        "whole number; use passes.slim's module")
    return num // den


__all__ = ["is_pretrained", "call_kwargs", "Called", "config_ties", "governed_dims",
           "pretrained_edits", "PretrainedEdits", "width_fields"]
