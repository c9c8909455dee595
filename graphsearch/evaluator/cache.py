"""The evaluation cache: finished evaluations kept in a folder, keyed by `plan_key`.

`KEY.json` holds a result's scores and costs, `KEY.pt` what is too big for JSON (the trained
slim weights, a probe's result). Every file is written atomically, the `.pt` before the
`.json` that names it, so a search killed at any moment (`kill -9` in the middle of a batch)
leaves only whole entries, and `--resume` reads back the finished ones. A damaged or
incomplete entry reads as missing: the evaluation simply runs again. `stats.json` (not an
entry) holds the evaluator's counts for the report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from ..checkpoint import write_atomic, write_json
from .candidate import EvalResult, dumps

STATS_FILE = "stats.json"  # an evaluator's counts, written next to its cache (not an entry)
JSON_FIELDS = ("key", "keep", "accuracy", "flops", "macs", "params", "seconds", "label",
               "error")


@dataclass
class EvalCache:
    """The entries in `folder` (None: a cache that keeps nothing)."""

    folder: Path | None

    def __post_init__(self):
        if self.folder is not None:
            self.folder = Path(self.folder)
            self.folder.mkdir(parents=True, exist_ok=True)

    def _entry(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{key}.json"

    def _extras(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{key}.pt"

    def read(self, key: str, state: bool = False, probe: bool = False) -> EvalResult | None:
        """The finished evaluation `key` (marked `cached`), with its trained weights when
        `state` and its probe's result when `probe`; None when it is not there whole."""
        path = self._entry(key)
        if path is None or not path.exists():
            return None
        try:
            d = json.loads(path.read_text())
            d = {k: d[k] for k in JSON_FIELDS if k in d}
            d["keep"] = {int(g): v for g, v in d["keep"].items()}
            r = EvalResult(**{**d, "cached": True})
        except (ValueError, KeyError, TypeError):
            return None  # a damaged entry is simply evaluated again
        if (state or probe) and not r.error:
            try:
                extras = torch.load(self._extras(key), weights_only=False)
            except Exception:  # noqa: BLE001 (missing or damaged: evaluate again)
                return None
            if (state and "state" not in extras) or (probe and "probe" not in extras):
                return None
            r.state = extras.get("state") if state else None
            r.probe = extras.get("probe") if probe else None
        return r

    def write(self, r: EvalResult, extras: dict) -> None:
        """Keep `r`; `extras` ("state", "probe") go to its `.pt`, written first."""
        path = self._entry(r.key)
        if path is None:
            return
        if extras:
            write_atomic(self._extras(r.key), dumps(extras), every_rank=True)
        d = {k: getattr(r, k) for k in JSON_FIELDS}
        d["keep"] = {str(g): v for g, v in r.keep.items()}
        write_json(path, d, every_rank=True)  # workers are not torchrun ranks

    def discard_states(self, keys: Iterable[str]) -> None:
        """Drop the trained weights of these entries (scores and probe results stay)."""
        for key in keys:
            path = self._extras(key)
            if path is None or not path.exists():
                continue
            try:
                extras = torch.load(path, weights_only=False)
            except Exception:  # noqa: BLE001
                path.unlink(missing_ok=True)
                continue
            if isinstance(extras, dict) and "state" in extras:
                extras.pop("state")
                write_atomic(path, dumps(extras), every_rank=True)

    def write_stats(self, counts: dict) -> None:
        if self.folder is not None:
            write_json(self.folder / STATS_FILE, counts, every_rank=True)
