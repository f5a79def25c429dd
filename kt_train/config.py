"""The typed, strict training config: YAML file (``--config``) < command-line flags; saved with every run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from kt_cache.errors import UsageError, did_you_mean



@dataclass
class TrainConfig:
    """Everything a training run depends on. Field comments are the ``--help`` of the matching flag."""

    cache: str = ""                         # store path or fsspec URL
    data: str | None = None                 # image root; default: the root recorded in the store
    val: str | None = None                  # labelled folder for the final evaluation; default: the training images
    student: str = "resnet18"               # timm model name
    students: list[str] = field(default_factory=list)   # bikd: several live students trained jointly
    student_checkpoint: str | None = None   # initial student weights (.safetensors / .pth)
    sentinel: str | None = None             # KPU: store teacher id (role sentinel) whose network is the frozen trunk
    method: str = "uniform"
    method_options: dict[str, Any] = field(default_factory=dict)
    teachers: list[str] = field(default_factory=lambda: ["all"])   # ids or roles
    labels: str = "use"                     # use | ignore
    epochs: int = 1
    max_steps: int | None = None            # stop after this many optimizer steps (smoke runs)
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0
    grad_clip: float = 1.0
    img_size: int | None = None             # student input size; default: the student's own
    workers: int = 2
    device: str = "auto"
    amp: bool = True                        # autocast on CUDA (ignored on CPU)
    seed: int = 0
    out: str = "runs/train"
    resume: bool = False
    log_every: int = 10
    window_blocks: int = 4                  # block-shuffle window, in store units
    ddp_split: str = "blocks"               # torchrun ranks: contiguous slices (disjoint blocks) | strided
    ram_budget_gb: float | None = None      # cached teacher arrays held in RAM (GiB); the rest streamed; None: 1/4 of RAM

    def check(self) -> "TrainConfig":
        """Value checks with the flag name and the fix."""
        if not self.cache:
            raise UsageError("no store given. Fix: pass --cache STORE (a path or URL written by `ktc extract`).")
        from kt_train.methods import METHODS

        if self.method not in METHODS:
            raise UsageError(f"--method {self.method}: unknown method.{did_you_mean(self.method, list(METHODS))} "
                             f"Fix: use one of {', '.join(METHODS)}.")
        if self.labels not in ("use", "ignore"):
            raise UsageError(f"--labels {self.labels}: expected 'use' or 'ignore'.")
        if self.ddp_split not in ("blocks", "strided"):
            raise UsageError(f"--ddp-split {self.ddp_split}: expected 'blocks' or 'strided'. Fix: use blocks (each "
                             "torchrun rank reads its own blocks) or strided (the steps of one process).")
        for name in ("epochs", "batch_size", "log_every", "window_blocks"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1.")
        if self.ram_budget_gb is not None and not self.ram_budget_gb > 0:
            raise UsageError(f"--ram-budget-gb {self.ram_budget_gb}: must be > 0 (GiB of teacher arrays held in RAM; "
                             "e.g. 0.5). Fix: give a positive size, or leave it out for a quarter of this machine's memory.")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.workers < 0:
            raise UsageError("--lr must be > 0; --weight-decay, --grad-clip and --workers must be >= 0.")
        if self.students and not METHODS[self.method].live_students:
            live = ", ".join(name for name, cls in METHODS.items() if cls.live_students)
            raise UsageError(f"--students is for --method {live} (several live students); got --method {self.method}. "
                             "Fix: use --student NAME for a single student.")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config (data only) and reject unknown keys with a did-you-mean."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file. Fix: check the path.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"{path}: not valid YAML: {err}. Fix: correct the syntax at the line shown.") from err
    if not isinstance(data, dict):
        raise UsageError(f"{path}: the top level must be a mapping of config keys, got {type(data).__name__}.")
    return {k.replace("-", "_"): v for k, v in data.items()} | {"__file__": str(path)}


def build_config(file_values: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    """Merge config-file values and explicit flags (flags win) into a checked ``TrainConfig``."""
    where = file_values.pop("__file__", "config")
    names = [f.name for f in fields(TrainConfig)]
    hints = get_type_hints(TrainConfig)
    values: dict[str, Any] = {}
    for key, value in {**file_values, **overrides}.items():
        if key not in names:
            raise UsageError(f"{where}: unknown key '{key}'.{did_you_mean(key, names)} Valid keys: {', '.join(names)}.")
        values[key] = coerce(key, value, hints[key], where)
    return TrainConfig(**values).check()


def coerce(key: str, value: Any, hint: Any, where: str) -> Any:
    """Check a value against its field type; numbers written as ints are fine for float fields."""
    text = str(hint)
    if value is None and "None" in text:
        return None
    if text.startswith("list"):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise UsageError(f"{where}: '{key}' must be a list, got {value!r}.")
        return [str(v).strip() for v in items if str(v).strip()]
    if text.startswith("dict"):
        if not isinstance(value, dict):
            raise UsageError(f"{where}: '{key}' must be a mapping, got {value!r}.")
        return dict(value)
    for kind in (bool, int, float, str):
        if text.startswith(kind.__name__) or text == f"{kind.__name__} | None":
            return check_scalar(key, value, kind, where)
    return value


def check_scalar(key: str, value: Any, kind: type, where: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is not bool and isinstance(value, bool) or not isinstance(value, kind):
        raise UsageError(f"{where}: '{key}' must be {kind.__name__}, got {value!r} ({type(value).__name__}). "
                         f"Fix: write a {kind.__name__} value.")
    return value


def parse_method_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``--opt tau=2 --opt tie_break=sum`` -> {"tau": 2, "tie_break": "sum"} (values read as YAML scalars)."""
    options = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--opt {pair!r}: expected KEY=VALUE, e.g. --opt tau=2.")
        options[key.strip()] = yaml.safe_load(raw)
    return options


def save_config(config: TrainConfig, out_dir: Path) -> Path:
    path = out_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return path
