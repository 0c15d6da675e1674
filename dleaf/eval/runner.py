"""The run: one model (optionally with a LoRA adapter) under one decoding setting on one benchmark, written to a
run folder that resumes.

``config.json``
    everything that decides what is generated (model, adapter, method and knobs, decoding, benchmark, sections,
    protocol name, version and file hash, overrides) and ``inputs``: every input file and folder the run reads, by
    content (question and annotation files, the images the items use, the LoRA adapter; :func:`input_records`). A
    resumed run must match it exactly, except for the paths the inputs were read from (the hashes decide). It is
    written when the model has loaded, before the first reply.
``generations.jsonl``
    one JSON object per item (``id``, ``section``, ``prompt``, ``raw``, ``text``, ``n_tokens``, ``stopped``; with
    ``record_flags`` also ``flags``), appended and flushed as it is produced. A run started again skips the ids
    already there; a last line cut by a kill (no newline) is dropped and regenerated. At the end the file holds every
    item once, in protocol order, whether it was written by one process, by several (``accelerate launch``), or over
    several interrupted runs.
``metrics.json``
    per section CHAIR (caption benchmarks) or POPE (yes/no benchmarks), with the protocol and the run configuration.
``scores.jsonl``
    per item the numbers behind the metrics, for paired comparisons of runs (:mod:`dleaf.eval.compare`).

Scale-out: under ``accelerate launch --num_processes N``, process ``r`` takes the pending items ``r::N``, writes them
to its own shard file ``generations.shard-r-of-N.jsonl``, and process 0 merges the shards into
``generations.jsonl`` in protocol order before it computes the metrics.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .. import models
from ..cli import check_output_dir, parse_knobs
from ..generation import generate
from ..io import InputError, json_line, read_json, read_jsonl, write_json_atomic, write_text_atomic
from ..settings import STRATEGIES, Setting
from .compare import METRICS, SCORES
from .inputs import decisive, input_differences, input_records
from .protocol import load_protocol
from .registry import Benchmark, Item, benchmark_names, get_benchmark
from .scores import compute_metrics, item_scores

GENERATIONS = "generations.jsonl"
CONFIG = "config.json"
DECODINGS = STRATEGIES
_SHARD_RE = re.compile(r"^generations\.shard-(\d+)-of-(\d+)\.jsonl$")
#: the harness arguments a benchmark may read as its options (see BenchmarkSpec.options)
OPTION_FIELDS = ("splits", "negatives", "coco_images", "coco_instances", "coco_captions", "chair_rules", "pope_files",
                 "pope_images", "pope_answer_rule")


def _field(default=None, help: str = "", **kw):
    factory = kw.pop("default_factory", None)
    meta = {"help": help, **kw}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class EvalArguments:
    """Arguments of ``scripts/evaluate.py`` (each field is a ``--flag``; a YAML file with these keys works too)."""

    benchmark: str | None = _field(None, "the benchmark: organism_caption, organism_pope, coco_chair or pope_file "
                                         "(any registered benchmark)")
    output_dir: str | None = _field(None, "run folder (config.json, generations.jsonl, metrics.json, scores.jsonl); "
                                          "an existing one is resumed")
    model: str = _field("organism", models.model_help())
    adapter: str | None = _field(None, "LoRA adapter folder (PEFT), merged into the model")
    method: str = _field("greedy", "greedy (nothing attached) or a method: python -m dleaf methods lists them")
    knobs: list[str] = _field(default_factory=list, help="method knobs as name=value (values read as YAML), e.g. "
                                                          "--knob gamma=0.3 --knob layer_start=2",
                              aliases=["--knob"], action="append", metavar="NAME=VALUE")
    decoding: str = _field("greedy", "greedy, beam or sample")
    num_beams: int = _field(5, "beams for --decoding beam")
    temperature: float = _field(1.0, "for --decoding sample")
    top_p: float = _field(1.0, "for --decoding sample")
    seed: int | None = _field(None, "sampling seed (default: the protocol's sampling_seed)")
    protocol: str | None = _field(None, "protocol name under data/protocols or a YAML file (default: the "
                                        "benchmark's own)")
    max_new_tokens: int | None = _field(None, "override the protocol's token limit (recorded as an override)")
    limit: int | None = _field(None, "evaluate only the first N images (organism, COCO) or questions (POPE files) "
                                     "per section (recorded as an override)")
    splits: list[str] = _field(default_factory=list, help="organism splits to run (default: the protocol's)")
    negatives: list[str] = _field(default_factory=list, help="organism_pope negative samplings to run")
    coco_images: str | None = _field(None, "coco_chair: folder of the val2014 images")
    coco_instances: str | None = _field(None, "coco_chair: instances_val2014.json")
    coco_captions: str | None = _field(None, "coco_chair: captions_val2014.json")
    pope_files: list[str] = _field(default_factory=list, help="pope_file: POPE question files")
    pope_images: str | None = _field(None, "pope_file: folder of the POPE images")
    chair_rules: str | None = _field(None, "coco_chair: how object words are found: reference (the CHAIR script "
                                           "published tables use; the protocol's default) or dleaf (the project's "
                                           "synonym table)")
    pope_answer_rule: str | None = _field(None, "pope_file: how answers are read: pope_official (the POPE "
                                                "repository's rule; the protocol's default) or dleaf (the project's "
                                                "stricter parser)")
    batch_size: int = _field(16, "prompts per generate call")
    dtype: str = _field("float32", "float32, bfloat16, float16 or auto")
    attn_implementation: str | None = _field(None, "attention implementation to load the model with (default: "
                                                   "eager for the organism, the model's own otherwise)")
    progress: bool = _field(True, "show a progress bar")
    threads: int | None = _field(None, "CPU threads torch may use (default: torch's own choice)")
    record_flags: bool = _field(False, "record each reply's flagged and watched (position, layer) cells, for "
                                       "methods that flag layers (D-LEAF and its variants)")
    compare: list[str] = _field(default_factory=list, help="instead of evaluating, print a markdown table comparing "
                                                           "these run folders")
    paired: bool = _field(False, "with --compare: add each run's difference from the first run, with a paired "
                                 "bootstrap interval")
    table_out: str | None = _field(None, "with --compare: also write the table to this file")
    write_coco_ids: str | None = _field(None, "write the protocol's COCO image id list (derived from "
                                              "--coco_instances) to this file and exit")

    def __post_init__(self):
        flat: list[str] = []
        for k in self.knobs or []:
            flat.extend(k if isinstance(k, list) else [k])
        self.knobs = flat
        if self.decoding not in DECODINGS:
            raise InputError(f"unknown decoding {self.decoding!r}; expected one of {', '.join(DECODINGS)}")
        for name in ("batch_size", "limit", "max_new_tokens", "num_beams", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"--{name} must be a positive integer, got {value!r}")
        if self.dtype not in models.DTYPES:
            raise InputError(f"--dtype must be one of {', '.join(models.DTYPES)}, got {self.dtype!r}")

    def knob_values(self) -> dict:
        return parse_knobs(self.knobs)

    def setting(self, protocol=None) -> Setting:
        """The decoding :class:`~dleaf.settings.Setting` these arguments ask for (sampling seed: ``--seed``, else
        the protocol's ``sampling_seed``)."""
        seed = self.seed if self.seed is not None else int(protocol["sampling_seed"]) if protocol is not None else 0
        return Setting(self.method, self.knob_values(), self.decoding,
                       num_beams=self.num_beams if self.decoding == "beam" else None,
                       temperature=self.temperature, top_p=self.top_p, seed=seed)

    def options(self) -> dict[str, Any]:
        """The benchmark options given (those of :data:`OPTION_FIELDS` that are set)."""
        return {name: getattr(self, name) for name in OPTION_FIELDS if getattr(self, name)}


def build_benchmark(args: EvalArguments) -> Benchmark:
    """The benchmark ``args`` asks for, with its protocol; every input is checked here, before any generation."""
    if not args.benchmark:
        raise InputError(f"--benchmark is required; one of {', '.join(benchmark_names())}")
    spec = get_benchmark(args.benchmark)
    protocol = load_protocol(args.protocol or args.benchmark)
    if protocol.benchmark != args.benchmark:
        raise InputError(f"protocol {protocol.path} is for benchmark {protocol.benchmark!r}, not {args.benchmark!r}")
    options = args.options()
    extra = [name for name in options if name not in spec.options]
    if extra:
        accepted = ", ".join(f"--{o}" for o in spec.options) or "none"
        raise InputError(f"{', '.join(f'--{e}' for e in extra)} does not apply to benchmark {spec.name} (its "
                         f"options: {accepted})")
    missing = [name for name in spec.required if not options.get(name)]
    if missing:
        raise InputError(f"{spec.name} needs {', '.join(f'--{m}' for m in missing)} "
                         f"({'; '.join(spec.options[m] for m in missing)})")
    return spec.build(protocol, options, args.limit)


def load_benchmark(name: str, limit: int | None = None, protocol: str | None = None, **options) -> Benchmark:
    """A registered benchmark by name, e.g. ``load_benchmark("organism_caption", limit=100, splits=["adversarial"])``
    or ``load_benchmark("coco_chair", coco_images=..., coco_instances=..., coco_captions=...)``."""
    return build_benchmark(EvalArguments(benchmark=name, limit=limit, protocol=protocol, **options))


def run_config(args: EvalArguments, benchmark: Benchmark) -> dict:
    """What decides the generations of a run (no batch size, process count or machine path of the harness): the
    inputs by content (:func:`input_records`), so that a resume with other inputs is refused."""
    setting = args.setting(benchmark.protocol)
    overrides = {}
    if args.max_new_tokens is not None:
        overrides["max_new_tokens"] = args.max_new_tokens
    if args.limit is not None:
        overrides["limit"] = args.limit
    config = {
        "benchmark": benchmark.name,
        "protocol": {**benchmark.protocol.record(), "overrides": overrides},
        "sections": benchmark.sections,
        "n_items": len(benchmark.items),
        "inputs": {**benchmark.info, **input_records(args, benchmark)},
        **({"scoring": benchmark.scoring} if benchmark.scoring else {}),
        "model": args.model,
        "adapter": args.adapter,
        **setting.record(),
        "max_new_tokens": benchmark.max_new_tokens(args.max_new_tokens),
        "dtype": args.dtype,
    }
    if args.record_flags:
        config["record_flags"] = True
    return config


def load_model(args: EvalArguments):
    """``(model, processor)`` for ``args.model`` (the organism by default), with the LoRA adapter merged in
    (:func:`dleaf.models.load`)."""
    return models.load(args.model, args.adapter, args.attn_implementation, args.dtype)


def check_inputs(args: EvalArguments) -> tuple[Benchmark, dict]:
    """Everything that can be checked before a model is loaded: the output folder, the model and adapter, the
    benchmark and its files, the method and its knobs, the decoding. Returns the benchmark and the run
    configuration."""
    if not args.output_dir:
        raise InputError("--output_dir is required")
    check_output_dir(args.output_dir)
    models.check_model(args.model)
    models.check_adapter(args.adapter)
    benchmark = build_benchmark(args)
    config = run_config(args, benchmark)
    return benchmark, config


def generate_rows(model, processor, items: Sequence[Item], config: dict, batch_size: int, sentence_rule: str,
                  on_batch=None) -> Iterable[dict]:
    """One harness row per item, in order, through :func:`dleaf.generation.generate` under the run's setting."""
    setting = Setting.from_record(config)
    rule = sentence_rule if items and items[0].kind == "caption" else "keep"
    rows = generate(model, processor, items, setting, config["max_new_tokens"], batch_size, rule,
                    flags=bool(config.get("record_flags")), on_batch=on_batch)
    for it, row in zip(items, rows):
        if row["id"] != it.id:
            raise RuntimeError(f"generation returned {row['id']!r} for item {it.id!r}")
        yield {"id": it.id, "section": it.section, "prompt": it.prompt, **{k: v for k, v in row.items() if k != "id"}}


def evaluate(model, processor, benchmark: Benchmark, setting: Setting = Setting(), batch_size: int = 16,
             max_new_tokens: int | None = None, record_flags: bool = False) -> dict:
    """Evaluate an already loaded model in memory (no run folder): ``{"sections": metrics per section, "rows":
    the generation rows, "scores": per-item scores}``. The same loop, sentence rule and metrics as a run."""
    config = {**setting.record(), "max_new_tokens": benchmark.max_new_tokens(max_new_tokens),
              "record_flags": record_flags}
    was_training = model.training
    model.eval()
    try:
        rows = list(generate_rows(model, processor, benchmark.items, config, batch_size,
                                  benchmark.protocol.sentence_rule))
    finally:
        model.train(was_training)
    return {"sections": compute_metrics(benchmark, rows), "rows": rows, "scores": item_scores(benchmark, rows)}


# ---------------------------------------------------------------------------------------------------------------
# The run folder: resume, shards, merge
# ---------------------------------------------------------------------------------------------------------------


def _shard_path(run_dir: Path, rank: int, world: int) -> Path:
    return run_dir / f"generations.shard-{rank}-of-{world}.jsonl"


def _collect(path: Path, order: dict[str, int], rows: dict[str, dict], what: str) -> bool:
    """Add ``path``'s rows to ``rows``; returns whether the file must be rewritten (a truncated tail)."""
    found, truncated = read_jsonl(path, what, drop_truncated_tail=True)
    for n, row in found:
        rid = row.get("id")
        if rid not in order:
            raise InputError(f"{what} {path}, line {n}: id {rid!r} is not an item of this run's benchmark (is the "
                             f"folder from another benchmark or protocol?)")
        if rid in rows and rows[rid] != row:
            raise InputError(f"{what} {path}, line {n}: id {rid!r} appears twice with different content")
        rows[rid] = row
    return truncated


def consolidate(run_dir: str | os.PathLike, ids: Sequence[str]) -> dict[str, dict]:
    """Merge ``generations.jsonl`` and any shard files of ``run_dir`` into ``generations.jsonl`` (one row per id,
    in the order of ``ids``), drop a truncated last line, delete merged shards; return the rows by id.

    The file is rewritten (atomically) only when something changes, so a run that wrote its rows in order in one
    go keeps its file byte for byte.
    """
    run_dir = Path(run_dir)
    order = {rid: k for k, rid in enumerate(ids)}
    main = run_dir / GENERATIONS
    rows: dict[str, dict] = {}
    rewrite = False
    if main.exists():
        rewrite |= _collect(main, order, rows, "generations file")
        main_ids = [r["id"] for _, r in read_jsonl(main, "generations file", drop_truncated_tail=True)[0]]
        rewrite |= len(main_ids) != len(set(main_ids))
        rewrite |= main_ids != sorted(main_ids, key=order.__getitem__)
    shards = sorted(p for p in run_dir.iterdir() if _SHARD_RE.match(p.name))
    for shard in shards:
        before = len(rows)
        _collect(shard, order, rows, "shard file")
        rewrite |= len(rows) != before
    if rewrite or (shards and not main.exists()):
        write_text_atomic("".join(json_line(rows[rid]) for rid in sorted(rows, key=order.__getitem__)), main)
    for shard in shards:
        shard.unlink()
    return rows


def check_config(run_dir: Path, config: dict, write: bool = True) -> None:
    """Check that an existing run folder holds the same run (:func:`decisive`: its inputs by content); with
    ``write``, write ``config.json`` into a folder that has none (creating the folder)."""
    path = run_dir / CONFIG
    fresh = json.loads(json.dumps(config))
    if path.exists():
        old = read_json(path, "run config")
        a, b = decisive(old), decisive(fresh)
        if a != b:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            inputs = input_differences(old.get("inputs") or {}, fresh.get("inputs") or {}) \
                if "inputs" in diff and isinstance(old.get("inputs") or {}, dict) else []
            if inputs:
                others = [k for k in diff if k != "inputs"]
                also = f"; config.json also differs in {', '.join(others)}" if others else ""
                raise InputError(f"run folder {run_dir} holds a run of other inputs ({'; '.join(inputs)}{also}); use "
                                 "a new --output_dir, or give the run's own inputs to resume it")
            raise InputError(f"run folder {run_dir} holds a different run (config.json differs in {', '.join(diff)}); "
                             "use a new --output_dir")
    elif write:
        write_json_atomic(config, path)


def _from_main(obj, state):
    """Process 0's ``obj`` on every process (a barrier too)."""
    if state.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _first_error(error: str | None, state) -> str | None:
    """The first process's error of those that had one, on every process (a barrier too), so that a model that
    fails to load on one process stops them all."""
    if state.num_processes == 1:
        return error
    from accelerate.utils import gather_object

    return next((e for e in gather_object([error]) if e is not None), None)


def process_state():
    """This process's ``accelerate.PartialState``. Without an accelerator, processes launched by accelerate only form
    a group when told to use the CPU."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_evaluation(args: EvalArguments, model=None, processor=None, benchmark: Benchmark | None = None,
                   say=_say) -> dict | None:
    """Evaluate (or resume) one run; returns the metrics dict on process 0 and None on the others.

    Every input is checked before a model is loaded: an existing run folder must hold the same run, its inputs
    by content (:func:`check_config`). ``model``/``processor`` may be given (already loaded); otherwise
    :func:`load_model` loads them, and only when something is left to generate; nothing is written into the run
    folder before then, so a model that fails to load leaves no ``config.json`` behind. Under ``accelerate launch``
    the pending items are sharded across processes (see the module docstring).
    """
    from tqdm.auto import tqdm

    if benchmark is None:
        benchmark, config = check_inputs(args)
    else:
        if not args.output_dir:
            raise InputError("--output_dir is required")
        config = run_config(args, benchmark)
    run_dir = check_output_dir(args.output_dir)
    state = process_state()
    rank, world = state.process_index, state.num_processes
    ids = benchmark.ids
    error = None
    if state.is_main_process and run_dir.is_dir():
        try:  # an existing folder must hold this run, with these inputs
            check_config(run_dir, config, write=False)
            consolidate(run_dir, ids)
        except InputError as e:
            error = str(e)
    error = _from_main(error, state)  # every process stops on process 0's error, none waits for ever
    if error is not None:
        raise InputError(error)
    main = run_dir / GENERATIONS
    done = {r["id"] for _, r in read_jsonl(main, "generations file")[0]} if main.exists() else set()
    pending = [it for it in benchmark.items if it.id not in done]
    if state.is_main_process and done:
        say(f"resuming {run_dir}: {len(done)} of {len(ids)} done" + (", nothing left to generate" if not pending
                                                                       else ""))
    mine = pending[rank::world]
    if mine and model is None:
        try:
            model, processor = load_model(args)
        except InputError as e:
            error = str(e)
    error = _first_error(error, state)
    if error is not None:
        raise InputError(error)
    if state.is_main_process:  # nothing is written before the model has loaded
        run_dir.mkdir(parents=True, exist_ok=True)
        check_config(run_dir, config)
    state.wait_for_everyone()
    if mine:
        model.to(state.device)
        target = main if world == 1 else _shard_path(run_dir, rank, world)
        bar = tqdm(total=len(mine), desc=f"{benchmark.name}" + (f" [{rank}/{world}]" if world > 1 else ""),
                   disable=not args.progress, position=rank, leave=world == 1)
        with open(target, "a", encoding="utf-8") as f:
            for row in generate_rows(model, processor, mine, config, args.batch_size, benchmark.protocol.sentence_rule):
                f.write(json_line(row))
                f.flush()
                bar.update(1)
        bar.close()
    state.wait_for_everyone()
    result = None
    if state.is_main_process:
        rows = consolidate(run_dir, ids)
        result = {"benchmark": benchmark.name, "protocol": config["protocol"], "run": config,
                  "sections": compute_metrics(benchmark, rows)}
        write_text_atomic("".join(json_line(s) for s in item_scores(benchmark, rows)), run_dir / SCORES)
        write_json_atomic(result, run_dir / METRICS)
    state.wait_for_everyone()
    return result


def read_run(run_dir: str | os.PathLike) -> tuple[dict, list[dict]]:
    """``(config, generation rows)`` of a run folder (rows in file order)."""
    run_dir = Path(run_dir)
    config = read_json(run_dir / CONFIG, "run config")
    rows = [r for _, r in read_jsonl(run_dir / GENERATIONS, "generations file")[0]]
    return config, rows
