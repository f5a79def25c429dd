"""``ktc train``: flags (over an optional ``--config`` YAML) -> ``kt_train.loop.train``."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from kt_train.methods import METHODS   # the registry: each method describes itself (choices, help, requirements)


class RegistryChoice(click.Choice):
    """``--method``'s choices: the registered names, read when used rather than at import, so a method
    registered later (``kt_train.methods.register_method``: a plugin, a test) is accepted."""

    def __init__(self) -> None:
        super().__init__((), case_sensitive=True)

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(METHODS)

    @choices.setter
    def choices(self, _value: tuple[str, ...]) -> None:
        pass                              # click.Choice.__init__ assigns; the registry stays the one source


class RegistryOption(click.Option):
    """An option whose help ``describe()`` writes from the registry each time it is shown (as RegistryChoice)."""

    def __init__(self, *args: Any, describe: Callable[[], str], **kwargs: Any) -> None:
        self.describe, self.extra = describe, ""
        super().__init__(*args, **kwargs)

    @property
    def help(self) -> str:
        return self.describe() + self.extra

    @help.setter
    def help(self, value: str | None) -> None:
        # show_config_defaults appends "  [default: ...]" to the help it read: keep only what it appended
        base = self.describe()
        self.extra = value[len(base):] if value and value.startswith(base) else ""


def methods_with(flag: str) -> str:
    """The registered methods whose class attribute ``flag`` is true, for the help of the flag they use."""
    return ", ".join(name for name, cls in METHODS.items() if getattr(cls, flag)) or "no registered method"


def method_help() -> str:
    return "Transfer method: " + "; ".join(f"{name}: {cls.summary}" for name, cls in METHODS.items()) + "."


@click.command()
@click.option("--cache", help="Store written by `ktc extract` (path or fsspec URL). Required, here or in --config.")
@click.option("--data", help="Image root (default: the dataset root recorded in the store).")
@click.option("--val", help="Labelled folder (class sub-folders) for the final evaluation (default: the training images).")
@click.option("--student", help="timm model name of the student (default resnet18).")
@click.option("--students", cls=RegistryOption, describe=lambda: f"{methods_with('live_students')}: several live "
              "students, comma-separated timm names.")
@click.option("--student-checkpoint", help="Initial student weights (.safetensors or .pth).")
@click.option("--sentinel", cls=RegistryOption, describe=lambda: f"{methods_with('sentinel_student')}: id of a store "
              "teacher (role sentinel) whose ViT becomes the frozen trunk.")
@click.option("--method", cls=RegistryOption, describe=method_help, type=RegistryChoice())
@click.option("--opt", "opts", multiple=True, metavar="KEY=VALUE", help="Method option, e.g. --opt tau=2 (repeatable).")
@click.option("--teachers", help="Comma-separated teacher ids or roles (predictive, descriptive, sentinel, all).")
@click.option("--labels", type=click.Choice(["use", "ignore"]), help="Use the store's labels, or train label-free.")
@click.option("--epochs", type=int)
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps.")
@click.option("--batch-size", type=int)
@click.option("--lr", type=float)
@click.option("--weight-decay", type=float)
@click.option("--warmup-epochs", type=float)
@click.option("--grad-clip", type=float)
@click.option("--img-size", type=int, help="Student input size (default: the student's own).")
@click.option("--workers", type=int, help="DataLoader workers decoding images.")
@click.option("--device", help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int)
@click.option("--out", help="Run folder: weights, config, metrics, plots (default runs/train).")
@click.option("--resume", is_flag=True, default=None, help="Continue the run in --out from its last finished epoch.")
@click.option("--log-every", type=int, help="Log a metrics record every N steps (short runs log more often, so their "
              "curves keep about 100 points).")
@click.option("--ddp-split", type=click.Choice(["blocks", "strided"]), help="Under torchrun, how ranks share an "
              "epoch: blocks = contiguous slices, each rank reads its own blocks (default); strided = the steps of one "
              "process with world x the batch, every rank reads every block.")
@click.option("--window-blocks", type=int, help="Block-shuffle window in store units.")
@click.option("--ram-budget-gb", type=float, help="GiB of cached teacher arrays (features, logits, maps) held in "
              "RAM; beyond it they are streamed from the store in row blocks (default: a quarter of this machine's memory).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML with any of these keys; flags win.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def train(opts: tuple[str, ...], config_file: str | None, no_progress: bool, **flags) -> None:
    """Train a student from a teacher store with no teacher network in memory."""
    from kt_train.config import build_config, load_config_file, parse_method_options
    from kt_train.loop import train as run_training

    given = {k: v for k, v in flags.items() if v is not None}
    if opts:
        given["method_options"] = parse_method_options(opts)
    config = build_config(load_config_file(config_file) if config_file else {}, given)
    metrics = run_training(config, show_progress=not no_progress, notify=click.echo)   # start-of-run notices
    if not metrics:                      # a non-zero torchrun rank: rank 0 reports
        return
    summary = {k: metrics[k] for k in ("top1", "top5", "skipped", "teacher_agreement") if k in metrics}
    click.echo(f"run saved in {config.out}: {json.dumps(summary)}")
    if METHODS[config.method].note:                    # a caveat the method declares (kpu: read the probe)
        click.echo(f"note: {METHODS[config.method].note}")


def show_config_defaults(command: click.Command) -> click.Command:
    """Show TrainConfig's defaults in --help. Flags default to None so a --config file can fill them,
    so click cannot show them itself."""
    from dataclasses import MISSING, fields

    from kt_train.config import TrainConfig

    defaults = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(TrainConfig)}
    for param in command.params:
        value = defaults.get(param.name)
        if isinstance(param, click.Option) and not param.is_flag and value not in (None, "", [], {}) \
                and "default" not in (param.help or ""):
            shown = ",".join(value) if isinstance(value, list) else str(value)
            param.help = f"{param.help or ''}  [default: {shown}]".strip()
    return command


train = show_config_defaults(train)
