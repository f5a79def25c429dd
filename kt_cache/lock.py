"""One writer per store: ``ktc extract`` holds ``<store>.ktc-lock`` (beside the store, so it exists before
the store does and is never listed, packed or hashed as a store object) while it creates, fills and
finalizes the store.

The lock file is JSON (pid, host, command, start time, a random token) created with ``O_EXCL``. The holder
refreshes its modification time every ``HEARTBEAT_S``. A lock is stale, and taken over with a message, when
its holder ran on this host and is gone, or when its heartbeat is older than ``STALE_AFTER_S`` (a holder on
another machine that died). ``ktc extract --force-unlock`` removes a lock the user knows is dead.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kt_cache.errors import KtError

LOCK_SUFFIX = ".ktc-lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


class StoreBusyError(KtError):
    """Another live process holds the store's lock (exit code 1)."""


def lock_path(store: Path) -> Path:
    return store.with_name(store.name + LOCK_SUFFIX)


@contextmanager
def store_lock(store: Path, command: str, force: bool = False) -> Iterator[None]:
    """Hold the store's lock for the body; refuse with the holder named when another live writer has it."""
    path = lock_path(Path(store))
    path.parent.mkdir(parents=True, exist_ok=True)
    if force and path.exists():
        print(f"{store}: --force-unlock: removing the lock of {describe(read_lock(path))}", file=sys.stderr)
        path.unlink(missing_ok=True)
    token = acquire(path, command, store)
    stop = threading.Event()
    beat = threading.Thread(target=heartbeat, args=(path, token, stop), name="ktc-lock", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        release(path, token)


def acquire(path: Path, command: str, store: Path) -> str:
    token = uuid.uuid4().hex
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "token": token}
    for _ in range(2):             # the second try follows the removal of a stale lock
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_lock(path)
            if not is_stale(path, holder):
                raise StoreBusyError(busy_message(store, holder)) from None
            print(f"{store}: taking over a stale lock ({describe(holder)})", file=sys.stderr)
            remove_if_token(path, holder.get("token"))
            continue
        with os.fdopen(descriptor, "w") as handle:
            json.dump(record, handle)
        return token
    raise StoreBusyError(busy_message(store, read_lock(path)))


def read_lock(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}                       # half-written or removed meanwhile: judged by its age alone
    return record if isinstance(record, dict) else {}


def is_stale(path: Path, holder: dict[str, Any]) -> bool:
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return not pid_alive(holder["pid"])
    return age > STALE_AFTER_S


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                     # alive, owned by another user
    return True


def heartbeat(path: Path, token: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        if read_lock(path).get("token") == token:
            os.utime(path)


def release(path: Path, token: str) -> None:
    remove_if_token(path, token)


def remove_if_token(path: Path, token: Any) -> None:
    """Remove the lock only if it is still the one judged (a fresh lock of another process stays)."""
    if read_lock(path).get("token") == token:
        path.unlink(missing_ok=True)


def describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "an unreadable lock file"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}: "
            f"{holder.get('command')}")


def busy_message(store: Path, holder: dict[str, Any]) -> str:
    return (f"{store}: another process is writing this store ({describe(holder)}); its lock is "
            f"{lock_path(Path(store))}. Two writers would compute units twice. Fix: wait for it to finish and rerun "
            "(the rerun resumes and computes only what is left); if that process is gone (its machine died), "
            "rerun with --force-unlock.")
