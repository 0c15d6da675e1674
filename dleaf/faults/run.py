"""Running the fault benchmark: every (split, fault, method) is a run folder of the evaluation harness's format
under ``<out>/<split>/<fault>/<method>/`` (``config.json``, ``generations.jsonl`` appended as produced,
``scores.jsonl``, ``metrics.json``; ``python scripts/evaluate.py --compare`` reads them), decoded by the harness's one
generation loop (:func:`dleaf.generation.generate`) on a registered benchmark with its protocol, and scored by its
metric core. Each generation row also holds ``cells`` (:func:`dleaf.faults.record.cell_record`). A run started
again resumes (the harness's consolidation and config check); the report is rewritten atomically from the run
folders (:mod:`dleaf.faults.report`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .. import engine
from ..eval import compare, runner
from ..eval.registry import Benchmark
from ..eval.scores import compute_metrics, item_scores
from ..generation import generate
from ..io import json_line, read_json, read_jsonl, write_json_atomic, write_text_atomic
from ..settings import Setting
from .config import FaultConfig
from .grid import DIAGNOSIS, METHODS, ROW_METHODS, UNFAULTED, BenchMethod, FaultBenchConfig, run_dir_of
from .measures import measured_flag_rate
from .report import build_report, write_report
from .record import CELLS_VERSION, RowChangeRecorder, cell_record


def run_arguments(benchmark: Benchmark, run_dir: Path, method: BenchMethod, knobs: Mapping[str, Any], model_name: str,
                  limit: int | None, max_new_tokens: int | None) -> runner.EvalArguments:
    return runner.EvalArguments(benchmark=benchmark.name, output_dir=str(run_dir), model=model_name,
                                method=method.method, knobs=[f"{k}={v!r}" for k, v in knobs.items()],
                                limit=limit, max_new_tokens=max_new_tokens, splits=list(benchmark.sections),
                                progress=False)


def run_cell(model, processor, benchmark: Benchmark, run_dir: str | Path, method: BenchMethod,
             fault: FaultConfig | None, *, knobs: Mapping[str, Any] | None = None, model_name: str = "organism",
             limit: int | None = None, max_new_tokens: int | None = None, batch_size: int = 16,
             model_weights: str | None = None, on_batch: Callable[[int], None] | None = None) -> dict:
    """Decode ``benchmark`` with ``method`` on the model with ``fault`` (None: unfaulted) into the run folder
    ``run_dir`` (resumed if it holds part of the same run; a different run there is an error), then write its
    ``scores.jsonl`` and ``metrics.json``; returns the metrics. ``model_weights`` (a digest of the checkpoint's
    weights, :func:`dleaf.faults.grid.model_digest`) is recorded in the run's configuration, so that a folder made
    by another checkpoint of the same name is refused rather than resumed."""
    run_dir = Path(run_dir)
    knobs = dict(method.knobs if knobs is None else knobs)
    args = run_arguments(benchmark, run_dir, method, knobs, model_name, limit, max_new_tokens)
    config = runner.run_config(args, benchmark)
    config["fault"] = fault.record() if fault is not None else None
    config["cells"] = CELLS_VERSION
    if model_weights is not None:
        config["model_weights_sha256"] = model_weights
    run_dir.mkdir(parents=True, exist_ok=True)
    runner.check_config(run_dir, config)
    ids = benchmark.ids
    runner.consolidate(run_dir, ids)
    main = run_dir / runner.GENERATIONS
    done = {r["id"] for _, r in read_jsonl(main, "generations file")[0]} if main.exists() else set()
    pending = [it for it in benchmark.items if it.id not in done]
    if pending:
        setting = Setting.from_record(config)
        rule = benchmark.protocol.sentence_rule
        was_training = model.training
        model.eval()
        try:
            with engine.attached(model, setting.method if setting.attaches else None, fault=fault,
                                 trace=method.flags, **setting.knob_dict) as iv:
                recorder = RowChangeRecorder(iv) if method.name in ROW_METHODS else None
                num_layers = len(engine.text_attention_modules(model))
                with open(main, "a", encoding="utf-8") as f:
                    for start in range(0, len(pending), batch_size):
                        chunk = pending[start:start + batch_size]
                        if iv is not None and iv.trace is not None:
                            iv.trace.steps.clear()
                        if recorder is not None:
                            recorder.reset()
                        rows = list(generate(model, processor, chunk, setting, config["max_new_tokens"],
                                             batch_size, rule, intervention=iv, token_ids=True))
                        for b, (it, row) in enumerate(zip(chunk, rows)):
                            n = len(row.pop("token_ids"))
                            tr = iv.trace.sample(b) if iv is not None and iv.trace is not None else None
                            change = recorder.sample(b, n) if recorder is not None else None
                            out = {"id": it.id, "section": it.section, "prompt": it.prompt,
                                   **{k: v for k, v in row.items() if k != "id"},
                                   "cells": cell_record(n, num_layers, fault, tr, change)}
                            f.write(json_line(out))
                        f.flush()
                        if on_batch is not None:
                            on_batch(len(chunk))
        finally:
            model.train(was_training)
    rows = runner.consolidate(run_dir, ids)
    result = {"benchmark": benchmark.name, "protocol": config["protocol"], "run": config,
              "sections": compute_metrics(benchmark, rows)}
    write_text_atomic("".join(json_line(s) for s in item_scores(benchmark, rows)), run_dir / compare.SCORES)
    write_json_atomic(result, run_dir / compare.METRICS)
    return result


def run_benchmark(model, processor, out_dir: str | Path, cfg: FaultBenchConfig, say: Callable[[str], None] = print,
                  progress: bool = False) -> dict:
    """Run (or resume) every (split, fault, method) cell, unfaulted first, then write the report; returns it."""
    out = Path(out_dir)
    benchmarks = {split: cfg.load_benchmark(split) for split in cfg.splits}
    faults: list[FaultConfig | None] = [None, *cfg.faults]
    total = len(faults) * len(cfg.methods) * len(cfg.splits)
    k = 0
    for split, bench in benchmarks.items():
        for fault in faults:
            for name in cfg.methods:
                k += 1
                method = METHODS[name]
                knobs = dict(cfg.method_knobs[name])
                if method.rate_of is not None:
                    knobs["random_rate"] = round(measured_flag_rate(run_dir_of(out, split, fault, method.rate_of)), 6)
                run_dir = run_dir_of(out, split, fault, name)
                if (run_dir / compare.METRICS).is_file() and (run_dir / compare.SCORES).is_file():
                    cfg_run = read_json(run_dir / runner.CONFIG, "run config")
                    if (cfg_run.get("knobs") == knobs and cfg_run.get("n_items") == len(bench.items)
                            and cfg_run.get("model_weights_sha256") == cfg.model_weights):
                        continue
                say(f"[{k}/{total}] {split} / {fault.label() if fault else UNFAULTED} / {name}")
                bar = None
                if progress:
                    from tqdm.auto import tqdm

                    bar = tqdm(total=len(bench.items), leave=False)
                run_cell(model, processor, bench, run_dir, method, fault, knobs=knobs, model_name=cfg.model,
                         limit=cfg.limit, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                         model_weights=cfg.model_weights, on_batch=bar.update if bar is not None else None)
                if bar is not None:
                    bar.close()
        run_diagnosis(model, processor, out, split, bench, cfg, say)
    report = build_report(out, cfg)
    write_report(report, out)
    return report


def run_diagnosis(model, processor, out_dir: str | Path, split: str, bench: Benchmark, cfg: FaultBenchConfig,
                  say: Callable[[str], None] = print) -> dict:
    """:func:`dleaf.faults.diagnose.signal_sensitivity` on the unfaulted greedy replies of ``split``, written to
    ``<out>/<split>/diagnosis.json``; an existing file of the same weights and images is read instead."""
    from ..generation import _image
    from .diagnose import signal_sensitivity

    path = Path(out_dir) / split / DIAGNOSIS
    if path.is_file():
        old = read_json(path, "diagnosis")
        if old.get("model_weights_sha256") == cfg.model_weights and old.get("n_items") == len(bench.items):
            return old
    say(f"{split} / the signal diagnosis on the unfaulted replies")
    rows = {r["id"]: r for _, r in read_jsonl(run_dir_of(out_dir, split, None, "greedy") / runner.GENERATIONS,
                                                "generations file")[0]}
    items = [it for it in bench.items if rows[it.id]["text"].strip()]
    diag = signal_sensitivity(model, processor, [it.prompt for it in items], [_image(it) for it in items],
                              [rows[it.id]["text"] for it in items], batch_size=min(cfg.batch_size, 32))
    diag["n_items"] = len(bench.items)
    diag["model_weights_sha256"] = cfg.model_weights
    write_json_atomic(diag, path)
    return diag


