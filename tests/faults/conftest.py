"""Fault-injection suite (the store's integrity contract, docs/store-format.md).

Every test here damages, kills or feeds bad input to a real command and records what happened with the
``fault_log`` fixture. ``benchmarks/reliability.py`` runs this folder with ``KTC_FAULT_LOG`` set and turns
the records into the table of docs/reliability.md; without the variable the records go nowhere.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/extract_helpers.py, tests/http_server.py

KINDS = ("damage", "kill", "bad-input", "concurrency", "remote", "resource")


@pytest.fixture()
def fault_log(request: pytest.FixtureRequest) -> Callable[..., None]:
    """Record one fault case: ``fault_log(item, kind, case, command, exit_code, outcome, bytes_lost=0)``.

    ``item`` is the integrity item number it proves, ``kind`` one of KINDS, ``outcome`` what the user sees
    (one line), ``bytes_lost`` the bytes of finished work that the fault destroyed and nothing recovered.
    Record after the assertions, so only a case that behaved as stated is logged.
    """
    target = os.environ.get("KTC_FAULT_LOG")

    def log(item: int, kind: str, case: str, command: str, exit_code: int | None, outcome: str,
            bytes_lost: int = 0) -> None:
        assert kind in KINDS, f"fault_log kind {kind!r} not in {KINDS}"
        if not target:
            return
        record = {"test": request.node.nodeid, "item": item, "kind": kind, "case": case, "command": command,
                  "exit_code": exit_code, "outcome": outcome, "bytes_lost": int(bytes_lost)}
        with open(target, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")

    return log
