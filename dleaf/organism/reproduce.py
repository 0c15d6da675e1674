"""The study on the organism, end to end: every method through the evaluation harness, the correspondence suite,
and a report that sets the measured numbers beside the paper's claims.

Each step writes into the run folder and is skipped when its output is already there (the harness itself resumes
a half-finished evaluation), so an interrupted study resumes where it stopped; everything is seeded, so two runs
give the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable

from .. import evaluate
from ..io import write_json_atomic, write_text_atomic
from . import build

ADAPTER = build.DATA_DIR / "organism_dpo"

#: (label, method, uses the DPO adapter)
SETTINGS = (
    ("greedy", "greedy", False),
    ("pai", "pai", False),
    ("spin", "spin", False),
    ("dleaf", "dleaf", False),
    ("dpo", "greedy", True),
    ("dleaf_dpo", "dleaf", True),
)
BENCHMARKS = ("organism_caption", "organism_pope")

CLAIMS = {
    "chair": "53% relative CHAIR improvement over greedy decoding",
    "pope": "about +4 points of POPE accuracy and F1",
    "overhead": "negligible overhead",
    "link": "D-LEAF's correction corresponds to a DPO step",
}


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """What fixes a study run: images per benchmark (adversarial split; the yes/no benchmark asks two questions per
    image, adversarial negatives), the timing repeats and the correspondence suite's size."""

    n_images: int = 300
    timing_repeats: int = 3
    timing_batch: int = 8
    timing_tokens: int = 32
    correspondence: bool = True
    correspondence_pairs: int = 100

    def __post_init__(self):
        for name in ("n_images", "timing_repeats", "timing_batch", "timing_tokens", "correspondence_pairs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"StudyConfig.{name} must be positive, got {getattr(self, name)}")


def _eval_dir(out: Path, bench: str, label: str) -> Path:
    return out / "evals" / f"{bench}_{label}"


def run_evaluations(out: Path, cfg: StudyConfig, progress: bool = True, say: Callable = print) -> dict:
    """Every setting on both benchmarks through :func:`dleaf.evaluate.run_evaluation` (resumable)."""
    base = None
    metrics = {}
    for label, method, adapter in SETTINGS:
        for bench in BENCHMARKS:
            run_dir = _eval_dir(out, bench, label)
            if (run_dir / evaluate.METRICS).is_file():
                metrics[(bench, label)] = json.loads((run_dir / evaluate.METRICS).read_text())
                continue
            say(f"[study] {bench}: {label}")
            args = evaluate.EvalArguments(
                benchmark=bench, output_dir=str(run_dir), method=method, adapter=str(ADAPTER) if adapter else None,
                splits=["adversarial"], negatives=["adversarial"] if bench == "organism_pope" else [],
                limit=cfg.n_images, batch_size=100, progress=progress)
            model = processor = None
            if not adapter:
                if base is None:
                    base = build.load_organism()
                model, processor = base
            metrics[(bench, label)] = evaluate.run_evaluation(args, model, processor)
    return metrics


def measure_overhead(cfg: StudyConfig) -> dict:
    """Tokens per second of plain greedy decoding and of D-LEAF on the organism, interleaved in this process
    (median of ``timing_repeats``), and their ratio. ``docs/performance.md`` has the full benchmark."""
    import torch

    from .. import engine
    from . import world
    from .profile import _prompt_batch

    model, processor = build.load_organism()
    scenes = world.scenes("adversarial", cfg.timing_batch)
    batch = _prompt_batch(processor, scenes, [world.CAPTION_PROMPTS[0]] * len(scenes))
    gen = dict(max_new_tokens=cfg.timing_tokens, min_new_tokens=cfg.timing_tokens, do_sample=False)
    times = {"greedy": [], "dleaf": []}
    with torch.no_grad():
        model.generate(**batch, **gen)  # warm-up
        for _ in range(cfg.timing_repeats):
            for name in times:
                with engine.attached(model, None if name == "greedy" else name):
                    t0 = time.perf_counter()
                    model.generate(**batch, **gen)
                    times[name].append(time.perf_counter() - t0)
    tokens = cfg.timing_batch * cfg.timing_tokens
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"tokens_per_second": {k: tokens / v for k, v in med.items()},
            "dleaf_over_greedy_throughput": med["greedy"] / med["dleaf"], "repeats": cfg.timing_repeats,
            "batch": cfg.timing_batch, "new_tokens": cfg.timing_tokens}


def _section(metrics: dict, bench: str, label: str) -> dict:
    res = metrics.get((bench, label))
    if not res:
        return {}
    return next(iter(res["sections"].values()))


def claims_table(metrics: dict, overhead: dict | None, link: dict | None) -> tuple[list[dict], str]:
    """The paper's claims point by point, with what was measured here and whether it agrees."""
    rows = []
    g, d = _section(metrics, "organism_caption", "greedy"), _section(metrics, "organism_caption", "dleaf")
    if g and d:
        rel = (g["chair_s"] - d["chair_s"]) / g["chair_s"] if g["chair_s"] else math.nan
        rows.append({"claim": CLAIMS["chair"],
                     "measured": f"CHAIR_s {100 * g['chair_s']:.1f}% -> {100 * d['chair_s']:.1f}% "
                                 f"({100 * rel:+.1f}% relative; recall {100 * g['recall']:.1f}% -> "
                                 f"{100 * d['recall']:.1f}%)",
                     "agrees": bool(rel >= 0.25)})
    gp, dp = _section(metrics, "organism_pope", "greedy"), _section(metrics, "organism_pope", "dleaf")
    if gp and dp:
        da, df = dp["accuracy"] - gp["accuracy"], dp["f1"] - gp["f1"]
        rows.append({"claim": CLAIMS["pope"],
                     "measured": f"accuracy {100 * da:+.1f} points, F1 {100 * df:+.1f} points",
                     "agrees": bool(da >= 0.02 and df >= 0.02)})
    if overhead:
        r = overhead["dleaf_over_greedy_throughput"]
        rows.append({"claim": CLAIMS["overhead"],
                     "measured": f"D-LEAF decodes at {r:.2f} of greedy's tokens per second (organism, batch "
                                 f"{overhead['batch']}, this CPU)", "agrees": bool(r >= 0.9)})
    if link:
        rows.append({"claim": CLAIMS["link"], "measured": link["summary"], "agrees": link.get("agrees")})
    lines = ["| paper's claim | measured on the organism | agrees |", "|---|---|---|"]
    for r in rows:
        mark = "yes" if r["agrees"] else ("-" if r["agrees"] is None else "**no**")
        lines.append(f"| {r['claim']} | {r['measured']} | {mark} |")
    return rows, "\n".join(lines) + "\n"


def plot_methods(metrics: dict, path: Path) -> Path:
    """CHAIR_s, CHAIR_i and recall (captions) and POPE accuracy and F1 per setting, as grouped bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [s[0] for s in SETTINGS]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, bench, keys in ((axes[0], "organism_caption", ("chair_s", "chair_i", "recall")),
                            (axes[1], "organism_pope", ("accuracy", "f1", "yes_ratio"))):
        x = np.arange(len(labels))
        width = 0.8 / len(keys)
        for i, key in enumerate(keys):
            vals = [100 * _section(metrics, bench, lab).get(key, math.nan) for lab in labels]
            ax.bar(x + (i - (len(keys) - 1) / 2) * width, vals, width, label=key)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=20)
        ax.set_ylabel("%")
        ax.set_ylim(0, 100)
        ax.set_title("captions, adversarial split" if bench == "organism_caption"
                     else "yes/no questions, adversarial negatives")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def run_study(out_dir: str | Path, cfg: StudyConfig = StudyConfig(), progress: bool = True, say: Callable = print,
              correspondence: Callable[[Path], dict | None] | None = None) -> dict:
    """Run (or resume) the whole study into ``out_dir``; returns the report dict and writes report.{md,json} and
    methods.png. ``correspondence(out_dir / "correspondence")`` runs the correspondence suite and returns a dict
    with a one-line ``summary`` and ``agrees`` (or None when it is not available)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    metrics = run_evaluations(out, cfg, progress, say)
    overhead_path = out / "overhead.json"
    if overhead_path.is_file():
        overhead = json.loads(overhead_path.read_text())
    else:
        say("[study] decoding overhead")
        overhead = measure_overhead(cfg)
        write_json_atomic(overhead, overhead_path)
    link = None
    if cfg.correspondence and correspondence is not None:
        say("[study] correspondence suite")
        link = correspondence(out / "correspondence")
    claims, claims_md = claims_table(metrics, overhead, link)
    table = evaluate.comparison_table([_eval_dir(out, b, s[0]) for b in BENCHMARKS for s in SETTINGS])
    plot_methods(metrics, out / "methods.png")
    md = ["# The study on the organism", "",
          f"{cfg.n_images} adversarial images per benchmark (captions; yes/no questions with adversarial "
          "negatives), greedy decoding, the committed organism and DPO adapter. The organism misses parts of its "
          "design (docs/organism.md): read these numbers as measurements of this model.", "",
          "## The paper's claims, point by point", "", claims_md, "## Every setting", "", table, "",
          "![methods](methods.png)", ""]
    if link and link.get("markdown"):
        md += ["## D-LEAF and DPO", "", link["markdown"], ""]
    report = {"config": dataclasses.asdict(cfg), "claims": claims, "overhead": overhead, "correspondence": link,
              "metrics": {f"{b}/{s}": m for (b, s), m in metrics.items()}, "seconds": time.time() - t0}
    write_json_atomic(report, out / "report.json")
    write_text_atomic("\n".join(md) + "\n", out / "report.md")
    return report
