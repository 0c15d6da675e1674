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
import difflib
import math
import os
import sys
import time
import warnings
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
    cls = type("HfArgumentParser", (_HfConventionMixin, _ConventionMixin, _hf_base()), {})
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
        from .models import model_help

        parser.add_argument("--model", default="organism", help=model_help())
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
    ``interrupted`` (and, for a ``resumable`` script, how to resume) and status 130; returns the exit status. The
    library warnings of :data:`NOISY_WARNINGS` are kept out of the output while ``fn`` runs (and only then)."""
    _WARNED.clear()
    try:
        with warnings.catch_warnings():
            quiet_library_warnings()
            code = fn(argv)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        hint = "; run the same command again to resume" if resumable else ""
        print(f"\ninterrupted{hint}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        _WARNED.clear()
    return int(code or 0)


# ---------------------------------------------------------------------------------------------------------------
# Unknown flags and recipe files, old spellings, progress lines, library warnings
# ---------------------------------------------------------------------------------------------------------------


def did_you_mean(word: str, choices) -> str:
    """`` (did you mean --x?)`` for the closest of ``choices`` to ``word``, or an empty string."""
    close = difflib.get_close_matches(word, sorted(set(choices)), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def unknown_arguments(remaining: Sequence[str], flags) -> str:
    """The message for command-line words that no flag takes: ``unrecognized arguments: --max_tokens 8 (did you
    mean --max_new_tokens?)``."""
    first = next((w.split("=", 1)[0] for w in remaining if w.startswith("--")), None)
    hint = did_you_mean(first, [f for f in flags if f.startswith("--")]) if first else ""
    return f"unrecognized arguments: {' '.join(remaining)}{hint}"


def read_recipe(path: str | os.PathLike, keys=None, example: str = "") -> dict:
    """A YAML recipe: a non-empty mapping of option names (each in ``keys``, when given) to values. Raises
    :class:`InputError` naming the file and what would be right: a missing file, invalid YAML (with its line), an
    empty file (or one of comments only), a document that is not a mapping, an unknown key (with the closest
    known one)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"recipe file not found: {path}")
    shape = f"a mapping of option names to values{f' ({example})' if example else ''}"
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(f"recipe {path} is not valid YAML{where}: {problem}; it should be {shape}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"recipe {path} cannot be read: {e}") from None
    if data is None:
        raise InputError(f"recipe {path} is empty; it should be {shape}")
    if not isinstance(data, dict):
        raise InputError(f"recipe {path} holds a YAML {type(data).__name__}, not a mapping; it should be {shape}")
    if keys is not None:
        keys = set(keys)
        unknown = [str(k) for k in data if k not in keys]
        if unknown:
            raise InputError(f"recipe {path}: unknown key {unknown[0]!r}{did_you_mean(unknown[0], keys)}"
                             + (f" (and {len(unknown) - 1} more: {', '.join(unknown[1:4])})" if len(unknown) > 1
                                else ""))
    return data


class _HfConventionMixin:
    """For ``transformers.HfArgumentParser``: an unknown flag is an argparse error (``error: unrecognized arguments:
    ...``, exit status 2) rather than a ValueError, and a YAML file is read by :func:`read_recipe`."""

    def parse_args_into_dataclasses(self, args=None, return_remaining_strings=False, **kwargs):
        *parsed, remaining = super().parse_args_into_dataclasses(args=args, return_remaining_strings=True, **kwargs)
        if return_remaining_strings:
            return (*parsed, remaining)
        if remaining:
            self.error(unknown_arguments(remaining, self._option_string_actions))
        return tuple(parsed)

    def parse_yaml_file(self, yaml_file, allow_extra_keys: bool = False):
        keys = None if allow_extra_keys else {a.dest for a in self._actions}
        data = read_recipe(yaml_file, keys)
        try:
            return self.parse_dict(data, allow_extra_keys=allow_extra_keys)
        except (TypeError, ValueError) as e:
            raise e if isinstance(e, InputError) else InputError(f"recipe {yaml_file}: {e}") from None


#: the old spellings warned about in this run (:func:`main` starts each run with none)
_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """``warning: message`` on stderr, once per run of a script however often it is asked for."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


class _OldSpelling(argparse.Action):
    """A hidden flag that does what ``target`` does, and says once on stderr which flag to write instead."""

    def __init__(self, option_strings, dest, target=None, **kwargs):
        super().__init__(option_strings, target.dest, nargs=target.nargs, const=target.const, type=target.type,
                         choices=target.choices, default=target.default, help=argparse.SUPPRESS,
                         metavar=target.metavar)
        self.target = target

    def __call__(self, parser, namespace, values, option_string=None):
        warned = parser.__dict__.setdefault("_old_spellings_warned", set())
        new = self.target.option_strings[0]
        if new not in warned:
            warned.add(new)
            print(f"warning: {self.option_strings[0]} is an old spelling of {new}; write {new} (the old one still "
                  "works for now)", file=sys.stderr, flush=True)
        self.target(parser, namespace, values, new)


def add_old_spelling(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Accept the flag ``old`` (and its dash alias) as a hidden old spelling of the existing flag ``new``: it sets
    what ``new`` sets and warns once on stderr to write ``new``."""
    target = parser._option_string_actions[new]
    parser.add_argument(old, action=_OldSpelling, target=target)


def split_entries(values, flag: str, example: str = "") -> list[str]:
    """Entries of a repeated ``name=value`` flag (``--column_map a=b --column_map c=d``); entries joined by commas
    in one value (the old spelling) are split, with a warning (once) that shows the one syntax."""
    out: list[str] = []
    for value in [values] if isinstance(values, str) else list(values or ()):
        parts = [p.strip() for p in str(value).split(",") if p.strip()]
        if len(parts) > 1:
            warn_once(f"{flag} {value}: write one entry per {flag} ({' '.join(f'{flag} {p}' for p in parts)}); "
                      "entries joined by commas still work for now")
        out.extend(parts)
    return out


def progress_lines(label: str, unit: str = "", say: Callable[[str], None] | None = None,
                   min_seconds: float = 0.0) -> Callable:
    """A wrapper for a sized iterable (``for batch in progress(batches)``) that says ``label k/n unit`` on stderr
    when the loop starts and each time another tenth of it is done (so at most 11 lines however long the loop is,
    and, with ``min_seconds``, not more often than that)."""
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    suffix = f" {unit}" if unit else ""

    def wrap(iterable):
        n = len(iterable)
        say(f"{label} 0/{n}{suffix}")
        shown, last = 0, time.monotonic()
        for k, item in enumerate(iterable, 1):
            yield item
            tenth = (10 * k) // max(n, 1)
            now = time.monotonic()
            if k == n or (tenth > shown and now - last >= min_seconds):
                shown, last = tenth, now
                say(f"{label} {k}/{n}{suffix}")

    return wrap


#: library warnings about the libraries' own internals, which no flag or recipe of this project can change; the
#: scripts' entry point (:func:`main`) keeps them out of the user's output; library code filters nothing
NOISY_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # transformers renamed gradient checkpointing to activation checkpointing; TRL, PEFT and transformers' own
    # TrainingArguments still call the old names
    (FutureWarning, r".*gradient_checkpointing.* is deprecated"),
    # PEFT, saving an adapter of a local base model it cannot look up on the hub
    (UserWarning, r"Could not find a config file in .* will assume that the vocabulary was not modified"),
)


def quiet_library_warnings() -> None:
    """Ignore the warnings of :data:`NOISY_WARNINGS` (call it inside ``warnings.catch_warnings()``)."""
    for category, message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
