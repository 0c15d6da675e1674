"""DPO with LoRA adapters on a vision-language model, through TRL's ``DPOTrainer`` and PEFT.

:func:`run` is what ``scripts/train_dpo.py`` calls with the three configs ``TrlParser`` reads (a
:class:`ScriptArguments`, TRL's ``DPOConfig`` and ``ModelConfig``): it builds or loads the preference data, checks
it (:mod:`dpo_link.validate`) before any step, wraps the model's language-model projections in LoRA, measures the
held-out DPO loss and rewards before and after training, saves the adapter with the processor, a model card
(``README.md``) and ``dpo_run.json``, and resumes from a checkpoint when asked.

Logged metrics are TRL's (``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/*``, ``logits/*``, ``entropy``); rewards are ``beta * (log pi_theta - log pi_ref)``
summed over completion tokens, the reference being the model with its adapter disabled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from trl import ModelConfig

from .card import ORGANISM, REWARD_KEYS, model_card
from .card import portable as _portable
from .collate import VisionPreferenceCollator, pair_batches
from .data import check_dataset_path, load_preference_dataset, parse_column_map, preference_dataset
from .rewards import adapter_rewards, checkpoint_fingerprint, dpo_loss
from .validate import validate_preference_dataset

logger = logging.getLogger(__name__)

LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class ScriptArguments:
    """Data and evaluation options of ``scripts/train_dpo.py`` (DPO options live in ``DPOConfig``, model and LoRA
    options in ``ModelConfig``)."""

    dataset: str = dataclasses.field(
        default=ORGANISM,
        metadata={"help": "'organism' (ground-truth pairs built from the synthetic world) or a path to a TRL-format "
                          "vision preference dataset on disk (save_to_disk folder, parquet or JSON lines)"})
    dataset_split: str = dataclasses.field(default="train", metadata={"help": "split of a DatasetDict on disk"})
    eval_dataset: str | None = dataclasses.field(
        default=ORGANISM,
        metadata={"help": "'organism' (held-out ground-truth pairs from scenes no training pair or evaluation "
                          "split uses), a path, 'split' (hold out eval_fraction of the training data) or 'none'"})
    eval_split: str = dataclasses.field(default="test", metadata={"help": "split of an eval DatasetDict on disk"})
    eval_fraction: float = dataclasses.field(default=0.02, metadata={"help": "held-out share with eval_dataset=split"})
    column_map: list[str] | None = dataclasses.field(
        default=None, metadata={"help": "rename columns first, old=new entries (RLAIF-V: question=prompt image=images)"})
    dataset_limit: int | None = dataclasses.field(default=None, metadata={"help": "use only the first N rows"})
    n_train_pairs: int = dataclasses.field(default=2000, metadata={"help": "organism: training pairs"})
    n_eval_pairs: int = dataclasses.field(default=200, metadata={"help": "organism: held-out pairs"})
    adversarial_fraction: float = dataclasses.field(default=0.5, metadata={"help": "organism: share of scenes drawn "
                                                                                    "like the adversarial split"})
    question_fraction: float = dataclasses.field(default=0.3, metadata={"help": "organism: share of yes/no pairs"})
    max_injected: int = dataclasses.field(default=2, metadata={"help": "organism: most absent objects injected into "
                                                                        "a rejected caption"})
    self_generated_scenes: int = dataclasses.field(
        default=0, metadata={"help": "organism: also caption this many scenes with greedy and D-LEAF decoding and add "
                                     "the pairs their exact hallucination counts rank"})
    dleaf_knobs: list[str] | None = dataclasses.field(
        default=None, metadata={"help": "D-LEAF knobs of the self-generated pairs, name=value entries (gamma=0.8)"})
    lora_language_model_only: bool = dataclasses.field(
        default=True, metadata={"help": "restrict lora_target_modules to the language model (the vision tower has "
                                        "q_proj/k_proj/v_proj too)"})
    threads: int | None = dataclasses.field(
        default=None, metadata={"help": "CPU threads torch may use (default: torch's own choice)"})
    save_adapter_only: bool = dataclasses.field(
        default=True, metadata={"help": "save the adapter (not merged weights) in output_dir"})


@dataclasses.dataclass
class ModelArguments(ModelConfig):
    """TRL's ``ModelConfig`` with ``--model`` accepted for ``--model_name_or_path`` (the project's convention)."""

    model_name_or_path: str | None = dataclasses.field(
        default=None, metadata={"help": "'organism' (the default: the committed organism), a checkpoint folder or a "
                                        "hub id", "aliases": ["--model"]})


def parser():
    """The ``TrlParser`` of ``scripts/train_dpo.py``: :class:`ScriptArguments`, TRL's ``DPOConfig`` and
    :class:`ModelArguments`, from the command line and a YAML recipe (``--config``)."""
    from trl import DPOConfig, TrlParser

    return TrlParser((ScriptArguments, DPOConfig, ModelArguments))


# ------------------------------------------------------------------------------------------------- model & data
def load_model(model_args, training_args):
    """(model, processor) from ``model_args.model_name_or_path`` through the project's one loader
    (:func:`dleaf.models.load`): None or 'organism' is the committed organism, else a checkpoint folder or hub id."""
    from dleaf import models
    from dleaf.io import InputError
    from dleaf.resources import data_path

    if model_args.model_revision not in (None, "main") or training_args.trust_remote_code:
        raise InputError("model_revision and trust_remote_code are not supported: save the checkpoint to a "
                                "folder and pass that folder as model_name_or_path")
    name = model_args.model_name_or_path or ORGANISM
    dtype = model_args.dtype if model_args.dtype not in (None, "auto") else ("float32" if name == ORGANISM else "auto")
    device = "cpu" if training_args.use_cpu or not torch.cuda.is_available() else None
    model, processor = models.load(name, attn_implementation=model_args.attn_implementation or "eager", dtype=dtype,
                                   device=device)
    # recorded in adapter_config.json as the base model: the committed organism by its repository path, another
    # folder relative to the working directory (never this machine's absolute path), a hub id as it is
    recorded = None
    if name == ORGANISM or (Path(name).is_dir() and Path(name).resolve() == data_path(ORGANISM).resolve()):
        recorded = "data/organism"
    elif Path(name).is_dir():
        recorded = _portable(name)
    if recorded is not None:
        model.config._name_or_path = recorded
        model.name_or_path = recorded
    tok = getattr(processor, "tokenizer", processor)
    if tok.padding_side != "left":
        # TRL pads prompts on the left itself; this only matters for generation with the saved processor
        logger.warning("the tokenizer pads on the %s; generation with the saved processor should pad left",
                       tok.padding_side)
    return model, processor


def organism_pair_config(args: ScriptArguments, split: str):
    """The :class:`dpo_link.pairs.OrganismPairConfig` of the training (``split="train"``) or held-out pairs."""
    from . import pairs

    held_out = split != "train"
    return pairs.OrganismPairConfig(
        n=args.n_eval_pairs if held_out else args.n_train_pairs,
        adversarial_fraction=args.adversarial_fraction, question_fraction=args.question_fraction,
        max_injected=args.max_injected, world_seed=pairs.EVAL_WORLD_SEED if held_out else pairs.TRAIN_WORLD_SEED)


def self_generated_settings(args: ScriptArguments) -> tuple:
    """The decoding settings whose replies self-generated pairs rank: plain greedy and D-LEAF with
    ``args.dleaf_knobs``."""
    from dleaf.cli import parse_knobs
    from dleaf.settings import Setting

    return Setting(label="greedy"), Setting("dleaf", parse_knobs(args.dleaf_knobs), label="dleaf")


def build_datasets(args: ScriptArguments, model=None, processor=None, seed: int = 0):
    """(train dataset, eval dataset or None, a description of the data for the model card)."""
    from datasets import concatenate_datasets

    info: dict[str, Any] = {}
    if args.dataset == ORGANISM:
        from . import pairs

        cfg = organism_pair_config(args, "train")
        train = pairs.organism_pairs(cfg)
        info["train"] = {"source": "organism ground truth", "config": dataclasses.asdict(cfg), "rows": len(train)}
        if args.self_generated_scenes > 0:
            if model is None:
                raise ValueError("self-generated pairs need the model")
            settings = self_generated_settings(args)
            scenes = pairs.adversarial_scenes(args.self_generated_scenes, start=cfg.start + cfg.n)
            rows = pairs.self_generated_pairs(model, processor, scenes, settings)
            info["self_generated"] = {"scenes": len(scenes), "pairs": len(rows), "settings": [
                {"label": st.label, **st.record()} for st in settings]}
            if rows:
                # keep only the columns both sources share, so the two concatenate
                extra = preference_dataset(rows)
                common = [c for c in train.column_names if c in extra.column_names]
                train = concatenate_datasets([train.select_columns(common), extra.select_columns(common)])
                train = train.shuffle(seed=seed)
    else:
        train = load_preference_dataset(args.dataset, args.dataset_split, args.column_map, limit=args.dataset_limit,
                                        split_flag="--dataset_split")
        info["train"] = {"source": "disk", "path": _portable(args.dataset), "split": args.dataset_split,
                         "column_map": parse_column_map(args.column_map), "rows": len(train)}
    eval_ds = None
    spec = (args.eval_dataset or "none").lower()
    if args.eval_dataset == ORGANISM:
        from . import pairs

        cfg = organism_pair_config(args, "eval")
        eval_ds = pairs.organism_pairs(cfg)
        info["eval"] = {"source": "organism ground truth (held-out scenes)", "config": dataclasses.asdict(cfg),
                        "rows": len(eval_ds)}
    elif spec == "split":
        parts = train.train_test_split(test_size=args.eval_fraction, seed=seed)
        train, eval_ds = parts["train"], parts["test"]
        info["eval"] = {"source": f"{args.eval_fraction:.0%} of the training data", "rows": len(eval_ds)}
        info["train"]["rows"] = len(train)
    elif spec != "none":
        eval_ds = load_preference_dataset(args.eval_dataset, args.eval_split, args.column_map,
                                          split_flag="--eval_split")
        info["eval"] = {"source": "disk", "path": _portable(args.eval_dataset), "split": args.eval_split,
                        "rows": len(eval_ds)}
    return train, eval_ds, info


def lora_config(model_args, language_model_only: bool = True):
    """A PEFT ``LoraConfig`` from TRL's ``ModelConfig``; by default on the language model's attention and MLP
    projections only (a regex, since the vision tower has modules with the same names)."""
    from peft import LoraConfig

    targets = model_args.lora_target_modules
    if targets is None:
        targets = list(LM_PROJECTIONS)
    if isinstance(targets, str):
        targets = [targets]
    if language_model_only and targets not in (["all-linear"],):
        if len(targets) == 1 and any(ch in targets[0] for ch in ".*()|\\^$"):
            target_modules: Any = targets[0]  # already a regex: the user's own choice
        else:
            target_modules = r".*language_model.*\.(" + "|".join(targets) + r")$"
    else:
        target_modules = targets if len(targets) > 1 or targets != ["all-linear"] else "all-linear"
    return LoraConfig(
        r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        target_modules=target_modules, bias="none", use_rslora=model_args.use_rslora, use_dora=model_args.use_dora,
        modules_to_save=model_args.lora_modules_to_save, task_type=model_args.lora_task_type)


def _check_device_options(training_args) -> None:
    from dleaf.io import InputError

    on_gpu = torch.cuda.is_available() and not training_args.use_cpu
    if not on_gpu and (training_args.bf16 or training_args.fp16):
        raise InputError(
            "training on the CPU with bf16/fp16 mixed precision: pass --bf16 false (and --use_cpu true) or set "
            "'bf16: false' and 'use_cpu: true' in the recipe, as scripts/recipes/dpo_organism.yaml does")


def resume_checkpoint(value, output_dir: str) -> str | None:
    """``resume_from_checkpoint`` as a path: 'true'/'last' means the newest checkpoint in ``output_dir``."""
    from transformers.trainer_utils import get_last_checkpoint

    from dleaf.io import InputError

    if value in (None, False, "", "false", "False"):
        return None
    if value in (True, "true", "True", "last"):
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise InputError(f"resume_from_checkpoint={value!r} but {output_dir} has no checkpoint-* folder")
        return last
    if not os.path.isdir(value):
        raise InputError(f"resume_from_checkpoint={value!r} is not a checkpoint folder")
    return value


# ------------------------------------------------------------------------------------------------ output folder
RECIPE_FILE = "dpo_recipe.json"
#: options that may change between an interrupted run and the command that resumes it
MAY_CHANGE_ON_RESUME = ("max_steps", "num_train_epochs", "resume_from_checkpoint", "threads", "output_dir")


def recipe_record(script_args, training_args, model_args) -> dict:
    """What fixes a training run, as written to ``output_dir/dpo_recipe.json`` when it starts: the script's
    options, the DPO recipe (:data:`RECIPE_KEYS`) and the model and LoRA options."""
    return {"script": dataclasses.asdict(script_args), "dpo": _recipe(training_args),
            "model": {k: (list(v) if isinstance(v, (set, tuple)) else v)
                      for k, v in dataclasses.asdict(model_args).items()}}


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    for part in ("script", "dpo", "model"):
        a, b = old.get(part, {}), new.get(part, {})
        for k in sorted(set(a) | set(b)):
            if k not in MAY_CHANGE_ON_RESUME and a.get(k) != b.get(k):
                out.append(f"{k}: {a.get(k)!r} there, {b.get(k)!r} now")
    return out


#: what a run leaves once it has results: checkpoints, then the adapter, its card and its record
RESULT_FILES = ("dpo_run.json", "README.md", "adapter_config.json", "adapter_model.safetensors")


def stopped_before_first_checkpoint(output_dir: str | Path) -> bool:
    """Whether ``output_dir`` holds the recipe record of a run that stopped before its first result (no checkpoint,
    no adapter, no run record): such a folder blocks nothing, whatever recipe it recorded."""
    out = Path(output_dir)
    return ((out / RECIPE_FILE).is_file() and not any(out.glob("checkpoint-*"))
            and not any((out / name).exists() for name in RESULT_FILES))


def check_output_dir(output_dir: str | Path, recipe: dict, resume_from_checkpoint=None) -> str | None:
    """Decide what an output folder allows, before any model is loaded; returns the checkpoint to resume from.

    An empty or new folder starts a run, and so does a folder left by a run that stopped before its first
    checkpoint (:func:`stopped_before_first_checkpoint`: only its recipe record, whatever the recipe). A folder
    holding an interrupted run of the same recipe (``dpo_recipe.json`` equal up to :data:`MAY_CHANGE_ON_RESUME`)
    resumes from its last checkpoint. Anything else is refused with a :class:`dleaf.io.InputError`: a folder with
    other files (a committed adapter, for example), a run of another recipe, a run already trained to
    ``max_steps``.
    """
    from transformers.trainer_utils import get_last_checkpoint

    from dleaf.io import InputError, read_json

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output_dir {out} is a file")
    if not out.exists() or not any(out.iterdir()):
        return resume_checkpoint(resume_from_checkpoint, str(out))
    if not (out / RECIPE_FILE).is_file():
        what = "a trained adapter" if (out / "adapter_config.json").is_file() else "files of something else"
        raise InputError(f"--output_dir {out} is not empty and holds {what}, not a DPO run to resume (no "
                         f"{RECIPE_FILE}); choose a new folder (for example under runs/)")
    if stopped_before_first_checkpoint(out):  # nothing there to resume or to keep: start afresh
        return resume_checkpoint(resume_from_checkpoint, str(out))
    differences = _differences(read_json(out / RECIPE_FILE, "DPO recipe record"), recipe)
    if differences:
        raise InputError(f"--output_dir {out} holds a DPO run of another recipe ({'; '.join(differences[:4])}"
                         f"{'; ...' if len(differences) > 4 else ''}); choose a new folder, or run the same recipe to "
                         "resume it")
    if resume_from_checkpoint not in (None, False, "", "false", "False"):
        return resume_checkpoint(resume_from_checkpoint, str(out))
    last = get_last_checkpoint(str(out))
    if last is None and (out / "dpo_run.json").is_file():
        raise InputError(f"--output_dir {out} already holds this run, finished (dpo_run.json) and without a checkpoint "
                         "to continue from; choose a new folder")
    if last is not None:
        steps = int(Path(last).name.split("-")[-1])
        if (out / "dpo_run.json").is_file() and 0 < recipe["dpo"].get("max_steps", -1) <= steps:
            raise InputError(f"--output_dir {out} already holds this run, trained to step {steps}; raise --max_steps "
                             "to train further, or choose a new folder")
    return last


# ---------------------------------------------------------------------------------------------------- training


def _eval_summary(metrics: dict) -> dict:
    return {k: metrics.get(f"eval_{k}") for k in REWARD_KEYS}


def _trainer_class():
    from trl import DPOTrainer

    class Trainer(DPOTrainer):
        """TRL's ``DPOTrainer`` without its generic model card: TRL writes one ("a fine-tuned version of ...") into
        the output folder with every checkpoint, so an interrupted run would leave it behind; the adapter's own card
        (:func:`model_card`) is written when training ends."""

        def create_model_card(self, *args, **kwargs):
            return None

    return Trainer


def build_trainer(model, processor, train_ds, eval_ds, training_args, model_args, script_args, callbacks=None):
    collator = VisionPreferenceCollator(processor=processor, max_length=training_args.max_length)
    peft_config = lora_config(model_args, script_args.lora_language_model_only) if model_args.use_peft else None
    return _trainer_class()(model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                      processing_class=processor, data_collator=collator, peft_config=peft_config,
                      callbacks=callbacks)


def check_training_options(script_args: ScriptArguments, training_args, model_args) -> None:
    """The numbers of a run that have to make sense before anything loads (TRL and torch would otherwise fail after
    the model loaded, or train nothing): a positive learning rate and beta, batch sizes and accumulation steps of at
    least 1, steps or epochs to train, non-negative warm-up and weight decay, positive save and logging intervals,
    the LoRA rank, alpha and dropout, and the script's pair counts and fractions. Raises
    :class:`dleaf.io.InputError` naming the flag (a recipe key of the same name sets it too)."""
    from dleaf.io import InputError

    problems: list[str] = []

    def need(ok: bool, flag: str, rule: str, value) -> None:
        if not ok:
            problems.append(f"--{flag} must be {rule}, got {value!r}")

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    ta, sa, ma = training_args, script_args, model_args
    need(number(ta.learning_rate) and ta.learning_rate > 0, "learning_rate", "> 0", ta.learning_rate)
    need(number(ta.beta) and ta.beta > 0, "beta", "> 0 (the DPO temperature)", ta.beta)
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        need(isinstance(getattr(ta, flag), int) and getattr(ta, flag) >= 1, flag, ">= 1", getattr(ta, flag))
    need(ta.max_steps == -1 or ta.max_steps >= 1, "max_steps", ">= 1 (or -1: train --num_train_epochs epochs)",
         ta.max_steps)
    if ta.max_steps == -1:
        need(number(ta.num_train_epochs) and ta.num_train_epochs > 0, "num_train_epochs",
             "> 0 when --max_steps is -1", ta.num_train_epochs)
    need(number(ta.warmup_steps) and ta.warmup_steps >= 0, "warmup_steps", ">= 0", ta.warmup_steps)
    need(number(ta.weight_decay) and ta.weight_decay >= 0, "weight_decay", ">= 0", ta.weight_decay)
    for flag, strategy in (("save_steps", "save_strategy"), ("logging_steps", "logging_strategy"),
                           ("eval_steps", "eval_strategy")):
        value = getattr(ta, flag, None)
        if getattr(getattr(ta, strategy, None), "value", getattr(ta, strategy, None)) == "steps" and value is not None:
            need(number(value) and value > 0, flag, f"> 0 with {strategy} steps", value)
    need(ta.max_length is None or (isinstance(ta.max_length, int) and ta.max_length >= 1), "max_length",
         ">= 1 (or null: no limit)", ta.max_length)
    if getattr(ta, "loss_weights", None) is not None and ta.loss_type is not None:
        need(len(ta.loss_weights) == len(ta.loss_type), "loss_weights", f"one weight per --loss_type entry "
             f"({len(ta.loss_type)})", ta.loss_weights)
    if ma.use_peft:
        need(isinstance(ma.lora_r, int) and ma.lora_r >= 1, "lora_r", ">= 1", ma.lora_r)
        need(number(ma.lora_alpha) and ma.lora_alpha > 0, "lora_alpha", "> 0", ma.lora_alpha)
        need(number(ma.lora_dropout) and 0 <= ma.lora_dropout < 1, "lora_dropout", "in [0, 1)", ma.lora_dropout)
    if sa.dataset == ORGANISM:
        need(sa.n_train_pairs >= 1, "n_train_pairs", ">= 1", sa.n_train_pairs)
        for flag in ("adversarial_fraction", "question_fraction"):
            need(number(getattr(sa, flag)) and 0 <= getattr(sa, flag) <= 1, flag, "in [0, 1]", getattr(sa, flag))
        need(sa.max_injected >= 1, "max_injected", ">= 1 (a rejected caption needs a hallucination)",
             sa.max_injected)
    if sa.eval_dataset == ORGANISM:
        need(sa.n_eval_pairs >= 1, "n_eval_pairs", ">= 1 (or --eval_dataset none)", sa.n_eval_pairs)
    if (sa.eval_dataset or "").lower() == "split":
        need(number(sa.eval_fraction) and 0 < sa.eval_fraction < 1, "eval_fraction", "in (0, 1) with --eval_dataset "
             "split", sa.eval_fraction)
    need(sa.self_generated_scenes >= 0, "self_generated_scenes", ">= 0", sa.self_generated_scenes)
    need(sa.dataset_limit is None or sa.dataset_limit >= 1, "dataset_limit", ">= 1 (or none: every row)",
         sa.dataset_limit)
    if problems:
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:3])})" if len(problems) > 1 else ""
        raise InputError(problems[0] + more)


def check_inputs(script_args: ScriptArguments, training_args, model_args, model_given: bool = False) -> str | None:
    """Every check that needs no model, run before one is loaded: the training options
    (:func:`check_training_options`), the device options, the data's paths, splits and column map, the D-LEAF knobs
    of self-generated pairs, the thread count, the model name, the output folder (:func:`check_output_dir`).
    Returns the checkpoint to resume from; raises :class:`dleaf.io.InputError`."""
    from dleaf import models
    from dleaf.io import InputError

    check_training_options(script_args, training_args, model_args)
    _check_device_options(training_args)
    try:
        if script_args.dataset != ORGANISM:
            check_dataset_path(script_args.dataset, script_args.dataset_split, "--dataset_split")
        if (script_args.eval_dataset or "none").lower() not in (ORGANISM, "split", "none"):
            check_dataset_path(script_args.eval_dataset, script_args.eval_split, "--eval_split")
        parse_column_map(script_args.column_map)
        if script_args.self_generated_scenes > 0:
            self_generated_settings(script_args)
    except (FileNotFoundError, ValueError) as e:
        raise e if isinstance(e, InputError) else InputError(str(e)) from None
    if script_args.threads is not None and script_args.threads <= 0:
        raise InputError(f"--threads must be a positive count, got {script_args.threads}")
    if not model_given:
        models.check_model(model_args.model_name_or_path or ORGANISM)
    return check_output_dir(training_args.output_dir, recipe_record(script_args, training_args, model_args),
                            training_args.resume_from_checkpoint)


def run(script_args: ScriptArguments, training_args, model_args, model=None, processor=None, progress=None) -> dict:
    """Train one adapter; returns the run record (also written to ``output_dir/dpo_run.json``). ``progress(msg)``
    receives one-line messages (resuming, saving)."""
    from dleaf import models
    from dleaf.io import write_json_atomic, write_text_atomic

    say = progress or (lambda msg: logger.info(msg))
    t0 = time.time()
    stale = stopped_before_first_checkpoint(training_args.output_dir)
    resume = check_inputs(script_args, training_args, model_args, model_given=model is not None)
    if stale and resume is None:
        say(f"{training_args.output_dir} holds the record of a run that stopped before its first checkpoint (no "
            "results); starting afresh")
    if resume:
        say(f"resuming from {Path(resume).name} of {training_args.output_dir}")
    if script_args.threads is not None:
        torch.set_num_threads(script_args.threads)
    # the base checkpoint's folder, whose weights the run record fingerprints
    source = models.resolve(model_args.model_name_or_path or ORGANISM)[0] if model is None else model.name_or_path
    if model is None:
        model, processor = load_model(model_args, training_args)
    train_ds, eval_ds, data_info = build_datasets(script_args, model, processor, seed=training_args.seed)

    # every check before the first step
    lengths = {"train": validate_preference_dataset(train_ds, processor, training_args.max_length, "train dataset")}
    if eval_ds is not None:
        lengths["eval"] = validate_preference_dataset(eval_ds, processor, training_args.max_length, "eval dataset")
    if not model_args.use_peft:
        logger.warning("use_peft is false: DPO will fine-tune every weight of the model")

    out = Path(training_args.output_dir)
    with warnings.catch_warnings():
        # transformers renamed gradient checkpointing to activation checkpointing; TRL and PEFT still call the old
        # names internally, which warns several times per run about something no recipe can change
        warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)
        trainer = build_trainer(model, processor, train_ds, eval_ds, training_args, model_args, script_args)
        record: dict[str, Any] = {"data": data_info, "lengths": {k: v.as_dict() for k, v in lengths.items()}}
        if eval_ds is not None and resume is None:
            record["eval_before"] = _eval_summary(trainer.evaluate())
        if trainer.is_world_process_zero():  # recorded when training starts: what its checkpoints will belong to
            write_json_atomic(recipe_record(script_args, training_args, model_args), out / RECIPE_FILE)
        train_output = trainer.train(resume_from_checkpoint=resume)
        record["train"] = {"global_step": train_output.global_step, "training_loss": train_output.training_loss,
                           "resumed_from": Path(resume).name if resume else None,
                           "runtime_s": train_output.metrics.get("train_runtime")}
        if eval_ds is not None:
            record["eval_after"] = _eval_summary(trainer.evaluate())
        record["log_history"] = [h for h in trainer.state.log_history if any(k.startswith("rewards/") or
                                                                             k.startswith("eval_") for k in h)]
        record["seconds"] = time.time() - t0
        trainer.save_model(training_args.output_dir)
        if trainer.is_world_process_zero():
            if eval_ds is not None and "task" in eval_ds.column_names and model_args.use_peft:
                record["eval_by_task"] = held_out_by_task(trainer.model, processor, eval_ds, training_args)
            record["config"] = {**recipe_record(script_args, training_args, model_args),
                                "lora_target_modules": _target_modules(trainer.model),
                                "processes": training_args.world_size}
            record["environment"] = _environment()
            record["base_model"] = {"name": str(model.name_or_path), "fingerprint": checkpoint_fingerprint(source)}
            record = json.loads(json.dumps(record, default=str))
            write_json_atomic(record, out / "dpo_run.json")
            write_text_atomic(model_card(record), out / "README.md")
    return record


def held_out_by_task(peft_model, processor, dataset, training_args) -> dict:
    """Held-out DPO loss, reward accuracy and margin per ``task`` value, recomputed from the adapter-on and
    adapter-off log-probabilities (:func:`dpo_link.rewards.adapter_rewards`), every pair weighted equally."""
    chosen, rejected = [], []
    rows = [dataset[i] for i in range(len(dataset))]
    for batch, _ in pair_batches(rows, processor, training_args.per_device_eval_batch_size, training_args.max_length):
        c, r = adapter_rewards(peft_model, batch, training_args.beta)
        chosen.append(c)
        rejected.append(r)
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    tasks = dataset["task"]
    out = {}
    for task in sorted(set(tasks)) + ["all"]:
        idx = torch.tensor([t == task or task == "all" for t in tasks])
        c, r = chosen[idx], rejected[idx]
        stats = dpo_loss(c, r)
        out[task] = {"n": stats["n"], "loss": stats["loss"], "rewards/chosen": stats["chosen"],
                     "rewards/rejected": stats["rejected"], "rewards/accuracies": stats["accuracy"],
                     "rewards/margins": stats["margin"]}
    return out


def _target_modules(model):
    cfg = getattr(model, "peft_config", {}).get("default")
    if cfg is None:
        return None
    t = cfg.target_modules
    return sorted(t) if isinstance(t, (set, list, tuple)) else t


RECIPE_KEYS = ("beta", "loss_type", "loss_weights", "learning_rate", "lr_scheduler_type", "warmup_steps", "num_train_epochs",
               "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "seed",
               "bf16", "use_cpu", "activation_checkpointing", "weight_decay", "optim")


def _recipe(training_args) -> dict:
    out = {}
    for k in RECIPE_KEYS:
        v = getattr(training_args, k, None)
        out[k] = v.value if hasattr(v, "value") else v
    return out


def _environment() -> dict:
    import peft
    import transformers
    import trl

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "peft": peft.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "command": " ".join(Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv))}
