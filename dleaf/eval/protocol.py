"""Evaluation protocols: versioned YAML files that fix what a benchmark asks and how its answers are read.

A protocol file has ``name``, ``version`` (an int), ``benchmark`` (a registered benchmark name) and the fields that
benchmark needs (id lists or the rule that fixes them, prompts, ``max_new_tokens``, seeds), plus
``trailing_incomplete_sentence`` (``drop`` or ``keep``, default ``keep``; see
:func:`dleaf.generation.apply_sentence_rule`) and ``sampling_seed`` (default 0). Every result records the
protocol's name, version and the SHA-256 of its file. The protocols that ship with the project are under
``data/protocols`` (:func:`protocol_dir`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

from ..generation import SENTENCE_RULES
from ..io import InputError, read_yaml
from ..resources import data_path


def protocol_dir() -> Path:
    """The folder of the shipped protocol files."""
    return data_path("protocols")


def sha256_file(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Protocol:
    """A protocol file: ``name``, ``version``, ``benchmark`` and the benchmark's fields (``fields``); ``sha256`` is
    the file's hash, recorded with every result."""

    name: str
    version: int
    benchmark: str
    fields: dict
    path: Path
    sha256: str

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def record(self) -> dict:
        """What a result records about its protocol (no machine-specific path)."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    @property
    def sentence_rule(self) -> str:
        return self.fields.get("trailing_incomplete_sentence", "keep")


def load_protocol(name_or_path: str | os.PathLike) -> Protocol:
    """Load a protocol by name (a shipped ``data/protocols/<name>.yaml``) or from a YAML file, and check its fields
    against its benchmark's registration (:mod:`dleaf.eval.registry`)."""
    from .registry import benchmark_names, get_benchmark

    path = Path(name_or_path)
    if not path.suffix:
        path = protocol_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in protocol_dir().glob("*.yaml"))
        raise InputError(f"protocol file not found: {path} (protocols shipped: {', '.join(known)})")
    data = read_yaml(path, "protocol file")
    if not isinstance(data, dict):
        raise InputError(f"protocol file {path} must hold a mapping, got {type(data).__name__}")
    for key in ("name", "version", "benchmark"):
        if key not in data:
            raise InputError(f"protocol file {path} has no {key!r} field")
    bench = data["benchmark"]
    if bench not in benchmark_names():
        raise InputError(f"protocol file {path}: unknown benchmark {bench!r}; expected one of "
                         f"{', '.join(benchmark_names())}")
    if not isinstance(data["version"], int) or isinstance(data["version"], bool):
        raise InputError(f"protocol file {path}: version must be an int, got {data['version']!r}")
    missing = [k for k in get_benchmark(bench).protocol_keys if k not in data]
    if missing:
        raise InputError(f"protocol file {path} (benchmark {bench}) lacks field(s) {', '.join(missing)}")
    rule = data.setdefault("trailing_incomplete_sentence", "keep")
    if rule not in SENTENCE_RULES:
        raise InputError(f"protocol file {path}: trailing_incomplete_sentence must be one of "
                         f"{', '.join(SENTENCE_RULES)}, got {rule!r}")
    data.setdefault("sampling_seed", 0)
    fields = {k: v for k, v in data.items() if k not in ("name", "version", "benchmark")}
    return Protocol(str(data["name"]), data["version"], bench, fields, path, sha256_file(path))
