"""A text classifier whose input is token ids, with its own data, loss and metric: how a
model that is not an image classifier is optimised (see "Your own data, loss and metric" in
the README).

    graphsearch optimize examples/text_classifier.py --method magnitude --flops 0.5

The task is made up and needs no download: a sequence of 24 tokens from a 200-word
vocabulary belongs to the class whose keywords it holds most of. The three hooks below are
what `optimize` reads from a model.py besides `build_model` and `example_inputs`.
"""

import torch
from torch import nn
from torch.utils.data import TensorDataset

VOCAB, SEQ, CLASSES, DIM, HIDDEN = 200, 24, 4, 32, 64


class TextClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.fc1 = nn.Linear(DIM, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, ids):  # ids: (batch, SEQ) int64
        h = self.embed(ids).sum(1)  # a bag of embeddings
        h = torch.relu(self.fc1(h))
        h = torch.relu(self.fc2(h))
        return self.head(h)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return TextClassifier()


def example_inputs():
    return (torch.zeros(1, SEQ, dtype=torch.long),)


def _make(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    ids = torch.randint(CLASSES * 10, VOCAB, (n, SEQ), generator=g)  # filler words
    # Each class owns ten keywords (ids 10c .. 10c+9); a sequence holds 2-5 of its own
    # class's and up to 2 of another's.
    for i in range(n):
        own = 10 * int(labels[i]) + torch.randint(0, 10, (int(torch.randint(2, 6, (1,),
                                                                             generator=g)),),
                                                  generator=g)
        other = 10 * int(torch.randint(0, CLASSES, (1,), generator=g)) + \
            torch.randint(0, 10, (int(torch.randint(0, 2, (1,), generator=g)),), generator=g)
        words = torch.cat([own, other])
        pos = torch.randperm(SEQ, generator=g)[:len(words)]
        ids[i, pos] = words
    return TensorDataset(ids, labels)


def datasets():
    """{"train", "val", "test"}: map-style datasets of (input, target). "val" and "test" are
    optional: without them graphsearch holds them out of "train" by --seed."""
    return {"train": _make(2000, 0), "val": _make(400, 1), "test": _make(400, 2)}


def loss_fn(output, target):
    """The training loss (here cross-entropy with label smoothing)."""
    return nn.functional.cross_entropy(output, target, label_smoothing=0.1)


@torch.no_grad()
def evaluate(model, dataset) -> float:
    """The metric of every decision and of the report, higher is better: macro-averaged F1."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=256)
    pred = torch.cat([model(x).argmax(1) for x, _ in loader])
    true = torch.cat([y for _, y in loader])
    f1 = []
    for c in range(CLASSES):
        tp = ((pred == c) & (true == c)).sum().item()
        fp = ((pred == c) & (true != c)).sum().item()
        fn = ((pred != c) & (true == c)).sum().item()
        f1.append(2 * tp / max(2 * tp + fp + fn, 1))
    return sum(f1) / CLASSES
