"""Teacher weights: find a checkpoint file, read it without running code, fit it to a model strictly.

Every failure is a ``TeacherError`` that names the teacher, the file and the fix. Pickled checkpoints
are read with ``torch.load(weights_only=True)`` only: a file that needs arbitrary Python objects is
refused, never unpickled. Hub downloads run inside ``hub_guard``, which fails fast (and clearly) when
the model hub cannot be reached.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import pickle
import socket
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from kt_cache.errors import TeacherError, did_you_mean

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
CHECKPOINT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
NESTED_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")   # timm's preference order
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_PROBE_TTL_S = 60.0
_probe_cache: dict[str, tuple[float, bool]] = {}


def resolve_checkpoint(teacher_id: str, checkpoint: Path | str, base_dir: Path | None = None) -> Path:
    """Turn a manifest ``checkpoint:`` into an existing file, without importing any package.

    Args:
        teacher_id: for error messages.
        checkpoint: a path (absolute, or relative to ``base_dir``) or ``"pkg:<module>/<relative file>"``.
        base_dir: the manifest's folder.

    Returns:
        The absolute path of the file.
    """
    text = str(checkpoint)
    path = _package_file(teacher_id, text[4:]) if text.startswith("pkg:") else Path(text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise TeacherError(
            f"teacher {teacher_id}: checkpoint {text!r} is {kind} ({path}); a checkpoint is one weights file. "
            "Fix: point `checkpoint:` at the .safetensors/.pth file itself (e.g. inside that folder).")
    if not path.is_file():
        raise TeacherError(
            f"teacher {teacher_id}: checkpoint {text!r} does not exist (looked for {path}). "
            "Fix: set `checkpoint:` to an existing .safetensors/.pth file (relative paths are resolved "
            "against the manifest's folder), or remove it to use the model hub's weights."
        )
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise TeacherError(
            f"teacher {teacher_id}: checkpoint {path} has the unsupported suffix {path.suffix!r}. "
            f"Fix: save the weights as .safetensors (preferred) or as a state dict in one of {PICKLE_SUFFIXES}."
        )
    return path.resolve()


def _package_file(teacher_id: str, ref: str) -> Path:
    """``<module>/<relative file>`` -> path inside the installed package, found via its import spec."""
    module, _, rel = ref.partition("/")
    parts = module.split(".")
    try:
        spec = importlib.util.find_spec(parts[0]) if parts[0] else None
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations or not rel:
        raise TeacherError(
            f"teacher {teacher_id}: checkpoint 'pkg:{ref}' names package {module!r}, which is not an installed "
            "package (or no file was given after the '/'). Fix: install the package that ships the weights, "
            "or write `pkg:<package>/<file inside it>`, or give a local file path."
        )
    for location in locations:
        candidate = Path(location, *parts[1:], rel)
        if candidate.is_file():
            return candidate
    root = Path(locations[0], *parts[1:])
    shipped = [str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in CHECKPOINT_SUFFIXES]
    raise TeacherError(
        f"teacher {teacher_id}: package {module!r} (at {root}) has no file {rel!r}."
        f"{did_you_mean(rel, shipped)} Files it ships: {shipped[:5]}. Fix: correct the path after 'pkg:{module}/'."
    )


def file_sha256(path: Path, block: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(teacher_id: str, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Read a checkpoint file into a flat tensor dict on the CPU; no code in the file is run.

    Returns:
        ``(state_dict, nested_key)``; ``nested_key`` is "" when the file is a bare state dict, else the
        key it was unwrapped from ("state_dict_ema", "model_ema", "state_dict" or "model").
    """
    safe = path.suffix.lower() == ".safetensors"
    obj = _safetensors_load(teacher_id, path) if safe else _torch_load(teacher_id, path)
    key = ""
    if isinstance(obj, Mapping):
        key = next((k for k in NESTED_KEYS if isinstance(obj.get(k), Mapping)), "")
    state = obj[key] if key else obj
    if not isinstance(state, Mapping):
        raise TeacherError(
            f"teacher {teacher_id}: checkpoint {path} holds a {type(state).__name__}, not a state dict. "
            "Fix: save `model.state_dict()` (safetensors.torch.save_file or torch.save), not the model object."
        )
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TeacherError(
            f"teacher {teacher_id}: checkpoint {path} has non-tensor entries {bad[:5]} in its state dict. "
            "Fix: save only `model.state_dict()`."
        )
    return {_strip_wrappers(str(k)): v for k, v in state.items()}, key


def _strip_wrappers(key: str) -> str:
    """Drop DDP / torch.compile prefixes ("module.", "_orig_mod.") like timm's clean_state_dict."""
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _safetensors_load(teacher_id: str, path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise TeacherError(
            f"teacher {teacher_id}: checkpoint {path} is not a readable safetensors file ({err}). "
            "Fix: re-download or re-save the weights with safetensors.torch.save_file."
        ) from err


def _torch_load(teacher_id: str, path: Path) -> Any:
    """``torch.load(weights_only=True)``; argparse.Namespace (timm training checkpoints) is allowed."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(path)
        if not unsafe and "unsupported global" not in str(err).lower():
            raise _unreadable(teacher_id, path, err) from err
        raise TeacherError(
            f"teacher {teacher_id}: checkpoint {path} contains pickled Python objects{unsafe} that safe "
            "(weights_only) loading refuses; ktc never runs code from a weights file. Fix: in a trusted "
            "environment, load it and re-save only the tensors: "
            "`safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')`."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise _unreadable(teacher_id, path, err) from err


def _unreadable(teacher_id: str, path: Path, err: Exception) -> TeacherError:
    return TeacherError(
        f"teacher {teacher_id}: checkpoint {path} could not be read ({type(err).__name__}: {str(err)[:200]}). "
        "Fix: check the file is complete (re-download it) and was written by torch.save or safetensors."
    )


def _unsafe_globals(path: Path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - best effort detail for the message
        return ""
    return f" ({', '.join(names[:5])})" if names else ""


def remap_by_order(
    teacher_id: str, path: Path, state: dict[str, torch.Tensor], model: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """timm's ``remap_state_dict``: give the i-th checkpoint tensor the model's i-th key.

    Raises ``TeacherError`` when the counts differ or a pair differs in element count (timm zips
    silently / asserts). Tensors with equal element count but another shape are reshaped, as timm does.
    """
    target = model.state_dict()
    if len(target) != len(state):
        raise TeacherError(
            f"teacher {teacher_id}: `remap: true` pairs tensors by order, but checkpoint {path} has "
            f"{len(state)} tensors and the model has {len(target)}. Fix: use the model the checkpoint was "
            "trained as (model name / model_args), or drop `remap:` if the key names already match."
        )
    out = {}
    for (key, want), (src, value) in zip(target.items(), state.items()):
        if want.numel() != value.numel():
            raise TeacherError(
                f"teacher {teacher_id}: `remap: true` failed at model tensor {key} {tuple(want.shape)}: the "
                f"checkpoint's tensor in that position is {src} {tuple(value.shape)} in {path}. Fix: use the "
                "model the checkpoint was trained as (model name / model_args such as num_classes)."
            )
        out[key] = value.reshape(want.shape) if want.shape != value.shape else value
    return out


def load_strict(
    teacher_id: str, path: Path, model: torch.nn.Module, state: Mapping[str, torch.Tensor], model_name: str,
    remap_hint: bool,
) -> None:
    """``model.load_state_dict(state, strict=True)`` with a readable report when they do not fit.

    Args:
        model_name: the manifest's model name, for the message.
        remap_hint: suggest ``remap: true`` in the fix (timm teachers that do not use it yet).
    """
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in target.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        found = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        parts = "; ".join(f"{name} {_first(items)}" for name, items in found if items)
        hint = " or `remap: true` when only the key names differ (same architecture, other codebase)"
        raise TeacherError(
            f"teacher {teacher_id}: checkpoint {path} does not fit model {model_name!r}: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(shapes)} mismatched; {parts}. Fix: use the model name and "
            f"model_args (e.g. num_classes) the checkpoint was trained with{hint if remap_hint else ''}."
        )
    model.load_state_dict(dict(state), strict=True)


def _first(items: list[str], n: int = 4) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return f"{items[:n]}{more}"


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub endpoint accepts a TCP connection (cached for a minute).

    ``HF_HUB_OFFLINE=1`` counts as unreachable.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urllib.parse.urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    cached = _probe_cache.get(host)
    if cached and time.monotonic() - cached[0] < _PROBE_TTL_S:
        return cached[1]
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        ok = True
    except OSError:
        ok = False
    _probe_cache[host] = (time.monotonic(), ok)
    return ok


@contextmanager
def hub_guard(teacher_id: str, what: str) -> Iterator[bool]:
    """Run a hub weight download; offline it only reads local caches and fails fast.

    When the hub is unreachable, huggingface_hub is switched to offline mode (cached files still load)
    and sockets time out after 5 s, so no retry loop runs. Download failures become ``TeacherError``.

    Args:
        teacher_id: for the message.
        what: the weights, e.g. "resnet50.a1_in1k".

    Yields:
        Whether the hub was reachable.
    """
    from huggingface_hub import constants

    online = hub_reachable()
    saved_offline, saved_timeout = constants.HF_HUB_OFFLINE, socket.getdefaulttimeout()
    if not online:
        constants.HF_HUB_OFFLINE = True
        socket.setdefaulttimeout(5.0)
    try:
        yield online
    except TeacherError:
        raise
    except Exception as err:  # noqa: BLE001 - any download failure is reported the same way
        where = "which is unreachable from this machine" if not online else f"and the download failed ({err})"
        raise TeacherError(
            f"teacher {teacher_id}: weights for {what} must be downloaded from the model hub, {where}. "
            "Fix: download them elsewhere and set `checkpoint:` to the local file "
            "(or run where the hub is reachable once to fill the local cache). "
            f"[{type(err).__name__}: {str(err)[:200]}]"
        ) from err
    finally:
        constants.HF_HUB_OFFLINE = saved_offline
        socket.setdefaulttimeout(saved_timeout)


def hub_cached_file(repo_id: str, filenames: tuple[str, ...]) -> Path | None:
    """Path of an already-downloaded hub file (first of ``filenames`` found in the cache), or None."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        try:
            found = try_to_load_from_cache(repo_id, name)
        except Exception:  # noqa: BLE001 - provenance only, never fatal
            found = None
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None
