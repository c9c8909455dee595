"""Torch-Pruning on the `transformers` list of `benchmarks/coverage.py --hf` (issue 20).

    OMP_NUM_THREADS=1 python benchmarks/hf_peer.py [--models NAME ...] [--timeout 60] \
        [--heads num dims] [--out PATH]

For every model of `benchmarks/hf_models.py` (tiny configs, random weights, the same inputs
as `coverage.py --hf`), Torch-Pruning is used the way its Hugging Face examples use it
(`examples/transformers/prune_hf_bert.py`, `prune_hf_vit.py`, `prune_hf_swin.py`,
`examples/LLMs/prune_llm.py`): `MetaPruner` with `GroupMagnitudeImportance(p=2)`,
`pruning_ratio=0.5`, `global_pruning=False`, the output layer (`lm_head` / `classifier` /
`score`, or the last linear layer of a classifier of several, RoBERTa's `out_proj`) in
`ignored_layers`, `output_transform=lambda out: out.logits.sum()`, and `num_heads`
mapping every q/k/v linear (or fused qkv linear) to its head count, with either
`prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.5` (`--heads num`, the
BERT and LLM examples) or `prune_head_dims=True, prune_num_heads=False` (`--heads dims`, the
ViT and Swin examples). Both modes run by default, one table each; a model whose graph did
not build in the first is not run again in the second (the graph does not depend on the
mode). The only per-class code is what the examples write too: a pruning function for
`SwinPatchMerging` (written here after `prune_hf_swin.py`). While the graph is built and
pruned, `config.use_cache` is off (with the key/value cache in the traced forward, its
`torch.cat` broke the graphs of gpt2 and gpt_neox in Torch-Pruning's index mapping); it is
restored after `step()`.

Per model it records:

- graph: `MetaPruner(...)` (which builds the dependency graph) returned;
- step: `pruner.step()` ran;
- forward: the pruned model's forward runs on the same inputs and its logits keep their shape;
- fixed-up forward: the same after the attributes are fixed up as the examples do (on every
  attention module: the head count(s) to `pruner.num_heads`, head size and all-head size from
  the q linear's width, the stored `scaling` left as the examples leave it; in the config, as
  `prune_llm.py` does: `hidden_size`, `num_attention_heads`, `num_key_value_heads`, the MLP
  width, and `embedding_size` / `word_embed_proj_dim` / `pooler_hidden_size` / `head_dim`
  where the config has them, from the pruned layers' widths). Per-stage list fields (Swin,
  Segformer, the CNNs) are not fixed up: no example shows how;
- MACs left: the pruned module's MACs (fixed up where that forward runs, else as pruned)
  over the unpruned's, both by graphsearch's cost model
  (`graphsearch.analyze(model, inputs).baseline.macs`), or, where the pruned module does not
  analyse, by torch's FLOP counter (which equals graphsearch's count on all 33 unpruned
  models, `coverage.md`): the `counter` column says which;
- reload: `save_pretrained`, then `from_pretrained` (the saved, fixed-up config), equals the
  pruned model on the inputs (rtol 1e-5, `graphsearch.passes.mask.verify`);
- generate: `generate()` of 3 new tokens runs on the causal LMs (pruned, fixed up).

Each stage runs only if the one before it did (forward: either forward). One model failing
does not stop the others; each model is cut after --timeout seconds of this process's CPU
time (`ITIMER_PROF`, so that a loaded machine does not cut it short).
Torch-Pruning is a benchmark-only install (`pip install --no-deps torch-pruning`), never a
dependency of graphsearch or of its tests.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import os
import shlex
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import hf_models  # noqa: E402
from graphsearch import analyze, hf  # noqa: E402
from graphsearch.passes.mask import verify  # noqa: E402

QKV = [("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"),
       ("query_proj", "key_proj", "value_proj")]
FUSED = ["query_key_value", "qkv_proj", "c_attn", "qkv"]
HEAD_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head")
KV_ATTRS = ("num_key_value_heads", "num_kv_heads")
HEAD_SIZE_ATTRS = ("attention_head_size", "head_dim", "head_size")
WIDTH_ATTRS = ("all_head_size", "embed_dim", "hidden_size", "dim", "split_size")
MLP_UP = ["intermediate.dense", "fc1", "lin1", "up_proj", "gate_up_proj", "dense_h_to_4h",
          "c_fc", "ffn", "intermediate_dense", "dense1"]
MLP_FIELDS = ("intermediate_size", "ffn_dim", "n_inner", "encoder_ffn_dim", "hidden_dim")


class Timeout(Exception):
    pass


@contextlib.contextmanager
def guard(seconds: float):
    """Raise `Timeout` in the main thread after `seconds` of this process's CPU time (user +
    system, `ITIMER_PROF`): a loaded machine does not cut a model short."""
    def fire(signum, frame):
        raise Timeout(f"over {seconds:.0f} CPU s")

    old = signal.signal(signal.SIGPROF, fire)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)


def short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".replace("|", "/")[:100]


def where(exc: BaseException) -> str:
    """`, in torch_pruning's <function>` for the innermost Torch-Pruning frame of `exc`."""
    tb, last = exc.__traceback__, None
    while tb is not None:
        if "torch_pruning" in tb.tb_frame.f_code.co_filename:
            last = tb.tb_frame.f_code.co_name
        tb = tb.tb_next
    return f" (torch_pruning's `{last}`)" if last else ""


def attention_layers(model: nn.Module, config) -> list[dict]:
    """Every attention module with its q, k, v linears (or its fused qkv linear), and their
    head counts read from the module (else the config)."""
    found = []
    for name, m in model.named_modules():
        kids = dict(m.named_children())
        heads = next((getattr(m, a) for a in HEAD_ATTRS if isinstance(getattr(m, a, None), int)),
                     None)
        cfg = getattr(m, "config", config)
        if heads is None:
            heads = getattr(cfg, "num_attention_heads", None)
        kv = next((getattr(m, a) for a in KV_ATTRS if isinstance(getattr(m, a, None), int)), None)
        if kv is None:
            kv = getattr(cfg, "num_key_value_heads", None) or heads
        for q, k, v in QKV:
            if all(isinstance(kids.get(x), nn.Linear) for x in (q, k, v)):
                found.append(dict(name=name, module=m, q=kids[q], k=kids[k], v=kids[v],
                                  heads=heads, kv=kv))
                break
        else:
            for f in FUSED:
                if f in kids:
                    found.append(dict(name=name, module=m, fused=kids[f], heads=heads, kv=kv))
                    break
    return found


def output_heads(model: nn.Module) -> list[nn.Module]:
    heads = []
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None:
        heads.append(out)
    for a in ("lm_head", "classifier", "score"):
        m = getattr(model, a, None)
        if not isinstance(m, nn.Module):
            continue
        if not isinstance(m, nn.Linear):  # a head of several layers (RoBERTa's dense +
            linears = [x for x in m.modules() if isinstance(x, nn.Linear)]  # out_proj):
            m = linears[-1] if linears else m  # the layer that gives the logits, as the
        if m not in heads:  # examples' `model.classifier`
            heads.append(m)
    return heads


def make_pruner(tp, model, inputs, attn, heads_mode: str):
    num_heads = {}
    for a in attn:
        if "fused" in a:  # prune_llm.py: the fused qkv linear -> num_attention_heads
            num_heads[a["fused"]] = a["heads"]
        else:
            num_heads[a["q"]] = a["heads"]
            num_heads[a["k"]] = a["kv"]
            num_heads[a["v"]] = a["kv"]
    by_heads = heads_mode == "num"
    cls = getattr(tp.pruner, "MetaPruner", None) or tp.pruner.BasePruner
    extra = {}
    merging = [type(m) for m in model.modules() if type(m).__name__ == "SwinPatchMerging"]
    if merging:  # as TP's Swin example: a pruner for the patch merging, which TP cannot trace
        extra = dict(customized_pruners={merging[0]: patch_merging_pruner(tp)},
                     root_module_types=(nn.Linear, nn.LayerNorm, merging[0]))
    return cls(
        model, inputs,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        global_pruning=False,
        pruning_ratio=0.5,
        iterative_steps=1,
        ignored_layers=output_heads(model),
        num_heads=num_heads,
        prune_num_heads=by_heads,
        prune_head_dims=not by_heads,
        head_pruning_ratio=0.5 if by_heads else 0.0,
        output_transform=lambda out: out.logits.sum(),
        **extra,
    )


def patch_merging_pruner(tp):
    """A Torch-Pruning pruning function for Swin's patch merging (four neighbours' channels
    concatenated, normalised, projected): what TP's `prune_hf_swin.py` supplies for it."""

    class PatchMerging(tp.BasePruningFunc):
        @staticmethod
        def width(layer):
            return layer.norm.normalized_shape[0] // 4

        def prune_out_channels(self, layer, idxs):
            tp.prune_linear_out_channels(layer.reduction, idxs)
            return layer

        def prune_in_channels(self, layer, idxs):
            dim = self.width(layer)
            every = [i + k * dim for k in range(4) for i in idxs]
            tp.prune_linear_in_channels(layer.reduction, every)
            tp.prune_layernorm_out_channels(layer.norm, every)
            return layer

        def get_out_channels(self, layer):
            return layer.reduction.out_features

        def get_in_channels(self, layer):
            return self.width(layer)

    return PatchMerging()


def fix_up(model, attn, pruner) -> dict:
    """Module attributes and config fields from the pruned widths (as the examples do);
    returns what it set in the config."""
    config = model.config
    for a in attn:
        m = a["module"]
        if "fused" in a:
            lin = a["fused"]
            heads = pruner.num_heads.get(lin, a["heads"])
            kv = a["kv"] if a["kv"] != a["heads"] else heads
            head_size = lin.out_features // (heads + 2 * kv) if isinstance(lin, nn.Linear) \
                else None
        else:
            heads = pruner.num_heads.get(a["q"], a["heads"])
            kv = pruner.num_heads.get(a["k"], a["kv"])
            head_size = a["q"].out_features // heads
        for attr in HEAD_ATTRS:
            if isinstance(getattr(m, attr, None), int):
                setattr(m, attr, heads)
        for attr in KV_ATTRS:
            if isinstance(getattr(m, attr, None), int):
                setattr(m, attr, kv)
        if isinstance(getattr(m, "num_key_value_groups", None), int):
            m.num_key_value_groups = heads // kv
        if head_size:
            for attr in HEAD_SIZE_ATTRS:
                if isinstance(getattr(m, attr, None), int):
                    setattr(m, attr, head_size)
            for attr in WIDTH_ATTRS:
                if isinstance(getattr(m, attr, None), int):
                    setattr(m, attr, heads * head_size)
        a["new_heads"], a["new_kv"], a["new_head_size"] = heads, kv, head_size
    set_fields = {}
    if not attn:
        return set_fields

    def put(field, value):
        if value is None or not hasattr(config, field):
            return
        old = getattr(config, field)
        if isinstance(old, (list, tuple)) or (old is not None and not isinstance(old, int)):
            return
        if field == "n_inner" or old is not None:
            setattr(config, field, int(value))
            set_fields[field] = int(value)

    first = attn[0]
    lin = first.get("fused", first.get("q"))
    width = lin.in_features if isinstance(lin, nn.Linear) else getattr(lin, "weight").shape[0]
    put("hidden_size", width)
    put("num_attention_heads", first["new_heads"])
    if getattr(config, "num_key_value_heads", None) is not None:
        put("num_key_value_heads", first["new_kv"])
    if getattr(config, "head_dim", None) is not None:
        put("head_dim", first["new_head_size"])
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(emb, nn.Embedding):
        for field in ("embedding_size", "word_embed_proj_dim"):  # the input embedding width
            if getattr(config, field, None) is not None:
                put(field, emb.embedding_dim)
    for name, m in model.named_modules():
        if name.endswith("pooler.dense") and isinstance(m, nn.Linear):
            if getattr(config, "pooler_hidden_size", None) is not None:
                put("pooler_hidden_size", m.out_features)
            break
    for name, m in model.named_modules():
        if any(name == u or name.endswith("." + u) for u in MLP_UP) and \
                isinstance(m, nn.Linear):
            width = m.out_features // (2 if name.endswith("gate_up_proj") else 1)
            for field in MLP_FIELDS:
                put(field, width)
            break
    return set_fields


def shape_mismatch(model, loaded) -> str:
    """The tensors whose shapes the saved config does not rebuild: `loaded`'s (or a model
    built from the config) against `model`'s."""
    if loaded is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = type(model)(model.config)
        except Exception as exc:  # noqa: BLE001
            return f"the saved config does not build: {short(exc)}"
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in loaded.state_dict().items()}
    bad = [k for k in want if k in got and want[k] != got[k]]
    if not bad:
        return ""
    return (f"{len(bad)} tensors' shapes not rebuilt from the config, e.g. {bad[0]} "
            f"{want[bad[0]]} vs {got[bad[0]]}")


def logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def forward_ok(model, inputs, shape) -> tuple[bool, str]:
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = logits(model(*inputs))
        if tuple(got.shape) != shape:
            return False, f"logits {tuple(got.shape)}, unpruned {shape}"
        if not torch.isfinite(got).all():
            return False, "non-finite logits"
        return True, ""
    except Timeout:
        raise
    except Exception as exc:  # noqa: BLE001
        return False, short(exc)


def gs_macs(model, inputs) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return analyze(model, inputs).baseline.macs


def flop_macs(model, inputs) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        hf.Called(model)(*inputs)
    return counter.get_total_flops() / 2 / inputs[0].shape[0]


def check(name: str, heads_mode: str, seconds: float) -> dict:
    import torch_pruning as tp

    row = {"model": name}
    t_start = time.process_time()
    try:
        with guard(seconds):
            _check(tp, name, heads_mode, row)
    except Timeout as exc:
        row["note"] = f"stopped: {exc} in {row.get('stage', '')}{where(exc)}"
    except Exception as exc:  # noqa: BLE001
        row["note"] = row.get("note") or f"{row.get('stage', '')}: {short(exc)}"
    row["total_s"] = time.process_time() - t_start
    return row


def count_macs(model, inputs, base_gs, base_flops, row) -> None:
    try:
        row["macs"] = gs_macs(model, inputs) / base_gs
        row["counter"] = "graphsearch"
    except Timeout:
        raise
    except Exception as exc:  # noqa: BLE001
        try:
            row["macs"] = flop_macs(model, inputs) / base_flops
            row["counter"] = "FLOP counter (graphsearch: " + (
                "export failed" if "export" in str(exc) else type(exc).__name__) + ")"
            row["gs_fail"] = short(exc)
        except Timeout:
            raise
        except Exception as exc2:  # noqa: BLE001
            row["note"] = row.get("note") or f"MACs: {short(exc2)}"


def attempt(row: dict, key: str, fn):
    """`fn()` with warnings silenced: row[key] says whether it ran, row["note"] why not
    (a `Timeout` goes through); returns its result."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn()
    except Timeout:
        raise
    except Exception as exc:  # noqa: BLE001
        row[key] = False
        row["note"] = f"{key}: {short(exc)}{where(exc)}"
        return None
    row[key] = True
    return out


def _check(tp, name, heads_mode, row):
    row["stage"] = "build"
    torch.manual_seed(0)
    model, inputs, kind = hf_models.build(name)
    row["class"] = type(model).__name__
    with torch.no_grad():
        shape = tuple(logits(model(*inputs)).shape)
    attn = attention_layers(model, model.config)
    row["attn"] = len(attn)
    row["heads0"] = attn[0]["heads"] if attn else None
    if attn:
        lin = attn[0].get("fused", attn[0].get("q"))
        row["hidden0"] = getattr(lin, "in_features", None)
    row["stage"] = "unpruned MACs"
    base_gs = gs_macs(model, inputs)
    base_flops = flop_macs(model, inputs)

    row["stage"] = "graph"
    t0 = time.process_time()
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is not None:  # a key/value cache in the traced forward: its torch.cat broke
        model.config.use_cache = False  # the graph of gpt2 and gpt_neox (index mapping)
    try:
        pruner = attempt(row, "graph", lambda: make_pruner(tp, model, inputs, attn, heads_mode))
        if not row["graph"]:
            return
        row["stage"] = "step"
        attempt(row, "step", pruner.step)
        if not row["step"]:
            return
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
    row["prune_s"] = time.process_time() - t0  # CPU seconds: the machine is shared

    row["stage"] = "forward"
    row["forward"], why = forward_ok(model, inputs, shape)
    if not row["forward"]:
        row["note"] = f"forward: {why}"
    as_pruned = copy.deepcopy(model) if row["forward"] else None
    row["stage"] = "fix-up"
    try:
        row["config_set"] = fix_up(model, attn, pruner)
        if attn:
            row["heads1"] = attn[0]["new_heads"]
        row["fixed"], why = forward_ok(model, inputs, shape)
        if not row["fixed"]:
            row["note"] = row.get("note") or f"fixed-up forward: {why}"
    except Timeout:
        raise
    except Exception as exc:  # noqa: BLE001
        row["fixed"] = False
        row["note"] = row.get("note") or f"fix-up: {short(exc)}"
    if attn:
        lin = attn[0].get("fused", attn[0].get("q"))
        row["hidden1"] = getattr(lin, "in_features", None)
    if row["fixed"] or row["forward"]:  # the fixed-up model where it runs, else as pruned
        row["stage"] = "pruned MACs"
        count_macs(model if row["fixed"] else as_pruned, inputs, base_gs, base_flops, row)
        del as_pruned
    if "macs" in row and row["macs"] > 0.6:
        row["note"] = row.get("note") or (
            "nothing pruned" if row["macs"] > 0.999 else "MACs left above 0.6")
    if not row["fixed"]:
        return
    row["stage"] = "reload"
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(tmp)
            loaded = type(model).from_pretrained(tmp).eval()
        v = verify(hf.Called(loaded), hf.Called(model), inputs, rtol=1e-5)
        mismatch = shape_mismatch(model, loaded)
        if mismatch:
            row["note"] = row.get("note") or f"reload: {mismatch}"
        row["reload"] = bool(v)
        if not v:
            row["note"] = row.get("note") or f"reload: {v.message}"
    except Timeout:
        raise
    except Exception as exc:  # noqa: BLE001
        row["reload"] = False
        mismatch = shape_mismatch(model, None)
        row["note"] = row.get("note") or f"reload: {mismatch or short(exc)}"
    if model.can_generate():
        row["stage"] = "generate"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = model.generate(inputs[0], max_new_tokens=3, do_sample=False,
                                     pad_token_id=0)
            row["generate"] = tuple(out.shape) == (inputs[0].shape[0], inputs[0].shape[1] + 3)
        except Timeout:
            raise
        except Exception as exc:  # noqa: BLE001
            row["generate"] = False
            row["note"] = row.get("note") or f"generate: {short(exc)}"
    row["stage"] = "done"


def mark(v) -> str:
    return "" if v is None else ("yes" if v else "**no**")


def passed(r: dict) -> bool:
    """Every check of the row passed and the MACs left are at most 0.6 (coverage.py's goal)."""
    return bool(r.get("graph") and r.get("step") and r.get("fixed") and r.get("reload")
                and r.get("macs", 1) <= 0.6 and r.get("generate", True))


MODES = {"num": "whole heads (`prune_num_heads=True, prune_head_dims=False, "
                "head_pruning_ratio=0.5`: the BERT and LLM examples)",
         "dims": "head dims (`prune_head_dims=True, prune_num_heads=False`: the ViT and Swin "
                 "examples)"}


def table(rows: list[dict], mode: str) -> list[str]:
    lines = [
        f"**Torch-Pruning, {MODES[mode]}**",
        "",
        "| model | graph | step | forward | fixed-up forward | heads (layer 0) | hidden | "
        "MACs left | counter | reload | generate | prune CPU s | note: first failure |",
        "|---|---|---|---|---|---|---|---:|---|---|---|---:|---|",
    ]
    for r in rows:
        heads = f"{r['heads0']} -> {r['heads1']}" if r.get("heads1") is not None else ""
        hidden = f"{r['hidden0']} -> {r['hidden1']}" if r.get("hidden1") is not None else ""
        macs = f"{r['macs']:.2f}" if "macs" in r else ""
        prune_s = f"{r['prune_s']:.1f}" if "prune_s" in r else ""
        lines.append(
            f"| {r['model']} | {mark(r.get('graph'))} | "
            f"{mark(r.get('step'))} | {mark(r.get('forward'))} | {mark(r.get('fixed'))} | "
            f"{heads} | {hidden} | {macs} | {r.get('counter', '')} | {mark(r.get('reload'))} | "
            f"{mark(r.get('generate'))} | {prune_s} | "
            f"{(r.get('note') or '').replace('|', '/')[:150]} |")
    good = [r for r in rows if passed(r)]
    lines += ["", f"{len(good)} of {len(rows)} models: graph, step, fixed-up forward, MACs "
              "left at most 0.6, reload (and generate on the causal LMs) all passed; "
              f"graph built {sum(bool(r.get('graph')) for r in rows)}, step ran "
              f"{sum(bool(r.get('step')) for r in rows)}, forward ran as pruned "
              f"{sum(bool(r.get('forward')) for r in rows)}, after the fix-up "
              f"{sum(bool(r.get('fixed')) for r in rows)}, MACs left at most 0.6 "
              f"{sum(r.get('macs', 1) <= 0.6 for r in rows)}, reload equal "
              f"{sum(bool(r.get('reload')) for r in rows)}."]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="only these names")
    parser.add_argument("--timeout", type=float, default=60.0, help="CPU seconds per model")
    parser.add_argument("--heads", nargs="+", choices=tuple(MODES), default=list(MODES),
                        help="num: prune whole heads (BERT/LLM examples); dims: head dims "
                             "(ViT/Swin examples); both by default")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import torch_pruning as tp
    import transformers
    from importlib.metadata import version

    command = "python " + " ".join(shlex.quote(a) for a in
                                   [Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    load0 = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    t0, c0 = time.time(), time.process_time()
    start = _dt.datetime.now(_dt.timezone.utc)
    rows = {mode: [] for mode in args.heads}
    for name in hf_models.MODELS:
        if args.models and name not in args.models:
            continue
        first = None
        for mode in args.heads:
            if first is not None and not first.get("graph"):
                # the dependency graph does not depend on the head mode: not built again
                row = {"model": name, "graph": first.get("graph"),
                       "note": f"not run: no graph in the {args.heads[0]} run"}
            else:
                row = check(name, mode, args.timeout)
            first = first or row
            rows[mode].append(row)
            print(mode, {k: v for k, v in row.items() if k != "config_set"}, flush=True)
    load1 = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"Command: `{command}`; started {start:%Y-%m-%d %H:%M} UTC, {time.time() - t0:.0f} s "
        f"wall, {time.process_time() - c0:.0f} s CPU; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, torch-pruning {version('torch-pruning')} (its "
        f"`__version__` says {tp.__version__}); 1 torch thread; load average {load0} at "
        f"start, {load1} at end.",
        "",
    ]
    for mode in args.heads:
        lines += table(rows[mode], mode) + [""]
    if len(args.heads) > 1:
        either = [rs for rs in zip(*rows.values()) if any(passed(r) for r in rs)]
        lines += [f"In either mode: {len(either)} of {len(rows[args.heads[0]])} models pass "
                  "every check."]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
