"""What the fault benchmark runs: its decoding methods, the default grid of faults, a grid file, the benchmark's
configuration (:class:`FaultBenchConfig`) and where each (split, fault, method) run folder lives."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..eval import runner
from ..eval.registry import Benchmark
from ..io import InputError, read_yaml
from .config import FaultConfig, fault_config

REPORT = "report.json"
MARKDOWN = "faults.md"
DIAGNOSIS = "diagnosis.json"
UNFAULTED = "unfaulted"

@dataclasses.dataclass(frozen=True)
class BenchMethod:
    """A decoding method of the benchmark: ``method`` and ``knobs`` for :class:`~dleaf.settings.Setting`;
    ``flags``: it flags layers (its trace gives flagged cells); ``rate_of``: its ``random_rate`` is the measured
    flag rate of that other method on the same split and fault."""

    name: str
    method: str
    knobs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    flags: bool = False
    rate_of: str | None = None
    description: str = ""


METHODS: dict[str, BenchMethod] = {m.name: m for m in (
    BenchMethod("greedy", "greedy", description="plain greedy decoding (the fault alone)"),
    BenchMethod("dleaf", "dleaf", flags=True, description="D-LEAF, defaults (LIAE against its running threshold)"),
    BenchMethod("dleaf_mass", "dleaf", {"layer_signal": "mass_deficit"}, flags=True,
                description="D-LEAF with the image-mass deficit as the layer signal"),
    BenchMethod("dleaf_learned", "dleaf_learned", flags=True,
                description="D-LEAF's fusion (gamma 1) at the rows the shipped organism detector flags (organism only)"),
    BenchMethod("random_layers", "random_layers", flags=True, rate_of="dleaf",
                description="D-LEAF's fusion at random layers, at D-LEAF's measured flag rate on the same fault"),
    BenchMethod("pai", "pai", description="PAI (image-key scores boosted in every row of layers 2 on)"),
    BenchMethod("spin", "spin", description="SPIN (the heads with least image mass damped)"),
    BenchMethod("vcd", "vcd", description="VCD (logits contrasted with a noised image; the fault in both streams)"),
)}
DEFAULT_METHODS = ("greedy", "dleaf", "dleaf_mass", "random_layers", "pai")
#: the methods whose intervention on the attention rows is measured (SPIN acts on head outputs, VCD on logits)
ROW_METHODS = ("dleaf", "dleaf_mass", "dleaf_learned", "random_layers", "pai")


def default_grid() -> list[FaultConfig]:
    """The benchmark's faults (for a decoder of 6 layers, like the organism's; a grid file gives others), for both
    kinds, diffuse and drift: on all heads at a fixed random half of the generated positions (so every reply and
    layer has faulted and unfaulted rows), single layers early (0), middle (3) and late (5), two layers (2, 3) and
    all layers at strength 1; all layers with half the heads; all layers at strengths 0.25 and 0.5. Last, a diffuse
    fault of all layers from the 8th position on (a step a causal running threshold is built to catch)."""
    half = dict(positions="random", fraction=0.5)
    grid = []
    for kind in ("diffuse", "drift"):
        for layers in ([0], [3], [5], [2, 3], "all"):
            grid.append(FaultConfig(kind, layers, **half))
        grid.append(FaultConfig(kind, "all", heads=0.5, **half))
        for s in (0.25, 0.5):
            grid.append(FaultConfig(kind, "all", strength=s, **half))
    grid.append(FaultConfig("diffuse", "all", positions="from", start=8))
    return grid


def fault_slug(fault: FaultConfig | None) -> str:
    """A folder name for a fault (``unfaulted`` for None)."""
    if fault is None:
        return UNFAULTED
    return re.sub(r"[^\w.=-]+", "_", fault.label().replace(">=", "from").replace("~", "rand")).strip("_")


def read_grid(path: str | Path) -> list[FaultConfig]:
    """Faults from a YAML file: a list of mappings of :class:`~dleaf.faults.FaultConfig` fields."""
    path = Path(path)
    data = read_yaml(path, "fault grid file")
    if not isinstance(data, list) or not data:
        raise InputError(f"fault grid file {path} must hold a non-empty list of faults (mappings of fault fields)")
    out = []
    for k, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise InputError(f"fault grid file {path}, entry {k}: a fault is a mapping of fields, got {entry!r}")
        try:
            out.append(fault_config(entry))
        except (TypeError, ValueError) as e:
            raise InputError(f"fault grid file {path}, entry {k}: {e}") from None
    return out


def pick_faults(faults: Sequence[FaultConfig], numbers: Sequence[str | int] | None
                ) -> list[tuple[int, FaultConfig]]:
    """``(number, fault)`` for the faults of a grid with the given numbers (1-based, as ``--list`` prints them), in
    the order given; every fault for None."""
    if not numbers:
        return list(enumerate(faults, start=1))
    try:
        picked = [int(k) for k in numbers]
    except ValueError:
        raise InputError(f"--faults takes fault numbers (see --list), got {list(numbers)}") from None
    bad = [k for k in picked if not 1 <= k <= len(faults)]
    if bad:
        raise InputError(f"--faults {bad}: the grid has faults 1 to {len(faults)}")
    return [(k, faults[k - 1]) for k in picked]


@dataclasses.dataclass
class FaultBenchConfig:
    """What the benchmark runs: the benchmark and its splits, images per split (``limit``), the faults, the
    methods, method knobs, the token limit, the batch size, the model name and its weights' digest recorded in every
    run, the bootstrap resamples and their seed.

    ``knobs`` (``--knob name=value``) go to every chosen method whose configuration has that knob and does not fix
    it itself (``dleaf_mass`` fixes ``layer_signal``, ``random_layers`` its ``random_rate``): ``gamma=0.5`` changes
    the three D-LEAF variants, ``layer_start=1`` those and PAI. A knob no chosen method takes is an error.
    """

    faults: Sequence[FaultConfig] = dataclasses.field(default_factory=default_grid)
    methods: Sequence[str] = DEFAULT_METHODS
    splits: Sequence[str] = ("adversarial", "indist")
    benchmark: str = "organism_caption"
    limit: int | None = None
    max_new_tokens: int | None = None
    batch_size: int = 16
    model: str = "organism"
    n_resamples: int = 2000
    knobs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    model_weights: str | None = None
    seed: int = 0

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise InputError(f"unknown method(s) {unknown}; the benchmark's methods are {', '.join(METHODS)}")
        if "greedy" not in self.methods:
            raise InputError("the methods must include greedy (the faulted model alone is what damage and repair "
                             "are measured against)")
        for m in self.methods:
            dep = METHODS[m].rate_of
            if dep is not None and dep not in self.methods:
                raise InputError(f"method {m} runs at {dep}'s measured flag rate: include {dep}")
        if not self.faults:
            raise InputError("no faults to run")
        labels = [f.label() for f in self.faults]
        if len(set(labels)) != len(labels):
            raise InputError("the fault grid holds the same fault twice")
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit < 1):
            raise InputError(f"--limit must be a positive number of images, got {self.limit!r}")
        if self.batch_size < 1:
            raise InputError(f"--batch_size must be positive, got {self.batch_size}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise InputError(f"--max_new_tokens must be positive, got {self.max_new_tokens}")
        self.methods = tuple(sorted(self.methods, key=list(METHODS).index))  # a method after the one it needs
        self.knobs = dict(self.knobs)
        taken = {k for m in self.methods for k in self._takes(m)}
        unused = sorted(set(self.knobs) - taken)
        if unused:
            raise InputError(f"knob(s) {', '.join(unused)} apply to none of the methods "
                             f"{', '.join(self.methods)}")
        self.method_knobs = {m: self._knobs_of(m) for m in self.methods}  # checked (and typed) here

    def _takes(self, name: str) -> set[str]:
        """The user knobs method ``name`` takes: its configuration's knobs less those it fixes."""
        from ..config import describe_methods

        method = METHODS[name]
        if method.method == "greedy":
            return set()
        (entry,) = [d for d in describe_methods() if d["name"] == method.method]
        fixed = set(method.knobs) | ({"random_rate"} if method.rate_of else set())
        return {k["name"] for k in entry["knobs"]} - fixed

    def _knobs_of(self, name: str) -> dict[str, Any]:
        from ..settings import check_knobs

        method = METHODS[name]
        takes = self._takes(name)
        knobs = {**method.knobs, **{k: v for k, v in self.knobs.items() if k in takes}}
        if method.method == "greedy":
            return {}
        return check_knobs(method.method, knobs)

    def load_benchmark(self, split: str) -> Benchmark:
        return runner.load_benchmark(self.benchmark, limit=self.limit, splits=[split])


def run_dir_of(out: Path, split: str, fault: FaultConfig | None, method: str) -> Path:
    return Path(out) / split / fault_slug(fault) / method




def model_digest(model_dir: str | Path) -> str | None:
    """SHA-256 (first 16 hex digits) of a checkpoint folder's ``model.safetensors``, to name which weights the
    numbers come from (None where the folder holds no such file, for example a hub id)."""
    path = Path(model_dir) / "model.safetensors"
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
