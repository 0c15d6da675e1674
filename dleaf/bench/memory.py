"""Peak memory of a configuration: CUDA's allocator statistics, or on a CPU the peak resident set of a fresh process."""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

from .config import BASELINES, BenchConfig
from .loop import run_config
from .models import build_model_and_inputs

# ---------------------------------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``), or None where there is no such file."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_kb() -> int:
    """The resident-set high-water mark: ``VmHWM`` where the kernel reports it (reset by ``clear_refs``; with worker
    threads alive, ``getrusage`` can keep reporting the peak from before the reset), else ``getrusage``."""
    hwm = _status_kb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> bool:
    """Reset the process's resident-set high-water mark (Linux ``/proc/self/clear_refs``); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_child(spec: dict) -> dict:
    """Run one configuration once and report its peak memory above the loaded-model baseline (run in a fresh
    process by :func:`measure_memory_cpu`)."""
    cfg = BenchConfig.from_dict(spec["cfg"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(cfg.seed)
    model, inputs, _ = build_model_and_inputs(spec["model"], cfg, [spec["batch"]])
    inputs = inputs[spec["batch"]]
    gc.collect()
    reset = _reset_peak_rss()
    base_kb = _status_kb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run_config(model, inputs, spec["config"], cfg)
    peak_kb = _peak_kb()
    return {"baseline_mb": base_kb / 1024, "peak_mb": peak_kb / 1024, "extra_mb": (peak_kb - base_kb) / 1024,
            "peak_reset": reset}


def measure_memory_cpu(model_name: str, batch: int, config: str, cfg: BenchConfig, timeout: float = 1800) -> dict:
    """Peak RSS of one configuration, measured in a fresh subprocess."""
    spec = json.dumps({"model": model_name, "batch": batch, "config": config, "cfg": cfg.to_dict(),
                       "threads": torch.get_num_threads()})
    code = ("import json, sys; from dleaf.bench import memory; "
            "print(json.dumps(memory.memory_child(json.loads(sys.argv[1]))))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=str(Path(__file__).resolve().parents[2]))
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess for {model_name}/{batch}/{config} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_memory_cuda(model, inputs: dict, config: str, cfg: BenchConfig) -> dict:
    """Peak CUDA memory of one configuration above what is allocated before it runs."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run_config(model, inputs, config, cfg)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"baseline_mb": base / 2**20, "peak_mb": peak / 2**20, "extra_mb": (peak - base) / 2**20,
            "peak_reset": True}


def memory_ratios(mem: dict[str, dict]) -> dict[str, dict]:
    """Add to each configuration's memory row its peak, and its peak above the loaded model ("extra"), as ratios to
    those of plain eager and plain sdpa decoding."""
    for row in mem.values():
        for base in BASELINES:
            row[f"peak_ratio_to_{base}"] = row["peak_mb"] / mem[base]["peak_mb"]
            row[f"extra_ratio_to_{base}"] = (row["extra_mb"] / mem[base]["extra_mb"]
                                             if mem[base]["extra_mb"] > 0 else float("nan"))
    return mem

