"""The command-line convention every script of the project follows.

* Flags are written with underscores (``--output_dir``) and accepted with dashes too (``--output-dir``).
* ``--output_dir`` names where outputs go, ``--model`` the model (``organism``, a checkpoint folder or a hub id),
  ``--seed`` the seed, ``--threads`` the CPU threads torch may use.
* A method's knobs are given as repeated ``--knob name=value`` (values are YAML scalars: ``0.3``, ``1e-3``, ``true``,
  ``none``, ``best``); :func:`parse_knobs` reads them and :class:`dleaf.settings.Setting` checks them against the
  method's configuration.
* Every input is checked before any model is loaded, the output folder too (:func:`check_output_dir`,
  :func:`check_output_file`: writable or creatable, not under a file; nothing is created by the check). A bad input
  ends the script with ``error: <message>`` on stderr and exit status 2 (:func:`fail`); argparse's own errors take
  the same form (:class:`ArgumentParser`).
* Ctrl-C ends a script with ``interrupted; run the same command again to resume`` (where the script can resume)
  and exit status 130 instead of a traceback (:func:`main`).
* The last line a script prints names where its outputs are (:func:`done`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from .io import InputError

__all__ = ["ArgumentParser", "dataclass_parser", "InputError", "add_common_arguments", "check_output_dir",
           "check_output_file", "done", "fail", "last_line", "main", "parse_knobs", "parse_scalar", "set_threads"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def fail(message: str) -> NoReturn:
    """Print ``error: message`` to stderr and exit with status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


def last_line(*paths: str | os.PathLike, what: str = "outputs") -> str:
    """The last line of a script's output: ``outputs: <path>`` (several paths separated by ``, ``)."""
    if not paths:
        raise ValueError("last_line needs at least one path")
    return f"{what}: " + ", ".join(str(p) for p in paths)


def done(*paths: str | os.PathLike, what: str = "outputs") -> None:
    """Print :func:`last_line` (the script's final line, naming where its outputs are)."""
    print(last_line(*paths, what=what), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Knobs
# ---------------------------------------------------------------------------------------------------------------


def parse_scalar(text: str) -> Any:
    """A command-line value as a YAML scalar: ``0.3`` -> 0.3, ``1e-3`` -> 0.001, ``true`` -> True, ``none`` /
    ``null`` / ``~`` -> None, ``best`` -> "best". Lists and mappings are refused."""
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise InputError(f"{text!r} is not a valid value ({str(e).splitlines()[0]})") from None
    if isinstance(value, str):
        if value.strip().lower() == "none":
            return None
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string; a number is meant
            number = float(value)
        except ValueError:
            return value
        return value if math.isnan(number) or math.isinf(number) else number
    if isinstance(value, (list, dict)):
        raise InputError(f"{text!r} is a YAML {type(value).__name__}; a knob takes one value (a number, true/false, "
                         "none or a word)")
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{text!r} is not a finite number")
    return value


def parse_knobs(values: Sequence[str] | None) -> dict[str, Any]:
    """``["gamma=0.3", "threshold=best"]`` -> ``{"gamma": 0.3, "threshold": "best"}``.

    Each entry is ``name=value`` with the value read as a YAML scalar (:func:`parse_scalar`); a name given twice,
    an empty name or an entry without ``=`` is an :class:`InputError`. Whether the names and values fit a method is
    checked by :class:`dleaf.settings.Setting`.
    """
    out: dict[str, Any] = {}
    for entry in values or ():
        if not isinstance(entry, str) or "=" not in entry:
            raise InputError(f"knob {entry!r} is not of the form name=value (for example --knob gamma=0.3)")
        name, value = entry.split("=", 1)
        name = name.strip()
        if not name or not name.replace("_", "a").isalnum():
            raise InputError(f"knob {entry!r}: {name!r} is not a knob name")
        if name in out:
            raise InputError(f"knob {name!r} is given twice")
        try:
            out[name] = parse_scalar(value.strip())
        except InputError as e:
            raise InputError(f"knob {name}: {e}") from None
    return out


# ---------------------------------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------------------------------


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks (usage examples stay one per line) and adds ``(default: X)`` to a flag's
    help unless the help already says its default or the default is None, False or empty."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False or default == argparse.SUPPRESS or
                default == [] or
                isinstance(action, (argparse._StoreFalseAction, argparse._HelpAction, argparse._VersionAction))):
            return text
        return f"{text} (default: {default})" if text else f"default: {default}"


def _with_dash_aliases(args: tuple) -> tuple:
    out = list(args)
    for a in args:
        if isinstance(a, str) and a.startswith("--") and "_" in a:
            alias = "--" + a[2:].replace("_", "-")
            if alias not in out:
                out.append(alias)
    return tuple(out)


class _ConventionMixin:
    """Dash aliases for every underscore flag, argparse errors as ``error: ...`` with exit status 2, help for the
    ``--no_X`` complement of a boolean flag that says so."""

    def add_argument(self, *args, **kwargs):
        args = _with_dash_aliases(args)
        if (args and isinstance(args[0], str) and args[0].startswith("--no_") and kwargs.get("action") == "store_false"
                and "dest" in kwargs and f"--{kwargs['dest']}" in self._option_string_actions):
            kwargs["help"] = f"turn off --{kwargs['dest']}"
        return super().add_argument(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USAGE)


class ArgumentParser(_ConventionMixin, argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with the project's convention (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        original = group.add_argument

        def add_argument(*a, **k):
            return original(*_with_dash_aliases(a), **k)

        group.add_argument = add_argument
        return group


def _hf_base():
    from transformers import HfArgumentParser as Base

    return Base


def dataclass_parser(dataclass_types, **kwargs):
    """A ``transformers.HfArgumentParser`` (flags from dataclass fields, ``--no_X`` for boolean fields, YAML files)
    with the project's convention (imported lazily so that importing :mod:`dleaf.cli` stays light)."""
    kwargs.setdefault("formatter_class", HelpFormatter)
    cls = type("HfArgumentParser", (_ConventionMixin, _hf_base()), {})
    return cls(dataclass_types, **kwargs)


def add_common_arguments(parser: argparse.ArgumentParser, *, output_dir: str | None = None,
                         model: bool = True, method: bool = False, seed: int | None = None,
                         threads: bool = True, progress: bool = False) -> None:
    """Add the flags every script shares, each only when asked for: ``--output_dir`` (with this default),
    ``--model``, ``--method`` and repeated ``--knob``, ``--seed`` (with this default), ``--threads`` and
    ``--no_progress``."""
    if output_dir is not None:
        parser.add_argument("--output_dir", default=output_dir, help="folder for the outputs")
    if model:
        parser.add_argument("--model", default="organism",
                            help="'organism', 'organism_control', a checkpoint folder or a hub id")
    if method:
        from .settings import method_names

        parser.add_argument("--method", default="greedy",
                            help="decoding method: greedy (nothing attached), " + ", ".join(method_names()))
        parser.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                            help="a knob of the method's configuration, repeated (python -m dleaf methods lists "
                                 "them)")
    if seed is not None:
        parser.add_argument("--seed", type=int, default=seed, help="random seed")
    if threads:
        parser.add_argument("--threads", type=int, default=None,
                            help="CPU threads torch may use (default: torch's own choice)")
    if progress:
        parser.add_argument("--no_progress", dest="progress", action="store_false", help="hide the progress bars")


def set_threads(n: int | None) -> None:
    """Limit torch's CPU threads (``None`` leaves torch's default); a non-positive count is an :class:`InputError`."""
    if n is None:
        return
    if n <= 0:
        raise InputError(f"--threads must be a positive count, got {n}")
    import torch

    torch.set_num_threads(n)


def _unwritable(folder: Path) -> str | None:
    """Why files cannot be written in ``folder`` (created if missing), or None when they can: the folder, or the
    nearest part of its path that exists, must be a writable folder."""
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not existing.exists():  # a dangling link
        return f"{existing} is a broken link"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def check_output_dir(path: str | os.PathLike, flag: str = "--output_dir") -> Path:
    """An output folder that exists as a writable folder or can be created (the nearest existing part of its path
    is a writable folder, not a file); raises :class:`InputError` naming ``flag`` otherwise. Creates nothing, so a
    refused command leaves nothing behind; every script calls it with its other input checks, before any model
    loads."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path} is a file, not a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(f"{flag} {path} is not writable")
        return path
    problem = _unwritable(path)
    if problem is not None:
        raise InputError(f"{flag} {path} cannot be created: {problem}")
    return path


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """An output file that can be written (atomically, so its folder must be writable or creatable, see
    :func:`check_output_dir`) and is not a folder; raises :class:`InputError` naming ``flag`` otherwise."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; give a file name")
    problem = _unwritable(path.parent)
    if problem is not None:
        raise InputError(f"{flag} {path} cannot be written: {problem}")
    return path


def main(fn: Callable[..., int | None], argv: Sequence[str] | None = None, resumable: bool = True) -> int:
    """Run a script's ``fn(argv)``: an :class:`InputError` ends it with ``error: ...`` and status 2, Ctrl-C with
    ``interrupted`` (and, for a ``resumable`` script, how to resume) and status 130; returns the exit status."""
    try:
        code = fn(argv)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        hint = "; run the same command again to resume" if resumable else ""
        print(f"\ninterrupted{hint}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return int(code or 0)
