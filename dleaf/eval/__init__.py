"""The evaluation harness: one protocol for every method, on the organism and on COCO (CHAIR, POPE).

* :mod:`~dleaf.eval.registry`: benchmarks found by name (:func:`register_benchmark`, :func:`get_benchmark`);
* :mod:`~dleaf.eval.protocol`: versioned protocol files;
* :mod:`~dleaf.eval.coco`, :mod:`~dleaf.eval.pope`: COCO CHAIR and POPE question files (the organism's two
  benchmarks register from ``dleaf.organism.benchmarks``);
* :mod:`~dleaf.eval.runner`: the resumable, shardable run (:func:`run_evaluation`) and in-memory evaluation
  (:func:`evaluate`);
* :mod:`~dleaf.eval.scores`: metrics per section and scores per item;
* :mod:`~dleaf.eval.compare`: comparison tables and paired bootstrap intervals between runs.
"""

from ..io import InputError
from .compare import (METRICS, SCORES, caption_stats, compare_runs, comparison_table, paired_difference,
                      paired_differences, read_scores)
from .protocol import Protocol, load_protocol, protocol_dir
from .registry import (Benchmark, BenchmarkSpec, Item, benchmark_names, get_benchmark, limit_count,
                       register_benchmark, select)
from .runner import (CONFIG, DECODINGS, GENERATIONS, EvalArguments, build_benchmark, check_inputs, consolidate,
                     evaluate, load_benchmark, load_model, process_state, read_run, run_config, run_evaluation)
from .scores import compute_metrics, item_scores

EvaluationInputError = InputError

__all__ = [
    "CONFIG", "DECODINGS", "GENERATIONS", "METRICS", "SCORES", "Benchmark", "BenchmarkSpec", "EvalArguments",
    "EvaluationInputError", "InputError", "Item", "Protocol", "benchmark_names", "build_benchmark", "caption_stats",
    "check_inputs", "compare_runs", "comparison_table", "compute_metrics", "consolidate", "evaluate",
    "get_benchmark", "item_scores", "limit_count", "load_benchmark", "load_model", "load_protocol", "paired_difference",
    "paired_differences", "process_state", "protocol_dir", "read_run", "read_scores", "register_benchmark",
    "run_config", "run_evaluation", "select",
]
