"""What a candidate evaluation is: its settings, its result, its key and seed, and the run.

A candidate is a keep plan. Its evaluation slices the inherited full-architecture weights to
the plan (the evaluator does that, `passes.slim`), trains the slim model for a fixed number
of optimizer steps (cross-entropy, or logit distillation from a teacher) and scores it on the
validation split. `run_candidate` is that run, the same code wherever it executes (in the
search's process, a local worker, a Ray task). Its training seed comes from the plan and the
settings only (`plan_seed`), so a candidate's score does not depend on where it ran;
`plan_key` names an evaluation for the cache (plan, settings, inherited weights, and
anything else that changes the result).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Callable, Mapping

import torch
from torch import nn

from ..graph import ChannelGraph
from ..load import UserError
from ..train import Distilled, evaluate, recalibrate_bn, steps_per_epoch, train

KEY_VERSION = 1  # part of every key: a change of what an evaluation means bumps it

OPTIMIZERS = ("sgd", "adam")  # a candidate's optimizer (EvalSettings.optimizer)


@dataclass(frozen=True)
class EvalSettings:
    """How one candidate is trained and scored."""

    steps: int  # optimizer steps of the short fine-tune (0: score the sliced weights as they are)
    lr: float
    batch_size: int
    optimizer: str = "sgd"  # one of OPTIMIZERS: "sgd" (momentum, weight decay, cosine), "adam"
    weight_decay: float = 5e-4
    momentum: float = 0.9
    distill: bool = False  # logit-MSE distillation from the teacher instead of cross-entropy
    seed: int = 0
    # adaptive BN: re-estimate the sliced model's BatchNorm statistics on this many training
    # images before it trains or is scored (0: keep the inherited ones)
    bn_images: int = 0
    # score on this many validation samples, a fixed draw (0: the whole validation split)
    val_samples: int = 0

    def __post_init__(self):
        if self.steps < 0:
            raise UserError(f"candidate training steps must be non-negative, got {self.steps}")
        if self.bn_images < 0 or self.val_samples < 0:
            raise UserError("candidate bn_images and val_samples must be non-negative")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"candidate optimizer {self.optimizer!r}: choose one of "
                            f"{', '.join(OPTIMIZERS)}")


@dataclass
class EvalResult:
    key: str
    keep: dict  # group id -> kept indices (changed groups only)
    accuracy: float  # top-1 on the validation split, in [0, 1]
    flops: float
    macs: float
    params: float
    seconds: float  # training + scoring time of the evaluation (when it ran)
    cached: bool = False  # read back from the cache, not run now
    label: str = ""
    error: str = ""  # the plan could not be sliced (accuracy is NaN): methods skip it
    state: dict | None = None  # the trained slim model's state dict (`return_state=True`)
    probe: object = None  # what the evaluation's probe returned on the trained candidate

    def __repr__(self) -> str:  # without the tensors
        return (f"EvalResult(key={self.key!r}, label={self.label!r}, accuracy={self.accuracy}, "
                f"flops={self.flops}, cached={self.cached}, state={self.state is not None}, "
                f"probe={self.probe is not None}, error={self.error!r})")


def canonical_keep(keep: Mapping) -> dict[int, list[int]]:
    """A plan in one canonical form: int group ids, sorted kept indices."""
    return {int(g): sorted(int(i) for i in v) for g, v in sorted(keep.items(),
                                                                  key=lambda kv: int(kv[0]))}


def weights_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A content hash of a state dict (names, shapes, dtypes, values)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def plan_key(keep: Mapping, settings: EvalSettings, weights: str,
             extra: Mapping[str, str] | None = None) -> str:
    """The cache key of an evaluation: the plan, the settings, the inherited weights' digest
    and `extra` (anything else that changes a result: a probe's digest, a data tag; absent
    from the key when empty, so plain evaluations keep their keys)."""
    obj = {"v": KEY_VERSION, "keep": {str(g): v for g, v in canonical_keep(keep).items()},
           "settings": asdict(settings), "weights": weights}
    if extra:
        obj["extra"] = {str(k): str(v) for k, v in extra.items()}
    blob = json.dumps(obj, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def plan_seed(keep: Mapping, settings: EvalSettings) -> int:
    """The training seed of a candidate: from its plan and the settings' seed only."""
    blob = json.dumps({"keep": {str(g): v for g, v in canonical_keep(keep).items()},
                       "seed": int(settings.seed)}, sort_keys=True)
    return int(hashlib.sha256(blob.encode()).hexdigest()[:8], 16) % (2 ** 31 - 1)


def dumps(obj) -> bytes:
    """`obj` as bytes (torch.save): how modules, teachers, probes and results travel."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def loads(blob: bytes):
    return torch.load(io.BytesIO(blob), weights_only=False)


def teacher_module(graph: ChannelGraph, teacher_state) -> nn.Module:
    """The full architecture with the teacher's weights, in eval mode (distillation)."""
    t = copy.deepcopy(graph.module)
    t.load_state_dict(dict(teacher_state))
    return t.eval()


def validation_indices(size: int, samples: int) -> torch.Tensor:
    """The positions (sorted) of the `samples` of a validation split of `size` that every
    candidate is scored on: a draw by a fixed seed (benchmarks read the same part)."""
    pick = torch.randperm(size, generator=torch.Generator().manual_seed(0))[:samples]
    return pick.sort().values


def validation_part(val, samples: int):
    """`samples` of the validation split, the same ones for every candidate (a draw by a fixed
    seed), or the whole split when `samples` is 0 or not smaller than it."""
    if not samples or val is None or samples >= len(val):
        return val
    pick = validation_indices(len(val), samples)
    if callable(getattr(val, "subset", None)):
        return val.subset(pick.tolist())
    return torch.utils.data.Subset(val, pick.tolist())


def _distill_loss(out, y):
    return nn.functional.mse_loss(out[0], out[1])


def run_candidate(module: nn.Module, data, settings: EvalSettings, seed: int,
                  teacher: nn.Module | None = None, return_state: bool = False,
                  probe: Callable[[nn.Module], object] | None = None) -> dict:
    """Train `module` (a slim model) for `settings.steps` steps with training seed `seed` and
    return its validation top-1 ("accuracy"), with `return_state` its trained state dict
    ("state"), with `probe` (a bound probe, see `Probe`) what the probe returns on the
    trained module ("probe"). Runs on one torch thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.time()
    try:
        if settings.bn_images:
            recalibrate_bn(module, data.train, settings.bn_images, settings.batch_size, seed)
        if settings.steps > 0:
            per_epoch = max(1, steps_per_epoch(len(data.train), settings.batch_size, None))
            epochs = max(1, -(-settings.steps // per_epoch))
            net, loss_fn = module, None
            if settings.distill:
                if teacher is None:
                    raise ValueError("distillation needs a teacher")
                net, loss_fn = Distilled(module, teacher), _distill_loss
            if settings.optimizer == "adam":
                def optimizer(m, lr=settings.lr, wd=settings.weight_decay):
                    return torch.optim.Adam([p for p in module.parameters() if p.requires_grad],
                                            lr=lr, weight_decay=wd)
                scheduler = (lambda opt, total: torch.optim.lr_scheduler.LambdaLR(
                    opt, lambda s: 1.0))
            else:
                def optimizer(m, s=settings):
                    return torch.optim.SGD([p for p in module.parameters() if p.requires_grad],
                                           lr=s.lr, momentum=s.momentum,
                                           weight_decay=s.weight_decay)
                scheduler = None
            train(net, SimpleNamespace(train=data.train, val=None), epochs=epochs,
                  lr=settings.lr, batch_size=settings.batch_size, seed=seed, progress=False,
                  checkpoint=None, desc="candidate", loss_fn=loss_fn, max_steps=settings.steps,
                  optimizer=optimizer, scheduler=scheduler, evaluate_every_epoch=False,
                  device="cpu")
        acc = evaluate(module, validation_part(data.val, settings.val_samples),
                       distributed=False, device="cpu")
        out = {"accuracy": float(acc)}
        if return_state:
            out["state"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        if probe is not None:
            out["probe"] = probe(module)
    finally:
        torch.set_num_threads(threads)
    out["seconds"] = time.time() - t0
    return out


def pack_result(out: dict) -> dict:
    """A worker's result for the trip back: the weights and the probe's result as one blob
    (tensors travel as bytes, not through shared memory)."""
    extras = {k: out.pop(k) for k in ("state", "probe") if k in out}
    if extras:
        out["extras"] = dumps(extras)
    return out


def unpack_result(out: dict) -> dict:
    if "extras" in out:
        out = {**out, **loads(out["extras"])}
        out.pop("extras")
    return out

