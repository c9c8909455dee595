"""Train the benchmarks' converged baseline: CIFAR ResNet-20 (or -32) on the training folder.

    python benchmarks/train_baseline.py --model resnet20 --epochs 30 \
        --train /work/runs/cifar/train40k --val /work/runs/cifar/val5k \
        --test /work/runs/cifar/test5k --out benchmarks/weights/resnet20_cifar10.pt

Recipe: SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 128, a one-cycle schedule
(linear warm-up over the first 15% of steps to --lr, then cosine to 0), random crop and flip;
`--cutout N` adds a random N x N square zeroed in every augmented training image (DeVries and
Taylor 2017; the GPU baselines, `benchmarks/device_baselines.sh`).
The validation folder is evaluated after every epoch (it only watches; nothing is chosen on
it, the last epoch's weights are saved); the test folder once, at the end. The run checkpoints
every epoch next to --out and resumes. Prints a line a epoch and a summary to paste into
the results. Without --val/--test, both are held out of --train exactly as `graphsearch
optimize` holds them out by default (the demo's weights: `--train synthetic`).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import time
from pathlib import Path

import torch

from graphsearch.data import load_dataset
from graphsearch.train import evaluate, train
from graphsearch.zoo import build


def one_cycle(warmup: float = 0.15):
    def factory(opt, total):
        up = max(1, int(total * warmup))

        def f(s):
            if s < up:
                return (s + 1) / up
            return 0.5 * (1 + math.cos(math.pi * min(s - up, total - up) / max(1, total - up)))
        return torch.optim.lr_scheduler.LambdaLR(opt, f)
    return factory


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return platform.processor() or platform.machine()


def with_cutout(dataset, size: int):
    """Make `dataset`'s augmented batches also zero one size x size square per image (its
    centre uniform over the image, clipped at the border), drawn from (aug_seed, index) like
    the crops, so a resumed run sees the same squares."""
    plain = dataset.get_batch
    centres: dict[int, tuple] = {}  # aug_seed -> every image's (cy, cx), drawn once an epoch

    def get_batch(indices, *, augment=None, aug_seed=None, device=None):
        x, y = plain(indices, augment=augment, aug_seed=aug_seed, device=device)
        if not (dataset.augment if augment is None else augment):
            return x, y
        idx = torch.as_tensor(indices, dtype=torch.long)
        h, w = x.shape[-2:]
        if aug_seed is None:
            cy, cx = torch.randint(0, h, (len(idx),)), torch.randint(0, w, (len(idx),))
        else:
            if aug_seed not in centres:
                g = torch.Generator().manual_seed(int(aug_seed) * 2 + 1)
                centres.clear()
                centres[aug_seed] = (torch.randint(0, h, (len(dataset),), generator=g),
                                     torch.randint(0, w, (len(dataset),), generator=g))
            cy, cx = (t[idx] for t in centres[aug_seed])
        ys = torch.arange(h).view(1, h, 1) - cy.view(-1, 1, 1) + size // 2
        xs = torch.arange(w).view(1, 1, w) - cx.view(-1, 1, 1) + size // 2
        hole = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
        return x.masked_fill(hole.unsqueeze(1).to(x.device), 0.0), y
    dataset.get_batch = get_batch
    return dataset


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", required=True)
    ap.add_argument("--val", help="validation data (default: held out of --train as "
                                   "`graphsearch optimize` does, by --seed)")
    ap.add_argument("--test", help="test data (default: held out of --train likewise)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cutout", type=int, default=0,
                    help="zero a random N x N square of every augmented training image (0: off)")
    ap.add_argument("--init", type=Path, help="start from these weights (a second cycle: "
                    "continue a shorter run, usually with a lower --lr)")
    args = ap.parse_args(argv)

    from graphsearch.optimize import OptimizeConfig

    cfg = OptimizeConfig(model=args.model)  # the held-out shares `optimize` uses by default
    data = load_dataset(args.train, val_data=args.val, test_data=args.test,
                        val_fraction=0.0 if args.val else cfg.val_fraction,
                        test_fraction=0.0 if args.test else cfg.test_fraction, seed=args.seed)
    if args.cutout:
        with_cutout(data.train, args.cutout)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    torch.manual_seed(args.seed)
    model = build(args.model)
    if args.init:
        model.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True))
    wd = args.weight_decay

    def sgd(m):
        decay = [p for n, p in m.named_parameters() if p.ndim > 1]
        rest = [p for n, p in m.named_parameters() if p.ndim <= 1]
        return torch.optim.SGD([{"params": decay, "weight_decay": wd},
                                {"params": rest, "weight_decay": 0.0}],
                               lr=args.lr, momentum=0.9, nesterov=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    res = train(model, data, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                seed=args.seed, optimizer=sgd, scheduler=one_cycle(),
                checkpoint=args.out.with_suffix(".ckpt"), desc=args.model)
    for h in res.history:
        print(f"epoch {h['epoch']:3d}  loss {h['train_loss']:.3f}  train {h['train_accuracy']:.4f}"
              f"  val {h.get('val_accuracy', float('nan')):.4f}  {h['seconds']:.1f}s", flush=True)
    test = evaluate(model, data.test)
    val = evaluate(model, data.val)
    torch.save(model.state_dict(), args.out)
    print(f"\n{args.model}: {args.epochs} epochs on {len(data.train)} images, "
          f"val {val:.2%}, test {test:.2%}, {sum(h['seconds'] for h in res.history) / 60:.1f} "
          f"min of training ({time.time() - start:.0f} s this call), torch threads "
          f"{torch.get_num_threads()}, {device_name()}, "
          f"load {os.getloadavg()[0]:.1f} at the end; weights {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
