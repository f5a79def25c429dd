"""Formatting helpers and lookups shared by the sections of docs/benchmarks.md (report_doc and friends)."""

from __future__ import annotations

from typing import Any

MIB = 2 ** 20
PLAIN = "plain CE (no teachers)"
ONLINE = "online KD, 10 teachers in memory"


def table(header: tuple, rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_x(v: float) -> str:
    return f"{v:.2f}×"


def mib(v: float) -> str:
    return f"{v / MIB:.0f} MiB"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def first(values: list) -> Any:
    """The 1-minute load average of a ``load_average()`` list ('?' where the platform gave none)."""
    return values[0] if values else "?"


def teacher_gflops(tr: dict) -> float:
    return sum(v for k, v in tr["gflops"].items() if not k.startswith("student"))


def by_key(me: dict) -> dict[tuple[str, int], dict]:
    """Memory rows by (method, teachers)."""
    return {(r["method"], r["teachers"]): r for r in me["results"]}


def by_store(st: dict) -> dict[str, dict]:
    return {r["store"]: r for r in st["reads"]}


def fused_rows(tr: dict) -> bool:
    """Older results: separate "…, fused AdamW" loops beside a default-AdamW plain CE baseline."""
    return any("fused" in name for name in tr["results"])
