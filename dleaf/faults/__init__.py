"""Fault injection: known damage to a model's image attention, and a benchmark of whether a method finds and repairs
it.

* :mod:`dleaf.faults.config`: a fault as data (:class:`FaultConfig`: which layers, heads and generated positions,
  what kind, how strong) and its application inside the engine's attention function, before the method.
* :mod:`dleaf.faults.grid`: what the benchmark runs (the default grid of faults, the methods, a grid file, its
  configuration and run folders).
* :mod:`dleaf.faults.record`: what a generation row keeps about its (position, layer) cells (flags, signal margins,
  a method's change to the attention rows).
* :mod:`dleaf.faults.run`: decoding every (split, fault, method) through the evaluation harness, resumably.
* :mod:`dleaf.faults.measures`: damage, localization and repair statistics with bootstrap intervals.
* :mod:`dleaf.faults.report` and :mod:`dleaf.faults.figures`: the report (JSON, Markdown) and its figures.

Only the fault itself is imported here (the engine needs nothing else); the benchmark's modules are imported by name.
"""

from .config import KINDS, POSITIONS, FaultConfig, FaultHook, fault_config, fault_knobs, faulted_cells

__all__ = ["KINDS", "POSITIONS", "FaultConfig", "FaultHook", "fault_config", "fault_knobs", "faulted_cells"]
