"""The study, end to end: every method through the evaluation harness, the decoding overhead, the correspondence
suite, and a report (markdown, JSON, figures) that sets the measured numbers beside the paper's claims.

Two targets, one code path:

- the organism (the default): captions of adversarial organism scenes and yes/no questions with adversarial
  negatives, the committed organism and its DPO adapter (``data/organism_dpo``), the adapter's held-out pairs; any
  other model of the organism's world (a registered organism or a folder written by ``scripts/train_organism.py``:
  :func:`dleaf.organism.build.is_world_checkpoint`) is studied on the same benchmarks unless COCO or POPE inputs
  are given, with its own ``adapter`` and ``detector`` when given (the organism's DPO adapter and shipped detector
  were fitted on the organism alone);
- a real checkpoint (``model`` a hub id or folder): CHAIR on COCO val2014 (``coco_images``, ``coco_instances``,
  ``coco_captions``) and POPE question files (``pope_files``, ``pope_images``), a DPO adapter trained on it with
  ``scripts/train_dpo.py`` (``adapter``; without one the DPO rows and the correspondence suite are skipped and the
  report says so), and held-out preference pairs for the correspondence suite (``preference_data``).

Each step writes into the run folder and is skipped when its output is already there (the harness itself resumes a
half-finished evaluation), so an interrupted study resumes where it stopped; everything is seeded, so two runs give
the same numbers. Under ``accelerate launch`` the evaluations are sharded over the processes (the harness does it);
the overhead, the correspondence suite and the report run on process 0 alone.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Callable

from . import eval as harness
from .eval.runner import check_config
from .io import write_json_atomic, write_text_atomic
from .resources import data_path
from .settings import Setting

ORGANISM_ADAPTER = data_path("organism_dpo")

#: The study's settings (each method with its default knobs, greedy search), labelled for the tables; those labelled
#: in :data:`WITH_ADAPTER` decode the model with the DPO adapter merged in.
SETTINGS = (
    Setting(label="greedy"),
    Setting("pai", label="pai"),
    Setting("spin", label="spin"),
    Setting("dleaf", label="dleaf"),
    Setting(label="dpo"),
    Setting("dleaf", label="dleaf_dpo"),
)
WITH_ADAPTER = frozenset({"dpo", "dleaf_dpo"})
#: The label of D-LEAF's fusion at a learned localization (method ``dleaf_learned``), run after ``dleaf`` when the
#: study has a detector for its model (the organism's is shipped; a real checkpoint's is given as ``detector``).
LEARNED = "dleaf_learned"
ORGANISM_BENCHMARKS = ("organism_caption", "organism_pope")
CHECKPOINT_BENCHMARKS = ("coco_chair", "pope_file")
BENCHMARKS = ORGANISM_BENCHMARKS  # the default target's

CLAIMS = {
    "chair": "53% relative CHAIR improvement over greedy decoding",
    "pope": "about +4 points of POPE accuracy and F1",
    "overhead": "negligible overhead",
    "link": "D-LEAF's correction corresponds to a DPO step",
}


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """What fixes a study run.

    ``n_images``: images per benchmark (organism: adversarial split, default 300; the yes/no benchmark asks two
    questions per image; a real checkpoint: the first N COCO images and the first N questions of each POPE file,
    default the whole protocol). The overhead measurement: ``timing_steps`` paired decoding steps after
    ``timing_warmup`` untimed ones, on ``timing_batch`` caption prompts. The correspondence suite's size. The
    target: ``model`` ("organism", another model of the organism's world, or a hub id / checkpoint folder) and its
    inputs (see the module docstring).
    ``seed``: of every random draw of the study (the bootstrap intervals, the correspondence suite's nulls).
    ``detector``: a token-level hallucination detector file fitted on the model (``python -m dleaf.detect``), for the
    ``dleaf_learned`` setting (the organism's default: the shipped detector; a real checkpoint without one does not
    run that setting).
    """

    n_images: int | None = None
    timing_steps: int = 40
    timing_warmup: int = 5
    timing_batch: int = 8
    correspondence: bool = True
    correspondence_pairs: int = 100
    model: str = "organism"
    adapter: str | None = None
    coco_images: str | None = None
    coco_instances: str | None = None
    coco_captions: str | None = None
    pope_files: tuple[str, ...] = ()
    pope_images: str | None = None
    preference_data: str | None = None
    preference_split: str = "test"
    column_map: tuple[str, ...] | str | None = None
    dtype: str = "float32"
    attn_implementation: str | None = None
    batch_size: int | None = None
    detector: str | None = None
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"StudyConfig.seed must be a non-negative integer, got {self.seed!r}")
        for name in ("timing_steps", "timing_batch", "correspondence_pairs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"StudyConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("n_images", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"StudyConfig.{name} must be positive (or None for the default), got "
                                 f"{getattr(self, name)}")
        object.__setattr__(self, "pope_files", tuple(self.pope_files))
        if self.column_map is not None and not isinstance(self.column_map, str):
            object.__setattr__(self, "column_map", tuple(self.column_map))
        if self.detector is not None:
            from .detect import as_detector

            try:
                as_detector(self.detector)  # a file, or a shipped detector's name
            except ValueError as e:
                raise ValueError(f"--detector: {e} (pass a detector file written by python -m dleaf.detect)") from None
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"StudyConfig.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.organism:
            extra = [n for n in ("coco_images", "coco_instances", "coco_captions", "pope_images", "preference_data")
                     if getattr(self, n)] + (["pope_files"] if self.pope_files else [])
            if extra:
                which = "the organism" if self.shipped_organism else f"{self.model!r}, a model of the organism's world"
                raise ValueError(f"{', '.join(extra)} given, but the study's model is {which}; pass --model "
                                 "(a hub id or checkpoint folder) to study a real checkpoint on COCO and POPE")
            self._check_adapter()
            return
        missing = [n for n in ("coco_images", "coco_instances", "pope_images") if not getattr(self, n)]
        if not self.pope_files:
            missing.append("pope_files")
        if missing:
            raise ValueError(f"a study of {self.model!r} needs {', '.join(missing)} (COCO val2014 images and "
                             "instances for CHAIR, the POPE question files and their images)")
        if self.adapter and self.correspondence and not self.preference_data:
            raise ValueError("the correspondence suite needs held-out preference pairs for a real checkpoint: pass "
                             "preference_data (a save_to_disk folder, parquet or JSON lines file), or turn the "
                             "suite off")
        self._check_adapter()

    def _check_adapter(self) -> None:
        """The adapter folder, checked before the study generates anything (the organism's too)."""
        if self.adapter and not (Path(self.adapter) / "adapter_config.json").is_file():
            raise ValueError(f"--adapter {self.adapter}: no adapter_config.json there, so not a LoRA adapter; pass "
                             "the output_dir of scripts/train_dpo.py")

    @functools.cached_property
    def organism(self) -> bool:
        """Whether the study runs on the organism's benchmarks: for the committed organism, and for another model
        of the organism's world unless COCO or POPE inputs are given (then it is studied as a real checkpoint).
        Decided once per configuration (the world check reads the checkpoint's tokenizer file)."""
        if self.shipped_organism:
            return True
        if any(getattr(self, n) for n in ("coco_images", "coco_instances", "coco_captions", "pope_images",
                                          "pope_files")):
            return False
        from .models import is_world_model

        harness.benchmark_names()  # loads the benchmark plugins, which register their worlds
        return is_world_model(self.model)

    @property
    def shipped_organism(self) -> bool:
        """Whether the model is the committed organism itself (whose DPO adapter ships with it)."""
        return self.model == "organism"

    @property
    def benchmarks(self) -> tuple[str, str]:
        return ORGANISM_BENCHMARKS if self.organism else CHECKPOINT_BENCHMARKS

    @property
    def images(self) -> int | None:
        return (self.n_images or 300) if self.organism else self.n_images

    @property
    def adapter_path(self) -> str | None:
        if self.adapter:
            return self.adapter
        if self.shipped_organism and (ORGANISM_ADAPTER / "adapter_config.json").is_file():
            return str(ORGANISM_ADAPTER)
        return None

    @property
    def detector_path(self) -> str | None:
        """The detector of the ``dleaf_learned`` setting: ``detector``, else the detector shipped for the model (by
        its registered name: :data:`dleaf.detect.SHIPPED`), else None."""
        from .detect import SHIPPED

        return self.detector or (self.model if self.model in SHIPPED else None)

    @property
    def settings(self) -> tuple[Setting, ...]:
        """The settings this study runs (those with the adapter only when there is one; ``dleaf_learned`` after
        ``dleaf`` when there is a detector)."""
        out = []
        for s in SETTINGS:
            if uses_adapter(s) and not self.adapter_path:
                continue
            out.append(s)
            if s.label == "dleaf" and self.detector_path:
                knobs = ({} if self.detector_path == "organism" and self.shipped_organism
                         else {"detector": self.detector_path})
                out.append(Setting("dleaf_learned", knobs, label=LEARNED))
        return tuple(out)

    @property
    def generation_batch(self) -> int:
        return self.batch_size or (100 if self.organism else 8)


def uses_adapter(setting: Setting) -> bool:
    """Whether the study decodes ``setting`` with the DPO adapter merged into the model."""
    return setting.label in WITH_ADAPTER


def _eval_dir(out: Path, bench: str, label: str) -> Path:
    return out / "evals" / f"{bench}_{label}"


def eval_arguments(cfg: StudyConfig, out: Path, bench: str, setting: Setting,
                   progress: bool = True) -> harness.EvalArguments:
    """The harness arguments of one (benchmark, setting) cell of the study."""
    common = dict(benchmark=bench, output_dir=str(_eval_dir(out, bench, setting.label)), method=setting.method,
                  knobs=setting.knob_args(), adapter=cfg.adapter_path if uses_adapter(setting) else None,
                  limit=cfg.images, batch_size=cfg.generation_batch,
                  progress=progress, model=cfg.model, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation)
    if bench == "organism_caption":
        return harness.EvalArguments(**common, splits=["adversarial"])
    if bench == "organism_pope":
        return harness.EvalArguments(**common, splits=["adversarial"], negatives=["adversarial"])
    if bench == "coco_chair":
        return harness.EvalArguments(**common, coco_images=cfg.coco_images, coco_instances=cfg.coco_instances,
                                      coco_captions=cfg.coco_captions)
    return harness.EvalArguments(**common, pope_files=list(cfg.pope_files), pope_images=cfg.pope_images)


def run_evaluations(out: Path, cfg: StudyConfig, progress: bool = True, say: Callable = print) -> dict:
    """Every setting on both benchmarks through :func:`dleaf.harness.run_evaluation` (resumable; sharded under
    ``accelerate launch``). The base model is loaded once; a setting with the adapter loads it merged. A finished
    setting is skipped when its folder holds the same run with the same inputs (by content); other inputs there are
    an :class:`~dleaf.io.InputError`, as in a resumed run."""
    base = None
    metrics = {}
    learned = [s for s in cfg.settings if s.label == LEARNED]
    if learned and not all((Path(eval_arguments(cfg, out, b, learned[0]).output_dir) / harness.METRICS).is_file()
                           for b in cfg.benchmarks):
        # a detector fitted on another model is refused before the first setting generates anything
        from .detect import checked_detector

        base = harness.load_model(eval_arguments(cfg, out, cfg.benchmarks[0], learned[0], progress))
        checked_detector(cfg.detector_path, base[0])
    for setting in cfg.settings:
        label, adapter = setting.label, uses_adapter(setting)
        for bench in cfg.benchmarks:
            args = eval_arguments(cfg, out, bench, setting, progress)
            run_dir = Path(args.output_dir)
            if (run_dir / harness.METRICS).is_file():  # finished, if it is this run with these inputs
                check_config(run_dir, harness.check_inputs(args)[1], write=False)
                metrics[(bench, label)] = json.loads((run_dir / harness.METRICS).read_text())
                continue
            say(f"[study] {bench}: {label}")
            model = processor = None
            if not adapter:
                if base is None:
                    base = harness.load_model(dataclasses.replace(args, adapter=None))
                model, processor = base
            res = harness.run_evaluation(args, model, processor)
            if res is not None:
                metrics[(bench, label)] = res
    return metrics


def _timing_batch(cfg: StudyConfig, processor):
    """``timing_batch`` caption prompts of the study's caption benchmark, as processor outputs."""
    from .models import model_inputs

    args = eval_arguments(cfg, Path("."), cfg.benchmarks[0], Setting(label="timing"), progress=False)
    items = harness.build_benchmark(dataclasses.replace(args, limit=None)).items[:cfg.timing_batch]
    return model_inputs(processor, [it.prompt for it in items], [it.image() for it in items])


def _throughput_ratio(greedy, dleaf, axis=-1):
    """Greedy's median step time over D-LEAF's: D-LEAF's decoding speed as a share of greedy's."""
    import numpy as np

    return np.median(greedy, axis=axis) / np.median(dleaf, axis=axis)


def measure_overhead(cfg: StudyConfig, model=None, processor=None, say: Callable[[str], None] | None = None) -> dict:
    """D-LEAF's decoding speed as a share of plain decoding's, measured step by step in pairs: a D-LEAF decoding and
    a plain decoding of the same prompts take turns one cached step at a time (``dleaf.bench.bench_paired``), so a
    machine's load hits both alike. Reports the ratio of median step times with a 95% bootstrap interval over the
    paired steps, and the median extra milliseconds per step; ``say(msg)`` receives a few lines on what it does.
    ``docs/performance.md`` has the full benchmark."""
    import numpy as np
    import torch
    from scipy import stats

    from .bench import BenchConfig, bench_paired

    say = say or (lambda msg: None)
    t0 = time.time()
    if model is None:
        say(f"loading {cfg.model}")
        args = eval_arguments(cfg, Path("."), cfg.benchmarks[0], Setting(label="timing"), progress=False)
        model, processor = harness.load_model(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in _timing_batch(cfg, processor).items()}
    if batch["pixel_values"].is_floating_point():
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    n = len(batch["input_ids"])
    base = "plain_eager" if model.config._attn_implementation == "eager" else "plain_sdpa"
    bench_cfg = BenchConfig(configs=("plain_eager", "plain_sdpa", "dleaf"), paired_steps=cfg.timing_steps,
                            paired_warmup=cfg.timing_warmup, device=device)
    attn = {name: getattr(model.config, name)._attn_implementation for name in ("text_config", "vision_config")
            if getattr(model.config, name, None) is not None}
    say(f"{cfg.timing_warmup} + {cfg.timing_steps} paired steps of D-LEAF and plain decoding, batch {n}, {device}")
    try:
        row = bench_paired(model, {n: batch}, bench_cfg, log=lambda m: None)[str(n)]["dleaf"]
    finally:  # the benchmark switches the decoder's attention; the caller's model is given back as it came
        model.set_attn_implementation(attn)
    greedy, dleaf = np.array(row["raw_s"][base]), np.array(row["raw_s"]["dleaf"])
    ratio = float(_throughput_ratio(greedy, dleaf))
    say(f"D-LEAF at {ratio:.2f} of plain decoding's speed per step ({time.time() - t0:.0f} s)")
    ci = stats.bootstrap((greedy, dleaf), _throughput_ratio, paired=True, vectorized=True, n_resamples=2000,
                         method="percentile", random_state=cfg.seed).confidence_interval
    return {"dleaf_over_greedy_throughput": ratio, "interval": [float(ci.low), float(ci.high)],
            "median_extra_ms_per_step": 1000 * float(np.median(dleaf - greedy)),
            "greedy_step_ms": 1000 * float(np.median(greedy)), "dleaf_step_ms": 1000 * float(np.median(dleaf)),
            "steps": cfg.timing_steps, "warmup": cfg.timing_warmup, "batch": n, "device": device, "baseline": base,
            "attn_implementation": model.config._attn_implementation, "method": "paired per-step (bench_paired)"}


def _sections(metrics: dict, bench: str, label: str) -> list[dict]:
    res = metrics.get((bench, label))
    return list(res["sections"].values()) if res else []


def _mean(sections: list[dict], key: str) -> float:
    vals = [s[key] for s in sections if s.get(key) is not None]
    return sum(vals) / len(vals) if vals else math.nan


def claims_table(metrics: dict, overhead: dict | None, link: dict | None,
                 benchmarks: tuple[str, str] = ORGANISM_BENCHMARKS, target: str = "the organism",
                 label: str = "dleaf") -> tuple[list[dict], str]:
    """The paper's claims point by point, with what was measured here and whether it agrees. With several
    sections (POPE files: random, popular, adversarial), the POPE claim is judged on their mean. ``label``: the
    setting that stands for D-LEAF (``dleaf``, the paper's reading; ``dleaf_learned``, its fusion at a learned
    localization)."""
    rows = []
    caption, yesno = benchmarks
    g, d = _sections(metrics, caption, "greedy"), _sections(metrics, caption, label)
    if g and d:
        gs, ds = _mean(g, "chair_s"), _mean(d, "chair_s")
        rel = (gs - ds) / gs if gs else math.nan
        rows.append({"claim": CLAIMS["chair"],
                     "measured": f"CHAIR_s {100 * gs:.1f}% -> {100 * ds:.1f}% "
                                 f"({100 * rel:+.1f}% relative; recall {100 * _mean(g, 'recall'):.1f}% -> "
                                 f"{100 * _mean(d, 'recall'):.1f}%)",
                     "agrees": bool(rel >= 0.25)})
    gp, dp = _sections(metrics, yesno, "greedy"), _sections(metrics, yesno, label)
    if gp and dp:
        da, df = _mean(dp, "accuracy") - _mean(gp, "accuracy"), _mean(dp, "f1") - _mean(gp, "f1")
        where = f" (mean of {len(gp)} question sets)" if len(gp) > 1 else ""
        rows.append({"claim": CLAIMS["pope"],
                     "measured": f"accuracy {100 * da:+.1f} points, F1 {100 * df:+.1f} points{where}",
                     "agrees": bool(da >= 0.02 and df >= 0.02)})
    if overhead:
        r = overhead["dleaf_over_greedy_throughput"]
        lo, hi = overhead.get("interval", (r, r))
        rows.append({"claim": CLAIMS["overhead"],
                     "measured": f"D-LEAF decodes at {r:.2f} [{lo:.2f}, {hi:.2f}] of greedy's speed per step, "
                                 f"measured in pairs of steps (batch {overhead['batch']}, "
                                 f"{overhead.get('device', 'cpu')})",
                     "agrees": bool(r >= 0.9)})
    if link:
        rows.append({"claim": CLAIMS["link"], "measured": link["summary"], "agrees": link.get("agrees")})
    lines = [f"| paper's claim | measured on {target} | agrees |", "|---|---|---|"]
    for r in rows:
        mark = "yes" if r["agrees"] else ("-" if r["agrees"] is None else "**no**")
        lines.append(f"| {r['claim']} | {r['measured']} | {mark} |")
    return rows, "\n".join(lines) + "\n"


def plot_methods(metrics: dict, path: Path, settings=SETTINGS, benchmarks: tuple[str, str] = ORGANISM_BENCHMARKS,
                 titles: tuple[str, str] = ("captions, adversarial split", "yes/no questions, adversarial negatives")
                 ) -> Path:
    """CHAIR_s, CHAIR_i and recall (captions) and POPE accuracy, F1 and yes-ratio per setting, as grouped bars
    (means over a benchmark's sections)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [s.label for s in settings]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, bench, keys, title in ((axes[0], benchmarks[0], ("chair_s", "chair_i", "recall"), titles[0]),
                                   (axes[1], benchmarks[1], ("accuracy", "f1", "yes_ratio"), titles[1])):
        x = np.arange(len(labels))
        width = 0.8 / len(keys)
        for i, key in enumerate(keys):
            vals = [100 * _mean(_sections(metrics, bench, lab), key) for lab in labels]
            ax.bar(x + (i - (len(keys) - 1) / 2) * width, vals, width, label=key)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=20)
        ax.set_ylabel("%")
        ax.set_ylim(0, 100)
        ax.set_title(title)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def run_study(out_dir: str | Path, cfg: StudyConfig = StudyConfig(), progress: bool = True, say: Callable = print,
              correspondence: Callable[[Path, StudyConfig], dict | None] | None = None) -> dict | None:
    """Run (or resume) the whole study into ``out_dir``; returns the report dict (None on processes other than 0
    under ``accelerate launch``) and writes report.{md,json} and methods.png. ``correspondence(out_dir /
    "correspondence", cfg, say=...)`` runs the correspondence suite (saying its phases) and returns a dict with a
    one-line ``summary`` and ``agrees`` (or None when it is not available). ``say`` receives the progress lines of
    every phase."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    metrics = run_evaluations(out, cfg, progress, say)
    if not harness.process_state().is_main_process:
        return None
    overhead_path = out / "overhead.json"
    if overhead_path.is_file():
        overhead = json.loads(overhead_path.read_text())
    else:
        say("[study] decoding overhead")
        overhead = measure_overhead(cfg, say=lambda m: say(f"[study] decoding overhead: {m}"))
        write_json_atomic(overhead, overhead_path)
    link, link_note = None, None
    if not cfg.correspondence:
        link_note = "not run (turned off)"
    elif not cfg.adapter_path:
        link_note = "not run: no DPO adapter was given (train one with scripts/train_dpo.py and pass --adapter)"
    elif correspondence is None:
        link_note = "not run: the correspondence suite (dpo_link) is not available"
    else:
        say("[study] correspondence suite")
        link = correspondence(out / "correspondence", cfg, say=lambda m: say(f"[study] correspondence: {m}"))
    target = "the organism" if cfg.shipped_organism else cfg.model
    claims, claims_md = claims_table(metrics, overhead, link, cfg.benchmarks, target)
    learned_claims, learned_md = claims_table(metrics, None, None, cfg.benchmarks, target, label=LEARNED)
    table = harness.comparison_table([_eval_dir(out, b, s.label) for b in cfg.benchmarks for s in cfg.settings])
    if cfg.organism:
        titles = ("captions, adversarial split", "yes/no questions, adversarial negatives")
        which = ("the committed organism and DPO adapter" if cfg.shipped_organism else
                 f"{cfg.model}, a model of the organism's world, and "
                 + (f"DPO adapter {cfg.adapter}" if cfg.adapter else "no DPO adapter, so no DPO rows"))
        intro = (f"{cfg.images} adversarial images per benchmark (captions; yes/no questions with adversarial "
                 f"negatives), greedy decoding, {which}. The organism misses parts of "
                 "its design (docs/organism.md): read these numbers as measurements of this model.")
    else:
        titles = ("CHAIR, COCO val2014", "POPE (mean over question files)")
        intro = (f"{cfg.model} on CHAIR (COCO val2014, {cfg.images or 'every'} image(s) of the protocol's list) and "
                 f"POPE ({', '.join(Path(f).stem for f in cfg.pope_files)}; "
                 f"{cfg.images or 'every'} question(s) per file), greedy decoding"
                 + (f", DPO adapter {cfg.adapter}." if cfg.adapter else "; no DPO adapter, so no DPO rows."))
    plot_methods(metrics, out / "methods.png", cfg.settings, cfg.benchmarks, titles)
    md = [f"# The study on {target}", "", intro, "",
          "## The paper's claims, point by point", "", claims_md]
    if learned_claims:
        md += ["## The same claims for D-LEAF's fusion at a learned localization", "",
               "`dleaf_learned`: the paper's fusion (gamma 1, heads below the layer's mean IAF) at the rows a fitted "
               "token-level hallucination detector flags, in place of the LIAE threshold (docs/localization.md). "
               "Not the paper's method: a measurement of what its correction does where a localizer finds the "
               "hallucinations.", "", learned_md]
    md += ["## Every setting", "", table, "",
          "![methods](methods.png)", ""]
    if link and link.get("markdown"):
        md += ["## D-LEAF and DPO", "", link["markdown"], ""]
    elif link_note:
        md += ["## D-LEAF and DPO", "", f"The correspondence suite was {link_note}.", ""]
    report = {"config": dataclasses.asdict(cfg), "claims": claims, "claims_dleaf_learned": learned_claims,
              "overhead": overhead, "correspondence": link,
              "metrics": {f"{b}/{s}": m for (b, s), m in metrics.items()}, "seconds": time.time() - t0}
    write_json_atomic(report, out / "report.json")
    write_text_atomic("\n".join(md) + "\n", out / "report.md")
    return report
