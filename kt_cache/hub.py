"""Can a teacher's hub weights be had here? ``--dry-run`` warns before a run would fail on them at load time.

A hub teacher (``weights: hub:…``) is fine when its file is in the local Hugging Face cache or the hub
accepts a connection (``kt_cache.teachers.checkpoints.hub_reachable``; ``HF_HUB_OFFLINE=1`` counts as
unreachable).
"""

from __future__ import annotations

from typing import Any

HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def hub_cached(plan: Any) -> bool:
    """Whether the teacher's hub weights are already downloaded (teachers that name their hub repo)."""
    from kt_cache.teachers.checkpoints import hub_cached_file

    repo = (plan.extra or {}).get("hf_hub_id")
    return bool(repo) and hub_cached_file(repo, HUB_FILES) is not None


def weights_warning(plan: Any) -> str | None:
    """The dry-run warning for a teacher whose hub weights this machine can neither find nor download."""
    from kt_cache.teachers import checkpoints

    if not str(plan.weights).startswith("hub:") or hub_cached(plan) or checkpoints.hub_reachable():
        return None
    return (f"warning: teacher {plan.id} loads its weights from the model hub ({plan.weights}), which this "
            "machine cannot reach (no connection, or HF_HUB_OFFLINE is set), and they are not in the local cache. "
            "Fix: download them where there is a network and set `checkpoint: path/to/weights.safetensors` "
            "(or `pkg:<module>/<file>`), or use `pretrained: none` for a random init.")
