"""The benchmark itself: round-robin timing, paired steps, operator counts, scoring and memory, written as JSON."""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import engine
from ..io import write_json_atomic
from .checks import equivalence_checks
from .config import BASELINES, BenchConfig, plan_of
from .loop import Stream, generate_tokens, greedy_loop, run_config, sync
from .memory import measure_memory_cpu, measure_memory_cuda, memory_ratios
from .models import build_model_and_inputs, set_text_attention
from .report import LLAVA15_7B, cost_model
from .scoring import SCORING_MODES, random_response, score_once

# ---------------------------------------------------------------------------------------------------- the benchmark
def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def bootstrap_ratio(config_s: Sequence[float], base_s: Sequence[float], resamples: int, seed: int = 0,
                    level: float = 0.95) -> list[float] | None:
    """A percentile bootstrap interval of ``median(base_s) / median(config_s)`` over paired steps: each resample draws
    step indices with replacement and takes both medians over the same indices (the pairing is kept). None when
    ``resamples`` is 0 or there are fewer than two steps."""
    n = len(config_s)
    if resamples == 0 or n < 2:
        return None
    t = torch.tensor([list(config_s), list(base_s)], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (resamples, n), generator=g)
    med = torch.quantile(t[:, idx], 0.5, dim=-1)  # (2, resamples); interpolating, as statistics.median
    ratio = med[1] / med[0]
    lo, hi = torch.quantile(ratio, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return [lo, hi]


def summarise(runs: dict[str, list[dict]], batch: int, new_tokens: int) -> dict[str, dict]:
    rows = {}
    for config, times in runs.items():
        prefill = [t["prefill_s"] for t in times]
        decode = [t["decode_s"] for t in times]
        decode_tps = [batch * (new_tokens - 1) / t["decode_s"] for t in times]
        e2e_tps = [batch * new_tokens / (t["prefill_s"] + t["decode_s"]) for t in times]
        rows[config] = {
            "repeats": len(times),
            "prefill_s": median(prefill),
            "decode_s": median(decode),
            "step_ms": 1000 * median(decode) / (new_tokens - 1),
            "decode_tokens_per_s": median(decode_tps),
            "e2e_tokens_per_s": median(e2e_tps),
            "decode_tokens_per_s_range": [min(decode_tps), max(decode_tps)],
            "e2e_tokens_per_s_range": [min(e2e_tps), max(e2e_tps)],
        }
    for config, row in rows.items():
        for base in BASELINES:
            for metric in ("decode", "e2e"):
                row[f"{metric}_ratio_to_{base}"] = row[f"{metric}_tokens_per_s"] / rows[base][f"{metric}_tokens_per_s"]
    return rows


@torch.no_grad()
def count_step_ops(model, inputs: dict, cfg: BenchConfig) -> dict[str, int]:
    """Operators (aten calls, views included) that one cached decoding step dispatches, per configuration: on a
    small CPU or a GPU without graph capture, each costs a roughly fixed launch time whatever its size."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            _Count.n += 1
            return func(*args, **(kwargs or {}))

    counts = {}
    num_layers = model.config.text_config.num_hidden_layers
    for config in cfg.configs:
        if config == "vcd":
            continue  # two plain sdpa steps
        plan = plan_of(config, num_layers, cfg)
        if plan.options.get("compile"):
            continue  # under a dispatch mode the compiled region runs its eager fallback: the count would mislead
        set_text_attention(model, plan.attention)
        with plan.attached(model):
            stream = Stream(model, inputs)
            token = stream.prefill().argmax(dim=-1)
            _Count.n = 0
            with _Count():
                stream.step(token)
            counts[config] = _Count.n
    if "plain_sdpa" in counts:
        counts["vcd"] = 2 * counts["plain_sdpa"]
    return counts


def loop_vs_generate(model, inputs: dict, cfg: BenchConfig) -> dict:
    """Whether the manual greedy loop's tokens equal ``model.generate``'s (plain greedy, eager text attention), and,
    where they part, whether that is a tie: ``generate`` computes the same logits along another route, so where the
    loop's two best logits lie within the dtype's rounding (:data:`dleaf.bench.checks.TOLERANCE`, relative to the
    largest logit) the two may pick different tokens without either being wrong. Returns ``equal``,
    ``first_difference`` (the step, or None), ``gap_at_difference`` and ``tie``."""
    from .checks import TOLERANCE

    set_text_attention(model, "eager")
    seen = []
    ours, _ = greedy_loop(model, [inputs], cfg.check_tokens, lambda logits: seen.append(logits[0]) or logits[0])
    theirs = generate_tokens(model, inputs, cfg.check_tokens)
    row = {"equal": bool(torch.equal(ours, theirs)), "first_difference": None, "gap_at_difference": None,
           "tie": False}
    if not row["equal"] and ours.shape == theirs.shape:
        step = int((ours != theirs).any(dim=0).nonzero()[0])
        logits = seen[step].float()
        top = logits.topk(2, dim=-1).values  # (B, 2)
        sample = int((ours[:, step] != theirs[:, step]).nonzero()[0])
        gap = float(top[sample, 0] - top[sample, 1])
        scale = max(1.0, float(logits[sample].abs().max()))
        row.update(first_difference=step, gap_at_difference=gap, tie=gap <= TOLERANCE[cfg.dtype] * scale)
    return row


def check_loop_equals_generate(model, inputs: dict, cfg: BenchConfig) -> bool:
    """The manual greedy loop's tokens equal ``model.generate``'s (plain greedy, eager text attention)."""
    return loop_vs_generate(model, inputs, cfg)["equal"]


def bench_decoding(model, inputs_by_batch: dict, cfg: BenchConfig, log=print) -> dict:
    """Round-robin timing of every configuration at every batch size; returns the per-batch summaries."""
    out = {}
    for batch, inputs in inputs_by_batch.items():
        runs: dict[str, list[dict]] = {c: [] for c in cfg.configs}
        tokens: dict[str, torch.Tensor] = {}
        order = list(cfg.configs)
        for round_ in range(cfg.warmup + cfg.repeats):
            for config in order:
                toks, t = run_config(model, inputs, config, cfg)
                tokens.setdefault(config, toks)
                if round_ >= cfg.warmup:
                    runs[config].append(t)
            order = order[1:] + order[:1]  # rotate: no configuration always runs first
            log(f"  batch {batch}: round {round_ + 1}/{cfg.warmup + cfg.repeats} done")
        rows = summarise(runs, batch, cfg.new_tokens)
        same = torch.equal(tokens["plain_eager"], tokens["plain_sdpa"])
        out[str(batch)] = {"configs": rows, "raw": runs, "plain_sdpa_tokens_equal_eager": bool(same)}
    return out


class Stepper:
    """One configuration's decoding, advanced one cached step at a time, so that several configurations can take
    turns step by step in one process (:func:`bench_paired`). Its intervention is attached only while it steps."""

    def __init__(self, model, inputs: dict, config: str, cfg: BenchConfig):
        self.model, self.config = model, config
        plan = plan_of(config, model.config.text_config.num_hidden_layers, cfg)
        self.attn = plan.attention
        set_text_attention(model, self.attn)
        setting = plan.setting
        self.iv = engine.attach(model, setting.method, **setting.knob_dict, **plan.options) if setting.attaches \
            else None
        try:
            self.processors = engine.generation_kwargs(self.iv, inputs).get("logits_processor")
            self.ids = inputs["input_ids"]
            self.stream = Stream(model, inputs)
            self.token = self._next(self.stream.prefill())
        finally:
            if self.iv is not None:
                self.iv.detach()
        self.tokens = [self.token]

    def _next(self, logits: torch.Tensor) -> torch.Tensor:
        if self.processors:
            logits = self.processors(self.ids, logits)
        token = logits.argmax(dim=-1)
        if self.processors:
            self.ids = torch.cat([self.ids, token[:, None]], dim=1)
        return token

    def step(self) -> float:
        """One decoding step (and the method's logits processors); its duration in seconds."""
        set_text_attention(self.model, self.attn)
        if self.iv is not None:
            self.iv.reattach()
        try:
            device = self.token.device
            sync(device)
            t0 = time.perf_counter()
            self.token = self._next(self.stream.step(self.token))
            sync(device)
            dt = time.perf_counter() - t0
            self.tokens.append(self.token)
            return dt
        finally:
            if self.iv is not None:
                self.iv.detach()


@torch.no_grad()
def bench_paired(model, inputs_by_batch: dict, cfg: BenchConfig, log=print) -> dict:
    """Per-step overhead, paired: for each configuration, a fresh decoding of it, of plain eager and of plain sdpa
    take turns one cached step at a time (the order rotating every step), for ``paired_steps`` steps after
    ``paired_warmup`` untimed ones. Slow drifts of a shared machine then hit the three alike, so the ratio of the
    medians and the median of the per-step differences resolve overheads of a few percent that whole-run repeats
    cannot."""
    out = {}
    if cfg.paired_steps == 0:
        return out
    configs = [c for c in cfg.configs if c not in BASELINES]
    for batch, inputs in inputs_by_batch.items():
        rows = {}
        for config in configs:
            steppers = {name: Stepper(model, inputs, name, cfg) for name in (config,) + BASELINES}
            times = {name: [] for name in steppers}
            order = list(steppers)
            for i in range(cfg.paired_warmup + cfg.paired_steps):
                for name in order:
                    t = steppers[name].step()
                    if i >= cfg.paired_warmup:
                        times[name].append(t)
                order = order[1:] + order[:1]
            row = {"steps": cfg.paired_steps, "step_ms": 1000 * median(times[config]), "raw_s": times}
            for base in BASELINES:
                row[f"{base}_step_ms"] = 1000 * median(times[base])
                row[f"ratio_to_{base}"] = median(times[base]) / median(times[config])
                row[f"ratio_ci_to_{base}"] = bootstrap_ratio(times[config], times[base], cfg.bootstrap, cfg.seed)
                row[f"median_diff_ms_to_{base}"] = 1000 * median([a - b for a, b in zip(times[config], times[base])])
            rows[config] = row
            del steppers
            log(f"  paired, batch {batch}: {config} {row['step_ms']:.2f} ms/step, x{row['ratio_to_plain_eager']:.3f} "
                f"of plain eager ({row['plain_eager_step_ms']:.2f} ms), x{row['ratio_to_plain_sdpa']:.3f} of plain "
                f"sdpa ({row['plain_sdpa_step_ms']:.2f} ms)")
        out[str(batch)] = rows
    return out


def bench_scoring(model, inputs_by_batch: dict, cfg: BenchConfig, log=print) -> dict:
    """One-pass against step-by-step teacher-forced scoring of a ``score_tokens`` response with D-LEAF attached:
    after the whole prompt (both modes pay its prefill), and after a :class:`dleaf.engine.PromptCache` of the prompt
    made once beforehand (the response's own cost, as when several responses are scored against one prompt)."""
    out = {}
    for batch, prompt in inputs_by_batch.items():
        response = random_response(model, batch, cfg.score_tokens, cfg.seed, prompt["input_ids"].device)
        set_text_attention(model, "eager")
        sync(response.device)
        t0 = time.perf_counter()
        cache = engine.PromptCache(model, prompt)
        sync(response.device)
        cache_s = time.perf_counter() - t0
        times = {m: [] for m in SCORING_MODES} | {"prompt_prefill": []}
        logps = {}
        for round_ in range(1 + cfg.score_repeats):  # one warm-up round
            for mode in (SCORING_MODES if round_ % 2 == 0 else SCORING_MODES[::-1]):
                parts = {}
                logp, s = score_once(model, prompt, response, mode, parts, cache)
                logps[mode] = logp
                if round_ > 0:
                    times[mode].append(s)
                    if "prefill_s" in parts:
                        times["prompt_prefill"].append(parts["prefill_s"])
        one, step = median(times["one_pass"]), median(times["stepwise"])
        c_one, c_step = median(times["cached_one_pass"]), median(times["cached_stepwise"])
        pre = median(times["prompt_prefill"])
        out[str(batch)] = {
            "response_tokens": cfg.score_tokens, "one_pass_s": one, "stepwise_s": step, "speedup": step / one,
            "prompt_prefill_s": pre,
            # the response's own share estimated by subtraction: what each mode spends beyond the prompt's prefill
            "response_only_speedup": (step - pre) / (one - pre) if one > pre else float("inf"),
            "one_pass_tokens_per_s": batch * cfg.score_tokens / one,
            "stepwise_tokens_per_s": batch * cfg.score_tokens / step,
            "max_abs_logprob_diff": float((logps["one_pass"] - logps["stepwise"]).abs().max()),
            # the response's own share measured directly: both modes after the same cached prompt
            "cached": {
                "prompt_cache_s": cache_s, "one_pass_s": c_one, "stepwise_s": c_step, "speedup": c_step / c_one,
                "max_abs_logprob_diff": float((logps["cached_one_pass"] - logps["cached_stepwise"]).abs().max()),
                "max_abs_diff_to_one_pass": float((logps["cached_one_pass"] - logps["one_pass"]).abs().max()),
            },
            "raw": times,
        }
        log(f"  scoring batch {batch}: one pass {one:.3f} s, step by step {step:.3f} s, x{step / one:.1f}; after a "
            f"cached prompt: one pass {c_one:.3f} s, step by step {c_step:.3f} s, x{c_step / c_one:.1f}")
    return out


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads()}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def bench_memory(name: str, model, inputs: dict, cfg: BenchConfig, log=print) -> dict:
    """Peak memory of every configuration at every batch size (CPU: one fresh subprocess each)."""
    out = {}
    for batch in cfg.batch_sizes:
        mem = {}
        for config in cfg.configs:
            if torch.device(cfg.device).type == "cuda":
                mem[config] = measure_memory_cuda(model, inputs[batch], config, cfg)
            else:
                mem[config] = measure_memory_cpu(name, batch, config, cfg)
            log(f"  memory batch {batch} {config}: +{mem[config]['extra_mb']:.1f} MB")
        out[str(batch)] = memory_ratios(mem)
    return out


def run_memory_only(cfg: BenchConfig, out: str | Path, log=print) -> dict:
    """Measure only peak memory (CPU) for ``cfg.memory_models`` and merge it into the JSON at ``out``."""
    path = Path(out)
    result = json.loads(path.read_text()) if path.is_file() else {"bench_config": cfg.to_dict(),
                                                                     "environment": environment(), "models": {}}
    for name in cfg.memory_models:
        log(f"memory {name}")
        entry = result["models"].setdefault(name, {})
        entry["memory"] = bench_memory(name, None, None, cfg, log)
        write_json_atomic(result, path, indent=1)
    return result


def run_benchmark(cfg: BenchConfig, out: str | Path | None = None, log=print) -> dict:
    """Run the whole benchmark; write the JSON atomically to ``out`` after each phase of each model (when given), so
    that a run stopped by a time limit keeps what it measured. Per model, most telling first: the checks (the loop
    equals ``generate``; :func:`dleaf.bench.checks.equivalence_checks`), the operator counts, the paired steps, peak
    memory, the whole-run timing and scoring."""
    result = {"bench_config": cfg.to_dict(), "environment": environment(), "models": {},
              "reference_cost_model": {"description": LLAVA15_7B, "cost_model": cost_model(LLAVA15_7B, cfg.new_tokens)}}
    torch.manual_seed(cfg.seed)

    t0 = time.perf_counter()

    def save(phase: str):
        log(f"  {phase} done, {time.perf_counter() - t0:.0f} s into the run")
        if out is not None:
            write_json_atomic(result, out, indent=1)

    for name in cfg.models:
        log(f"model {name}")
        batches = sorted(set(cfg.batch_sizes) | set(cfg.score_batch_sizes if name in cfg.score_models else ()))
        model, inputs, desc = build_model_and_inputs(name, cfg, batches)
        entry = result["models"][name] = {"description": desc, "cost_model": cost_model(desc, cfg.new_tokens)}
        entry["loop_vs_generate"] = loop_vs_generate(model, inputs[min(batches)], cfg)
        entry["loop_equals_generate"] = entry["loop_vs_generate"]["equal"]
        log(f"  {desc}; loop equals generate: {entry['loop_vs_generate']}")
        if cfg.checks:
            entry["checks"] = equivalence_checks(model, inputs[min(batches)], cfg, log)
        save("checks")
        entry["ops_per_step"] = count_step_ops(model, inputs[min(batches)], cfg)
        save("operator counts")
        timed = {b: inputs[b] for b in cfg.batch_sizes}
        if cfg.paired_steps:
            entry["paired"] = bench_paired(model, timed, cfg, log)
            save("paired steps")
        if cfg.memory and name in cfg.memory_models:
            entry["memory"] = bench_memory(name, model, inputs, cfg, log)
            save("peak memory")
        entry["decoding"] = bench_decoding(model, timed, cfg, log)
        save("whole-run timing")
        if name in cfg.score_models:
            entry["scoring"] = bench_scoring(model, {b: inputs[b] for b in cfg.score_batch_sizes}, cfg, log)
            save("scoring")
        del model, inputs
        gc.collect()
        if torch.device(cfg.device).type == "cuda":
            torch.cuda.empty_cache()
    return result
