"""Which optional extras of the distribution are installed, and the one-line error of a command that needs one.

An extra (`pip install 'twin-transformer[torch]'`) is installed when every module it provides can be found;
finding a module does not import it, so asking costs nothing and loads no framework. A command that needs a
missing extra raises `MissingExtra`, whose message is one line naming the extra and, where one exists, the
option that avoids it; `twin` prints it and exits with status 1. A later extra plugs in with one `EXTRAS`
entry (and, for a checkpoint format, one `CONTAINER_EXTRAS` entry).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Sequence

PACKAGE = "twin-transformer"


@dataclass(frozen=True)
class Extra:
    """An optional extra: what a user calls it, and the top-level modules it installs."""

    label: str
    modules: tuple[str, ...]


EXTRAS = {
    "torch": Extra("PyTorch", ("torch",)),
    "jax": Extra("JAX/Flax", ("jax", "jaxlib", "flax", "optax")),
    "hf": Extra("Hugging Face transformers", ("torch", "transformers", "sentencepiece")),
    "deploy": Extra("CTranslate2", ("ctranslate2",)),
}
FRAMEWORKS = ("torch", "jax")  # the values of --framework, each the name of its extra, in order of preference
CONTAINER_EXTRAS = {"torch": "torch", "msgpack": "jax", "orbax": "jax", "ctranslate2": "deploy"}  # checkpoint container -> extra it needs


class MissingExtra(Exception):
    """A command needs extras that are not installed; str() is the one-line message."""

    def __init__(self, command: str, extras: Sequence[str], why: str | None = None, instead: str | None = None,
                 either: bool = False):
        """`why`: what needs them (in parentheses); `instead`: the option that avoids them (after ", or");
        `either`: any one of `extras` would do."""
        self.command, self.extras = command, tuple(extras)
        names = " and ".join(EXTRAS[e].label for e in self.extras)
        verb = "is" if len(self.extras) == 1 else "are"
        reason = f" ({why})" if why else ""
        install = (" or ".join(f"'{PACKAGE}[{e}]'" for e in self.extras) if either
                   else f"'{PACKAGE}[{','.join(self.extras)}]'")
        alternative = f", or {instead}" if instead else ""
        super().__init__(f"{command}: {names} {verb} not installed{reason}: pip install {install}{alternative}")


def _found(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a finder that refuses the module
        return False
    except ValueError:  # imported already, without a spec
        return True


def installed(extra: str) -> bool:
    """Whether every module of `extra` can be imported (nothing is imported)."""
    return all(_found(m) for m in EXTRAS[extra].modules)


def missing(extras: Sequence[str]) -> list[str]:
    """The extras of `extras` that are not installed, in order."""
    return [e for e in extras if not installed(e)]


def require(command: str, extras: Sequence[str], why: str | None = None, instead: str | None = None) -> None:
    """MissingExtra unless every extra of `extras` is installed."""
    absent = missing(extras)
    if absent:
        raise MissingExtra(command, absent, why, instead)


def default_framework(command: str) -> str:
    """The first installed framework of FRAMEWORKS (torch when both are); MissingExtra when there is none."""
    for framework in FRAMEWORKS:
        if installed(framework):
            return framework
    raise MissingExtra(command, FRAMEWORKS, either=True)


def framework(command: str, chosen: str | None) -> str:
    """--framework `chosen` (None: the default) if it is installed; else MissingExtra naming the other one's flag."""
    if chosen is None:
        return default_framework(command)
    others = [f for f in FRAMEWORKS if f != chosen and installed(f)]
    require(command, [chosen], instead=f"pass --framework {others[0]}" if others else None)
    return chosen


def extra_of_module(name: str | None) -> str | None:
    """The extra that installs module `name` (a dotted name counts by its top level), or None."""
    top = (name or "").split(".")[0]
    return next((extra for extra, info in EXTRAS.items() if top in info.modules), None)
