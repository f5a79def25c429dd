"""Evaluation leaves unreadable images out, counts and names them, as ``ktc extract`` does.

An image is unreadable either because extraction recorded it so (``samples/ok`` false: its teacher
outputs are NaN) or because it fails to decode only now (a ``--data``/``--val`` file that was never
extracted, or a file changed since). One bad file must not cost a whole evaluation, nor may it go unseen:
the metrics are over the readable images and say how many were skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import click
import torch

from kt_cache.errors import ImageDecodeError

SHOWN = 5   # paths named in the message and the metrics; the count is always complete


class Skipped:
    """The unreadable images met so far (sample paths, in order)."""

    def __init__(self, names: Sequence[str] = ()) -> None:
        self.names = list(names)

    def add(self, names: Sequence[str]) -> None:
        self.names.extend(names)

    def as_metrics(self) -> dict[str, Any]:
        return {"skipped": len(self.names), "skipped_images": self.names[:SHOWN]}

    def report(self, where: str) -> None:
        """One stderr line when anything was skipped: stdout may be ``--json``, which must stay parseable."""
        if self.names:
            more = f" (+{len(self.names) - SHOWN} more)" if len(self.names) > SHOWN else ""
            click.echo(f"evaluation on {where}: skipped {len(self.names)} unreadable image(s): "
                       f"{', '.join(self.names[:SHOWN])}{more}", err=True)


class Readable(torch.utils.data.Dataset):
    """``dataset[i]``, or ``{"unreadable": names[i]}`` when its image does not decode."""

    def __init__(self, dataset: torch.utils.data.Dataset, names: Sequence[str]) -> None:
        self.dataset, self.names = dataset, list(names)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return self.dataset[i]
        except ImageDecodeError:
            return {"unreadable": self.names[i]}


def collate_readable(items: list[dict[str, Any]], collate: Callable) -> dict[str, Any]:
    """The readable items collated (None if there are none) and the names of the unreadable ones."""
    good = [it for it in items if "unreadable" not in it]
    bad = [it["unreadable"] for it in items if "unreadable" in it]
    return {"batch": collate(good) if good else None, "unreadable": bad}


def readable_batches(dataset: torch.utils.data.Dataset, names: Sequence[str], skipped: Skipped, batch_size: int,
                     workers: int, collate: Callable = torch.utils.data.default_collate) -> Iterator[Any]:
    """Batches of the readable items, in order; the unreadable ones are added to ``skipped``."""
    loader = torch.utils.data.DataLoader(Readable(dataset, names), batch_size=batch_size, num_workers=workers,
                                         collate_fn=partial(collate_readable, collate=collate))
    for batch in loader:
        skipped.add(batch["unreadable"])
        if batch["batch"] is not None:
            yield batch["batch"]
