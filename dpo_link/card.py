"""The DPO adapter's model card (``README.md`` beside the adapter, written by :func:`dpo_link.train.run`) and the
few names it shares with the training run."""

from __future__ import annotations

import math
from pathlib import Path

ORGANISM = "organism"
#: the held-out metrics a run and its card report, in TRL's names
REWARD_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def portable(path: str) -> str:
    """A path as recorded in a card: relative to the working directory when inside it, else its last parts."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(Path(*p.parts[-2:])) if p.is_absolute() else str(p)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def model_card(record: dict) -> str:
    """The adapter's model card (``README.md``): data, recipe, held-out metrics and how to load it."""
    cfg = record["config"]
    name = cfg["model"].get("model_name_or_path")
    base = portable(name) if name not in (None, ORGANISM) else "data/organism"
    lines = ["---", "library_name: peft", "tags: [dpo, trl, lora, vision-language, hallucination]",
             f"base_model: {base}", "---", "",
             "# DPO LoRA adapter against object hallucination", "",
             f"A LoRA adapter on the language model of {base}, trained with TRL's `DPOTrainer` "
             "(`dpo_link.train`, `scripts/train_dpo.py`) on vision preference pairs: the preferred reply describes "
             "the image faithfully, the dispreferred one names objects the image lacks (or gives the wrong yes/no "
             "answer).", "", "## Data", ""]
    for split, info in record["data"].items():
        lines.append(f"- **{split}**: " + ", ".join(f"{k}: `{v}`" for k, v in info.items() if k != "config"))
        if "config" in info:
            lines.append("  - " + ", ".join(f"{k}={v}" for k, v in info["config"].items()))
    lines += ["", "Sequence lengths (tokens, as the collator builds them): " + "; ".join(
        f"{k}: longest {v['max_total']}, prompt {v['max_prompt']}, {v['image_tokens_per_image']} image tokens"
        for k, v in record["lengths"].items()), "", "## Recipe", "", "| option | value |", "|---|---|"]
    for k, v in cfg["dpo"].items():
        lines.append(f"| {k} | {_fmt(v)} |")
    m = cfg["model"]
    for k in ("lora_r", "lora_alpha", "lora_dropout"):
        lines.append(f"| {k} | {_fmt(m.get(k))} |")
    lines.append(f"| LoRA target modules | `{cfg['lora_target_modules']}` |")
    lines.append(f"| processes | {cfg['processes']} |")
    t = record["train"]
    lines += ["", f"Trained {t['global_step']} steps (training loss {_fmt(t['training_loss'])})"
              + (f", resumed from {t['resumed_from']}" if t.get("resumed_from") else "") + ".", ""]
    if "eval_after" in record:
        lines += ["## Held-out DPO metrics", "",
                  "Rewards are beta * (log pi_adapter - log pi_base) summed over the reply's tokens; the loss of the "
                  f"untrained adapter is log 2 = {math.log(2):.4f}."
                  + (f" TRL's `loss` here is the weighted sum of the {' + '.join(cfg['dpo']['loss_type'])} terms; "
                     "the DPO (sigmoid) loss alone is the `loss` of the per-task table below."
                     if len(cfg["dpo"].get("loss_type") or []) > 1 else ""), "",
                  "| | " + " | ".join(REWARD_KEYS) + " |", "|---|" + "---|" * len(REWARD_KEYS)]
        for when in ("eval_before", "eval_after"):
            if when in record:
                lines.append(f"| {when.replace('eval_', '')} training | "
                             + " | ".join(_fmt(record[when][k]) for k in REWARD_KEYS) + " |")
        lines.append("")
    if "eval_by_task" in record:
        lines += ["Per task, recomputed from plain logits (`dpo_link.rewards`), every pair weighted equally (TRL "
                  "averages its logged reward metrics over evaluation batches, so its row above can differ slightly "
                  "when the last batch is smaller):", "",
                  "| task | pairs | " + " | ".join(REWARD_KEYS) + " |", "|---|---|" + "---|" * len(REWARD_KEYS)]
        for task, m in record["eval_by_task"].items():
            lines.append(f"| {task} | {m['n']} | " + " | ".join(_fmt(m[k]) for k in REWARD_KEYS) + " |")
        lines.append("")
    train_logs = [h for h in record.get("log_history", []) if "rewards/chosen" in h and "loss" in h]
    if train_logs:
        stride = max(1, math.ceil(len(train_logs) / 15))
        shown = train_logs[::stride] + ([train_logs[-1]] if (len(train_logs) - 1) % stride else [])
        lines += ["## Training log (TRL's logged metrics)", "",
                  "| step | " + " | ".join(REWARD_KEYS) + " |", "|---|" + "---|" * len(REWARD_KEYS)]
        for h in shown:
            lines.append(f"| {h.get('step', '-')} | " + " | ".join(_fmt(h.get(k)) for k in REWARD_KEYS) + " |")
        lines.append("")
    lines += ["## Use", "", "```python", "from peft import PeftModel",
              "from dleaf import models", "",
              f"model, processor = models.load({'organism' if base == 'data/organism' else base!r})",
              "model = PeftModel.from_pretrained(model, 'path/to/this/folder')", "```", "",
              "Everything above is also in `dpo_run.json` next to this card.", "",
              "## Environment", "", ", ".join(f"{k} {v}" for k, v in record["environment"].items()), ""]
    return "\n".join(lines)
