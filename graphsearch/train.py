"""Training and evaluation loops for `graphsearch optimize`.

`train(model, data, epochs=..., lr=...)` runs SGD with momentum and weight decay under a
per-step cosine schedule (or an optimizer/scheduler the caller builds), and returns a
:class:`TrainResult` with per-epoch history. Compression methods hook in through
`extra_loss(model)` (a regulariser added to the task loss) and `on_step(model, step)` (called
after every optimizer step, e.g. for a proximal step or a mask update).

Reproducible: the epoch order comes from a generator seeded with (seed, epoch), the crops and
flips of :class:`graphsearch.data.ImageTensorDataset` from (seed, epoch, image index), and the
global torch RNG (dropout and the like) is seeded with `seed`. Two runs with the same seed
reach identical weights on the CPU.

Resumable: with `checkpoint=path`, model, optimizer, scheduler, RNG state and position are
saved atomically at the end of every epoch (and every `checkpoint_every` steps), and a run
that finds the file continues from it. Because every random choice above is a function of
(seed, epoch, index) or restored state, a resumed run reaches bit-identical weights.

Distributed: under `torchrun` (WORLD_SIZE > 1) the process group is initialised (gloo on the
CPU, nccl on GPUs) unless the caller already did it. The model is wrapped in
DistributedDataParallel, each epoch's permutation is sharded with a DistributedSampler, and
`batch_size` stays the *global* batch size (each rank takes batch_size / world_size). Metrics
are summed over ranks; only rank 0 shows progress and writes checkpoints. BatchNorm keeps
per-rank batch statistics (plain DDP behaviour): convert the model with
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` before calling `train` to share them.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from . import checkpoint as ckpt
from .load import UserError
from .rules import Rules, default_rules

__all__ = ["TrainResult", "EvalResult", "train", "evaluate", "evaluate_metrics",
           "distributed_context", "steps_per_epoch", "Recipe", "RECIPES", "Distilled",
           "soft_target_loss", "recalibrate_bn"]

CHECKPOINT_FORMAT = "graphsearch-train-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class EvalResult:
    """Top-1 accuracy in [0, 1] (nan for an empty set), mean loss, and the number of samples."""

    accuracy: float
    loss: float
    count: int


@dataclass
class TrainResult:
    """What a `train` call did. Metrics of the last epoch; `history` has one dict per epoch."""

    epochs: int  # epochs finished (counting those done before a resume)
    steps: int  # optimizer steps taken in total
    train_loss: float  # mean task loss over the last epoch
    train_accuracy: float  # on augmented training batches, in train mode
    val_accuracy: float | None  # None when there is no validation set or it was not evaluated
    val_loss: float | None
    seconds: float  # wall time of this call
    history: list[dict] = field(default_factory=list)
    resumed_from: dict | None = None  # {"epoch": e, "step": s} if a checkpoint was resumed
    stopped_at_max_steps: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Distributed set-up


@dataclass
class _Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1


def distributed_context() -> _Dist:
    """World size, rank and local rank; initialises the process group under torchrun.

    If torch.distributed is already initialised, its group is used. Otherwise, WORLD_SIZE > 1
    in the environment (as set by torchrun) initialises it with the env:// method: nccl when
    CUDA is available, gloo on the CPU.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_available():
        return _Dist()
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return _Dist()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return _Dist(dist.get_world_size(), dist.get_rank(), local_rank)


def _default_device(model: nn.Module, d: _Dist) -> torch.device:
    """Where to train when the caller does not say: one GPU per rank under torchrun, else
    the GPU the model already sits on, else the current GPU, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if d.active:
        return torch.device("cuda", d.local_rank)
    p = next(iter(model.parameters()), None)
    if p is not None and p.device.type == "cuda":
        return p.device
    return torch.device("cuda", torch.cuda.current_device())


def _all_sum(values: list[float], d: _Dist, device: torch.device) -> list[float]:
    """Sum a few numbers over ranks (float64, so that sums of counts stay exact)."""
    if not d.active:
        return values
    t = torch.tensor(values, dtype=torch.float64,
                     device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


# --------------------------------------------------------------------------------------------
# Fine-tuning recipes and distillation


@dataclass(frozen=True)
class Recipe:
    """How a model is fine-tuned: the optimizer and the learning-rate schedule around a peak
    `lr` given to :meth:`factories`. One object, so that the pipeline, the benchmarks and the
    report name the same thing."""

    name: str
    # "cosine": from lr to 0; "one-cycle": warm up, then cosine to 0; "torch-one-cycle":
    # torch's OneCycleLR with its defaults (30% warm-up from lr/25, cosine to lr/25e4, the
    # momentum cycled between 0.95 and 0.85 against the learning rate)
    schedule: str = "cosine"
    nesterov: bool = False
    momentum: float = 0.9
    weight_decay: float = 5e-4
    decay_1d: bool = True  # weight decay on 1-D parameters too (norm gamma/beta, biases)
    warmup: float = 0.0  # share of the steps spent warming up (one-cycle)

    def describe(self) -> str:
        sgd = f"SGD{' (Nesterov)' if self.nesterov else ''}" + (
            "" if self.schedule == "torch-one-cycle" else f", momentum {self.momentum:g}")
        wd = f"weight decay {self.weight_decay:g}" + ("" if self.decay_1d else
                                                       " (none on norms and biases)")
        sched = {"cosine": "cosine from the peak to 0",
                 "one-cycle": f"one-cycle: linear warm-up over {self.warmup:.0%} of the steps "
                              "from 1/25 of the peak, then cosine to 0",
                 "torch-one-cycle": "torch's OneCycleLR: cosine warm-up over 30% of the steps "
                                    "from 1/25 of the peak, cosine to 1/25e4 of it, momentum "
                                    "cycled 0.95-0.85"}[self.schedule]
        return f"{sgd}, {wd}, {sched}"

    def factories(self, lr: float) -> dict:
        """`optimizer` and `scheduler` arguments of :func:`train` for this recipe."""
        def optimizer(model: nn.Module) -> torch.optim.Optimizer:
            params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            decay = [p for n, p in params if self.decay_1d or p.ndim > 1]
            rest = [p for n, p in params if not (self.decay_1d or p.ndim > 1)]
            groups = [{"params": decay, "weight_decay": self.weight_decay}]
            if rest:
                groups.append({"params": rest, "weight_decay": 0.0})
            return torch.optim.SGD(groups, lr=lr, momentum=self.momentum,
                                   nesterov=self.nesterov)

        def scheduler(opt: torch.optim.Optimizer, total: int):
            if self.schedule == "torch-one-cycle":
                return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr,
                                                           total_steps=max(int(total), 1))
            up = int(total * self.warmup) if self.schedule == "one-cycle" else 0

            def factor(s: int) -> float:
                if s < up:
                    return 1 / 25 + (1 - 1 / 25) * s / up
                t = min(s - up, total - up) / max(total - up, 1)
                return 0.5 * (1.0 + math.cos(math.pi * t))
            return torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": optimizer, "scheduler": scheduler}


RECIPES = {
    # the default of `optimize` (OptimizeConfig.finetune_recipe): Torch-Pruning's fine-tuning
    # recipe, ahead of sgd-cosine on the same plan on the validation folder in both seeds
    # (benchmarks/results/peer.md)
    "nesterov-one-cycle": Recipe("nesterov-one-cycle", schedule="torch-one-cycle",
                                 nesterov=True),
    "sgd-cosine": Recipe("sgd-cosine"),
    "one-cycle": Recipe("one-cycle", schedule="one-cycle", nesterov=True, warmup=0.15,
                        decay_1d=False),
}


class Distilled(nn.Module):
    """Student and frozen teacher side by side: forward returns (student, teacher) outputs,
    so the training loop counts the student's accuracy (the first element) and the loss
    compares the two. The teacher stays in eval mode and gets no gradient."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.student = student
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        self.training = mode
        self.student.train(mode)
        self.teacher.eval()
        return self

    def forward(self, x):
        s = logits_of(self.student(x))
        with torch.no_grad():
            t = logits_of(self.teacher(x))
        return s, t


def soft_target_loss(temperature: float = 4.0, weight: float = 0.9) -> Callable:
    """Knowledge distillation (Hinton et al. 2015) for a :class:`Distilled` output:
    `weight * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - weight) * CE(s, y)`."""
    t2 = temperature ** 2

    def loss(out, y):
        s, t = out
        kl = nn.functional.kl_div(nn.functional.log_softmax(s / temperature, dim=1),
                                  nn.functional.log_softmax(t / temperature, dim=1),
                                  reduction="batchmean", log_target=True)
        if weight >= 1:
            return t2 * kl
        return weight * t2 * kl + (1 - weight) * nn.functional.cross_entropy(s, y)
    return loss


def recalibrate_bn(model: nn.Module, dataset, images: int, batch_size: int = 128,
                   seed: int = 0, rules: Rules | None = None) -> int:
    """Re-estimate the BatchNorm running statistics of `model` from `images` training images
    drawn by `seed` (no augmentation, exact averages over the batches), as adaptive BN does
    for a pruned network (EagleEye, Li et al. 2020): a sliced network's inherited statistics
    describe channels it no longer has. The modules are those whose rule (in `rules`,
    default the project's) has running statistics. Returns the number of images used."""
    rules = rules if rules is not None else default_rules()
    bns = [m for m in rules.with_running_statistics(model) if hasattr(m, "reset_running_stats")]
    if not bns or images <= 0 or dataset is None or len(dataset) < 2:
        return 0
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(len(dataset), generator=gen)[:images]
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    saved = [(m, m.momentum) for m in bns]
    was = model.training
    used = 0
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        model.train()
        with torch.no_grad(), _channels_last(model, dataset, device):
            for chunk in idx.split(batch_size):
                if len(chunk) < 2:
                    continue
                if callable(getattr(dataset, "get_batch", None)):
                    x, _ = dataset.get_batch(chunk, augment=False, device=device)
                else:
                    x = torch.stack([dataset[int(i)][0] for i in chunk]).to(device)
                model(x)
                used += len(chunk)
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.train(was)
    return used


# --------------------------------------------------------------------------------------------
# Batches


def _batches_for_epoch(n: int, batch_size: int, seed: int, epoch: int, d: _Dist,
                       shuffle: bool = True) -> list[torch.Tensor]:
    """This rank's batches (index tensors) of one epoch.

    A DistributedSampler (with one replica when not distributed) permutes with a generator
    seeded by seed + epoch and gives rank r the positions r, r + world, ... of the
    permutation. Cutting that into chunks of batch_size / world makes the union of the
    ranks' k-th batches exactly the k-th batch of a one-process run with the same seed.
    """
    sampler = DistributedSampler(range(n), num_replicas=d.world, rank=d.rank, shuffle=shuffle,
                                 seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler), dtype=torch.long)
    per_rank = batch_size // d.world
    batches = list(order.split(per_rank))
    # A last batch of one sample breaks BatchNorm in train mode; the sampler pads every rank
    # to the same length, so all ranks drop it together.
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()
    return batches


def steps_per_epoch(n: int, batch_size: int, world: int | None = 1) -> int:
    """Optimizer steps in one epoch of `n` samples, exactly as `train` takes them: each of
    `world` ranks gets ceil(n / world) samples (DistributedSampler pads) in batches of
    batch_size / world, and a last batch of one sample is dropped (it breaks BatchNorm in
    train mode) unless it is the only one. `world=None`: this process group's size (1 when
    not distributed). The one formula for everything that budgets steps.
    """
    if world is None:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if n <= 0:
        return 0
    per_rank = max(1, batch_size // world)
    samples = -(-n // world)
    steps = -(-samples // per_rank)
    last = samples - (steps - 1) * per_rank
    return steps - 1 if steps > 1 and last < 2 else steps


def _aug_seed(seed: int, epoch: int) -> int:
    # A stream separate from the permutation's (seed + epoch); plain integer arithmetic
    # because Python's hash() of strings changes between processes.
    return (seed * 1_000_003 + epoch * 7_919 + 97) % (2 ** 62)


class _Loader:
    """Yields (x, y) on `device` for a list of index batches, via the fast path if possible."""

    def __init__(self, dataset: Dataset, device: torch.device, num_workers: int = 0):
        self.dataset = dataset
        self.device = device
        self.fast = callable(getattr(dataset, "get_batch", None))
        self.num_workers = num_workers

    def __call__(self, batches: list[torch.Tensor], *, aug_seed: int | None = None,
                 augment: bool | None = None):
        if self.fast:
            for idx in batches:
                yield self.dataset.get_batch(idx, augment=augment, aug_seed=aug_seed,
                                             device=self.device)
            return
        # Any other map-style dataset: a DataLoader over exactly these batches.
        loader = DataLoader(self.dataset, batch_sampler=[b.tolist() for b in batches],
                            num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda")
        for item in loader:
            x, y = item[0], item[1]
            yield (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))


def logits_of(out):
    """The class logits of a model's output: the first element of a tuple (auxiliary heads,
    an exported graph's outputs), `logits` of a Hugging Face output."""
    if isinstance(out, (tuple, list)):
        return out[0]
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    return out


def _default_loss(out, y):
    logits = logits_of(out)
    if not y.is_floating_point() and y.numel() and logits.dim() >= 2:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= logits.shape[1]:  # cross-entropy would fail with a traceback
            raise UserError(f"a label {lo if lo < 0 else hi} is outside the {logits.shape[1]} "
                            f"classes of the model's output {tuple(logits.shape)}: build the "
                            "model with as many outputs as the data has classes (labels 0 to "
                            "classes-1), or fix the labels of datasets() in model.py")
    return nn.functional.cross_entropy(logits, y)


def _correct(out, y) -> int:
    logits = logits_of(out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or y.dim() != 1:
        return 0
    return int((logits.argmax(1) == y).sum())


def _show_progress(progress: bool, d: _Dist) -> bool:
    if not progress or d.rank != 0:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# Memory layout

# Convolutions on the CPU (oneDNN) run faster on channels-last tensors than on the default
# layout (benchmarks/results/channels_last.md: 1.3-1.55x on a CIFAR ResNet-20), in training
# and in evaluation; the results differ only by float rounding. GRAPHSEARCH_CHANNELS_LAST=1
# turns it on (set it alike for every worker and Ray node). Off by default: with it on, the
# full suite on a fresh clone (file order, under load) twice found an evaluation in a worker
# differing by rounding from the same one in-process (tests/test_evaluator,
# test_gensynth_parallel, test_ray); not reproduced by test_gensynth_parallel.py alone
# (results/channels_last.md).
# A forward that cannot run channels-last (a `.view` of a feature map, say) is found by one
# probe per architecture and input shape on a hook-free copy, and that architecture keeps the
# default layout. The decision is a function of the model and its input alone, whatever ran
# before in the process: the same in a worker, in-process and in a rerun.
CHANNELS_LAST = os.environ.get("GRAPHSEARCH_CHANNELS_LAST", "0") == "1"
_channels_last_ok: dict[int, bool] = {}  # (architecture, input shape)'s hash -> forward ran


def _probe_batch(dataset, device: torch.device):
    """Two samples of `dataset` as a batch (None when its inputs are not one image tensor)."""
    try:
        idx = torch.arange(min(2, len(dataset)))
        if callable(getattr(dataset, "get_batch", None)):
            x = dataset.get_batch(idx, augment=False, device=device)[0]
        else:
            x = torch.stack([dataset[int(i)][0] for i in idx]).to(device)
    except Exception:  # inputs that do not stack into one tensor: leave the layout alone
        return None
    return x if isinstance(x, torch.Tensor) and x.dim() == 4 else None


def _runs_channels_last(model: nn.Module, dataset, device: torch.device) -> bool:
    if not CHANNELS_LAST or device.type != "cpu" or dataset is None \
            or not any(p.dim() == 4 for p in model.parameters()):
        return False
    images = getattr(dataset, "images", None)  # the project's image tensors: no read needed
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        x, shape = None, tuple(images.shape[1:])
    else:
        x = _probe_batch(dataset, device)
        shape = None if x is None else tuple(x.shape[1:])
    if shape is None:  # this data's inputs are not image batches: no answer to keep
        return False
    arch = hash((type(model).__qualname__, shape,
                 tuple((n, tuple(p.shape)) for n, p in model.named_parameters())))
    if arch not in _channels_last_ok:
        x = x if x is not None else _probe_batch(dataset, device)
        if x is None:
            return False
        probe = copy.deepcopy(model).eval()
        for m in probe.modules():  # the user's hooks must not see the probe
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
        probe.to(memory_format=torch.channels_last)
        try:
            with torch.no_grad():
                probe(x)
            ok = True
        except Exception:
            ok = False
        _channels_last_ok[arch] = ok
    return _channels_last_ok[arch]


class _channels_last:
    """Within the block, `model`'s 4-D parameters and buffers are channels-last where that is
    faster and the forward runs (see CHANNELS_LAST); the default layout is restored after."""

    # models an outer block holds (training's own evaluations). Weak: a model dropped inside a
    # block that never exited leaves no entry behind, where a set of ids would hand its
    # address, and so a stale "held", to the next model allocated there.
    held: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()

    def __init__(self, model: nn.Module, dataset, device: torch.device):
        self.model = model
        self.on = model not in self.held and _runs_channels_last(model, dataset, device)

    def __enter__(self):
        if self.on:
            self.held.add(self.model)
            self.model.to(memory_format=torch.channels_last)
        return self

    def __exit__(self, *exc):
        if self.on:
            self.held.discard(self.model)
            self.model.to(memory_format=torch.contiguous_format)
        return False


# --------------------------------------------------------------------------------------------
# Evaluation


def flush_denormals() -> None:
    """Flush subnormal floats to zero on CPU. A shrinking search (group lasso, MorphNet) drives
    weights and activations towards zero, and x86 arithmetic on subnormals is tens of times
    slower: measured on CIFAR ResNet-20, group lasso's second search epoch ran 3-4x slower
    than its first once the penalty had shrunk the survivors. Values below 1.2e-38 become 0,
    which changes no result the tool reports."""
    torch.set_flush_denormal(True)


@torch.no_grad()
def evaluate_metrics(model: nn.Module, dataset: Dataset | None, batch_size: int = 256, *,
                     loss_fn: Callable | None = None, device: torch.device | str | None = None,
                     distributed: bool | None = None, num_workers: int = 0) -> EvalResult:
    """Accuracy and mean loss of `model` on `dataset`, in eval mode, without augmentation.

    Under torch.distributed (unless `distributed=False`) each rank evaluates every
    world_size-th sample and the sums are all-reduced, so *all ranks must call this*; the
    result is the same on every rank and counts each sample exactly once.

    A dataset with a `metric` (model.py's `evaluate(model, dataset)`, see
    :func:`graphsearch.data.attach_hooks`) is scored by it instead: `accuracy` holds the
    metric's value and `loss` is nan. Every rank computes it on the whole dataset.
    """
    flush_denormals()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if dataset is None or len(dataset) == 0:
        return EvalResult(float("nan"), float("nan"), 0)
    metric = getattr(dataset, "metric", None)
    if metric is not None:
        was_training = model.training
        model.eval()
        try:
            value = metric(model, dataset)
        finally:
            model.train(was_training)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise UserError(f"evaluate() in model.py returned {type(value).__name__}; return "
                            "one number, higher is better") from None
        return EvalResult(value, float("nan"), len(dataset))
    d = _Dist()
    if distributed is not False and dist.is_available() and dist.is_initialized():
        d = _Dist(dist.get_world_size(), dist.get_rank())
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    loss_fn = loss_fn or getattr(dataset, "loss_fn", None) or _default_loss
    order = torch.arange(d.rank, len(dataset), d.world)  # no padding: no sample twice
    batches = list(order.split(batch_size))
    was_training = model.training
    model.eval()
    correct = loss_sum = count = 0.0
    try:
        with _channels_last(model, dataset, device):
            for x, y in _Loader(dataset, device, num_workers)(batches, augment=False):
                out = model(x)
                loss_sum += float(loss_fn(out, y)) * len(y)
                correct += _correct(out, y)
                count += len(y)
    finally:
        model.train(was_training)
    correct, loss_sum, count = _all_sum([correct, loss_sum, count], d, device)
    if count == 0:
        return EvalResult(float("nan"), float("nan"), 0)
    return EvalResult(correct / count, loss_sum / count, int(count))


def evaluate(model: nn.Module, dataset: Dataset | None, batch_size: int = 256,
             **kwargs) -> float:
    """Top-1 accuracy in [0, 1] of `model` on `dataset` (see :func:`evaluate_metrics`)."""
    return evaluate_metrics(model, dataset, batch_size, **kwargs).accuracy


# --------------------------------------------------------------------------------------------
# Training


def train(model: nn.Module, data, *, epochs: int, lr: float, batch_size: int = 128,
          weight_decay: float = 5e-4, momentum: float = 0.9, seed: int = 0,
          progress: bool = True, checkpoint: str | os.PathLike | None = None,
          desc: str = "train", loss_fn: Callable | None = None,
          extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
          on_step: Callable[[nn.Module, int], None] | None = None,
          max_steps: int | None = None,
          optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
          scheduler: Callable[[torch.optim.Optimizer, int], object] | None = None,
          checkpoint_every: int | None = None, device: torch.device | str | None = None,
          evaluate_every_epoch: bool = True, num_workers: int = 0) -> TrainResult:
    """Train `model` in place on `data.train`, evaluating on `data.val` after every epoch.

    data: a :class:`graphsearch.data.DataBundle`, or anything with `.train` (a map-style
        dataset of (x, y)) and `.val` (a dataset or None).
    epochs, lr, batch_size, weight_decay, momentum: SGD settings; `batch_size` is global
        (split over ranks under torchrun). The learning rate follows a cosine from `lr` to 0
        over all steps (epochs x steps per epoch, or `max_steps` if fewer).
    optimizer: optional factory `optimizer(model) -> Optimizer` replacing SGD (lr,
        momentum and weight_decay are then ignored); scheduler: optional factory
        `scheduler(optimizer, total_steps)` replacing the cosine, stepped once per step.
    loss_fn: `loss_fn(output, target) -> scalar`; default: the training set's own `loss_fn`
        attribute (model.py's hook, see :func:`graphsearch.data.attach_hooks`), else
        cross-entropy.
    extra_loss: `extra_loss(model) -> scalar tensor`, added to the task loss each step.
    on_step: `on_step(model, step)`, called after each optimizer step (step counts from 1).
    max_steps: stop after this many optimizer steps in total.
    checkpoint: path of a checkpoint file, written at the end of every epoch (and every
        `checkpoint_every` steps) and resumed from if it exists.
    progress: tqdm bar on rank 0 when stderr is a terminal.

    Raises UserError if the loss becomes NaN or infinite.
    """
    flush_denormals()
    if epochs < 0 or int(epochs) != epochs:
        raise UserError(f"epochs must be a non-negative integer, got {epochs}")
    if optimizer is None and not lr > 0:
        raise UserError(f"the learning rate must be positive, got {lr}")
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    if max_steps is not None and max_steps < 0:
        raise UserError(f"max_steps must be non-negative, got {max_steps}")
    train_set, val_set = data.train, getattr(data, "val", None)
    if train_set is None or len(train_set) == 0:
        raise UserError("the training set is empty")

    started = time.time()
    d = distributed_context()
    if batch_size % d.world:
        raise UserError(f"batch_size {batch_size} is not divisible by the {d.world} processes; "
                        "the batch size is global, choose a multiple of the process count")
    device = torch.device(device) if device is not None else _default_device(model, d)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # DDP needs an index
    model.to(device)
    loss_fn = loss_fn or getattr(train_set, "loss_fn", None) or _default_loss

    # Seed the global RNG for dropout and other in-model randomness (restored on resume).
    torch.manual_seed(seed)

    per_epoch = steps_per_epoch(len(train_set), batch_size, d.world)
    total_steps = epochs * per_epoch
    if max_steps is not None:
        total_steps = min(total_steps, int(max_steps))

    if optimizer is not None:
        opt = optimizer(model)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if scheduler is not None:
        sched = scheduler(opt, max(total_steps, 1))
    else:
        horizon = max(total_steps, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, horizon) / horizon)))

    config = {"epochs": int(epochs), "lr": float(lr), "batch_size": int(batch_size),
              "weight_decay": float(weight_decay), "momentum": float(momentum),
              "seed": int(seed), "max_steps": max_steps, "train_size": len(train_set),
              "steps_per_epoch": per_epoch}

    # ---- resume
    epoch, step_in_epoch, global_step = 0, 0, 0
    sums = [0.0, 0.0, 0.0, 0.0]  # task loss, extra loss, correct, count of the current epoch
    history: list[dict] = []
    resumed_from = None
    done = False
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        state = _read_checkpoint(path, config)
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"checkpoint '{path}' does not fit this model or optimizer "
                            f"({first}); delete it to start afresh") from exc
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and state["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        epoch, step_in_epoch = state["epoch"], state["step_in_epoch"]
        global_step, history = state["global_step"], state["history"]
        # The saved sums are already totals over ranks: one rank carries them on.
        sums = list(state["sums"]) if d.rank == 0 else [0.0, 0.0, 0.0, 0.0]
        done = state["done"]
        resumed_from = {"epoch": epoch, "step": global_step}

    def save(is_done: bool) -> None:
        if path is None:
            return
        total_sums = _all_sum(sums, d, device)  # collective: every rank must get here
        if d.rank == 0:
            rng = {"torch": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
            ckpt.save_atomic({
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config,
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": rng, "epoch": epoch,
                "step_in_epoch": step_in_epoch, "global_step": global_step, "sums": total_sums,
                "history": history, "done": is_done}, path)
        if d.active:
            dist.barrier()  # nobody runs ahead of (or resumes from) a file still being written

    was_training = model.training
    stopped = False
    last_eval = (None, None)
    bar = None
    # before DDP wraps the model: its gradient buckets take the parameters' layout; whatever
    # fails from here on, the `finally` gives the model its layout back
    layout = _channels_last(model, train_set, device).__enter__()
    try:
        net: nn.Module = model
        if d.active:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        loader = _Loader(train_set, device, num_workers)
        if _show_progress(progress, d):
            from tqdm.auto import tqdm
            bar = tqdm(total=total_steps, initial=min(global_step, total_steps), desc=desc,
                       unit="step", dynamic_ncols=True, leave=True)
        while not done and epoch < epochs and global_step < total_steps:
            epoch_start = time.time()
            batches = _batches_for_epoch(len(train_set), batch_size, seed, epoch, d)
            if bar is not None:
                bar.set_description(f"{desc} {epoch + 1}/{epochs}")
            model.train()
            batch_iter = loader(batches[step_in_epoch:], aug_seed=_aug_seed(seed, epoch))
            for x, y in batch_iter:
                out = net(x)
                loss = loss_fn(out, y)
                extra = extra_loss(model) if extra_loss is not None else None
                total = loss + extra if extra is not None else loss
                _check_finite(total, d, device, desc, epoch, step_in_epoch, per_epoch,
                              lr, loss, extra)
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                sched.step()
                global_step += 1
                step_in_epoch += 1
                if on_step is not None:
                    on_step(model, global_step)
                sums[0] += float(loss.detach()) * len(y)
                sums[1] += float(extra.detach()) * len(y) if extra is not None else 0.0
                sums[2] += _correct(out, y)
                sums[3] += len(y)
                if bar is not None:
                    bar.update(1)
                    if global_step % 10 == 0 or step_in_epoch == len(batches):
                        bar.set_postfix(loss=f"{sums[0] / max(sums[3], 1):.3f}",
                                        acc=f"{sums[2] / max(sums[3], 1):.3f}",
                                        lr=f"{opt.param_groups[0]['lr']:.3g}")
                if global_step >= total_steps:
                    stopped = step_in_epoch < len(batches)
                    break
                if checkpoint_every and global_step % checkpoint_every == 0 \
                        and step_in_epoch < len(batches):
                    save(False)
            # ---- end of epoch (or of max_steps)
            loss_sum, extra_sum, correct, count = _all_sum(sums, d, device)
            entry = {"epoch": epoch + 1, "steps": global_step,
                     "train_loss": loss_sum / max(count, 1),
                     "train_accuracy": correct / max(count, 1),
                     "lr": opt.param_groups[0]["lr"],
                     "seconds": round(time.time() - epoch_start, 3)}
            if extra_loss is not None:
                entry["extra_loss"] = extra_sum / max(count, 1)
            if stopped:
                entry["partial_epoch"] = True
            last_is = stopped or epoch + 1 == epochs or global_step >= total_steps
            if val_set is not None and len(val_set) and (evaluate_every_epoch or last_is):
                ev = evaluate_metrics(model, val_set, max(256, batch_size), loss_fn=loss_fn,
                                      device=device, num_workers=num_workers)
                entry["val_accuracy"], entry["val_loss"] = ev.accuracy, ev.loss
                last_eval = (ev.accuracy, ev.loss)
                if bar is not None:
                    bar.set_postfix(loss=f"{entry['train_loss']:.3f}",
                                    acc=f"{entry['train_accuracy']:.3f}",
                                    val=f"{ev.accuracy:.3f}")
            history.append(entry)
            epoch += 1
            step_in_epoch = 0
            sums = [0.0, 0.0, 0.0, 0.0]
            done = epoch >= epochs or global_step >= total_steps
            save(done)
    finally:
        layout.__exit__(None, None, None)
        if bar is not None:
            bar.close()
        model.train(was_training)

    last = history[-1] if history else {}
    val_acc, val_loss = last.get("val_accuracy", last_eval[0]), last.get("val_loss", last_eval[1])
    return TrainResult(
        epochs=epoch, steps=global_step, train_loss=last.get("train_loss", float("nan")),
        train_accuracy=last.get("train_accuracy", float("nan")), val_accuracy=val_acc,
        val_loss=val_loss, seconds=time.time() - started, history=history,
        resumed_from=resumed_from,
        stopped_at_max_steps=bool(max_steps is not None and global_step >= max_steps
                                  and global_step < epochs * per_epoch))


def _check_finite(total, d: _Dist, device, desc, epoch, step, steps_per_epoch, lr, loss,
                  extra) -> None:
    """Raise UserError if the loss is NaN/inf on any rank (all ranks raise together)."""
    ok = bool(torch.isfinite(total.detach()).all())
    if d.active:
        # Agree before backward(): a rank that raised alone would leave the others waiting
        # in DDP's gradient all-reduce forever.
        ok = _all_sum([0.0 if ok else 1.0], d, device)[0] == 0.0
    if ok:
        return
    what = "the loss"
    if extra is not None and bool(torch.isfinite(loss.detach()).all()):
        what = "the extra (regulariser) loss"
    raise UserError(f"{desc}: {what} became {float(total.detach()):.4g} at epoch {epoch + 1}, "
                    f"step {step + 1}/{steps_per_epoch}; training diverged. Lower the learning "
                    f"rate (lr={lr:g}), e.g. by 10x, or check the data and the loss")


def _read_checkpoint(path: Path, config: dict) -> dict:
    try:
        state = ckpt.load(path)
    except Exception:  # noqa: BLE001
        try:
            # A custom optimizer/scheduler may keep state that weights_only refuses; the file
            # is this run's own checkpoint, named by the caller.
            state = ckpt.load(path, weights_only=False)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"cannot read checkpoint '{path}' ({exc}); delete it to start "
                            "afresh") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"'{path}' is not a graphsearch training checkpoint; delete it or "
                        "choose another checkpoint path")
    saved = state.get("config", {})
    diff = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in config.items() if saved.get(k) != v]
    if diff:
        raise UserError(f"checkpoint '{path}' was written with other settings "
                        f"({', '.join(diff)}); delete it or choose another checkpoint path to "
                        "start afresh")
    return state
