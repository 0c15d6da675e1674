"""Train the organism the way LLaVA-style models are trained, deterministically from a seed, on a CPU.

Stages (each with AdamW, linear warm-up and cosine decay):

1. ``text``: the decoder (embeddings, Llama layers, LM head) is pretrained on text alone: descriptions of training
   scenes and theme statements, which carry the co-occurrence prior.
2. ``align``: the vision tower and projector learn to feed the decoder, which is frozen, on image descriptions.
3. ``joint``: everything trains on instruction data: descriptions and yes/no object questions. Its learning rate
   is low (2e-4) and the text stage short (150 steps): with a longer text stage or a higher joint rate the
   unfrozen decoder found its language prior cheaper than the image and stopped reading it (docs/organism.md has
   the runs).
4. ``refine`` (optional, ``refine_steps``): a second joint stage in which the vision tower and projector learn
   faster (``refine_vision_lr``) than the decoder (``refine_lr``), once the decoder is committed to reading the
   image, so that it reads the objects' identity better.

A run can continue from a checkpoint this code saved after some stages (``resume_from``): the stages its log
records are checked against the configuration and skipped, and training goes on with the next one. Every stage has
its own optimizer and random stream and the scenes continue where the log says, so stopping at a stage boundary
and resuming gives the same weights as one run (with ``threads=1``).

Every conversation starts with the LLaVA-style system prompt. The loss covers only the assistant's reply (and its
</s>). The control organism is trained by the same code with ``prior=False``: its scenes, and its text, have no
co-occurrence.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import build, world
from .chat import user_turn

STAGES = ("text", "align", "joint", "refine")


@dataclasses.dataclass
class TrainConfig:
    """Every knob of an organism training run."""

    output_dir: str = "runs/organism"
    seed: int = 0
    prior: bool = True
    batch_size: int = 32
    text_steps: int = 150
    align_steps: int = 250
    joint_steps: int = 2500
    text_lr: float = 2e-3
    align_lr: float = 2e-3
    joint_lr: float = 2e-4
    refine_steps: int = 2500
    refine_lr: float = 2e-4
    refine_vision_lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01
    question_fraction: float = 0.3
    description_noise: float = 0.0
    faint_rate: float = 0.0
    faint_low: float = world.FAINT_RANGE[0]
    faint_high: float = world.FAINT_RANGE[1]
    answer_style: str = "yes_first"
    text_list_questions: float = 0.0
    text_hidden: int = 96
    text_layers: int = 6
    text_heads: int = 6
    text_intermediate: int = 256
    log_every: int = 50
    probe_every: int = 250
    threads: int = 0
    resume_from: str | None = None
    stage_checkpoints: bool = True

    def __post_init__(self):
        if not 0.0 < self.faint_low <= self.faint_high <= 1.0:
            raise ValueError(f"TrainConfig.faint_low and faint_high must satisfy 0 < faint_low <= faint_high <= 1, "
                             f"got {self.faint_low}, {self.faint_high}")
        for name in ("batch_size", "warmup", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("text_steps", "align_steps", "joint_steps", "refine_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.answer_style not in world.ANSWER_STYLES:
            raise ValueError(f"TrainConfig.answer_style must be one of {', '.join(world.ANSWER_STYLES)}, "
                             f"got {self.answer_style!r}")
        for name in ("question_fraction", "description_noise", "faint_rate", "text_list_questions"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"TrainConfig.{name} must lie in [0, 1], got {getattr(self, name)}")

    @property
    def shape(self) -> build.OrganismShape:
        return build.OrganismShape(
            text_hidden=self.text_hidden, text_layers=self.text_layers, text_heads=self.text_heads,
            text_intermediate=self.text_intermediate,
        )


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _reply_labels(input_ids: torch.Tensor, reply_lengths: list[int]) -> torch.Tensor:
    """Labels that keep only the last ``reply_lengths[i]`` tokens of each left-padded row."""
    labels = torch.full_like(input_ids, -100)
    for i, n in enumerate(reply_lengths):
        labels[i, input_ids.shape[1] - n:] = input_ids[i, input_ids.shape[1] - n:]
    return labels


def conversation_batch(processor, scenes: list[world.Scene], rng: np.random.Generator, question_fraction: float,
                       noise: float = 0.0, prior: bool = True, answer_style: str = "list_first"):
    """Model inputs with reply-only labels for a batch of scenes (a description or a yes/no question each)."""
    texts, replies = [], []
    for scene in scenes:
        if rng.random() < question_fraction:
            if rng.random() < 0.5:
                obj = scene.objects[int(rng.integers(len(scene.objects)))]
            else:
                absent = [o for o in world.OBJECTS if o not in scene.object_set]
                obj = absent[int(rng.integers(len(absent)))]
            listed = None
            if noise > 0 and answer_style == "list_first":
                listed = [o for o, _ in world.noisy_mentions(scene, noise, rng, prior)]
            prompt, reply = world.QUESTION_TEMPLATE.format(obj=obj), world.answer(scene, obj, answer_style, listed)
        else:
            prompt = world.CAPTION_PROMPTS[int(rng.integers(len(world.CAPTION_PROMPTS)))]
            reply = world.describe(scene, seed=int(rng.integers(2**31)), noise=noise, prior=prior)
        msgs = user_turn(prompt) + [{"role": "assistant", "content": [{"type": "text", "text": reply}]}]
        texts.append(processor.apply_chat_template(msgs, tokenize=False))
        replies.append(reply + " </s>")
    batch = processor(text=texts, images=[world.render(s) for s in scenes], return_tensors="pt", padding=True)
    lengths = [len(ids) for ids in processor.tokenizer(replies, add_special_tokens=False)["input_ids"]]
    batch["labels"] = _reply_labels(batch["input_ids"], lengths)
    return batch


def text_batch(tokenizer, texts: list[str]):
    """Plain-text language-model inputs: <s> text </s>, loss on every token."""
    batch = tokenizer([t + " </s>" for t in texts], return_tensors="pt", padding=True)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    return batch


@torch.no_grad()
def image_gap(model, batch) -> float:
    """How much the model's loss on ``batch`` rises when every image is replaced by a blank one (in nats/token):
    near 0 means the decoder is not reading the image at all."""
    was_training = model.training
    model.eval()
    real = float(model(**batch).loss)
    blank = float(model(**{**batch, "pixel_values": torch.zeros_like(batch["pixel_values"])}).loss)
    model.train(was_training)
    return blank - real


def _set_trainable(model, stage: str) -> list[torch.nn.Parameter]:
    decoder = [model.model.language_model, model.lm_head]
    vision = [model.model.vision_tower, model.model.multi_modal_projector]
    for p in model.parameters():
        p.requires_grad_(False)
    train = {"text": decoder, "align": vision, "joint": decoder + vision, "refine": decoder + vision}[stage]
    for module in train:
        for p in module.parameters():
            p.requires_grad_(True)
    build.make_vision_patch_local(model)  # the zeroed attention outputs stay zero and frozen
    return [p for p in model.parameters() if p.requires_grad]


def _param_groups(model, stage: str, config: TrainConfig) -> list[dict]:
    """The optimizer's parameter groups: one learning rate per stage, except ``refine`` (decoder and vision apart)."""
    params = _set_trainable(model, stage)
    if stage != "refine":
        return [{"params": params, "lr": getattr(config, f"{stage}_lr")}]
    vision = {id(p) for m in (model.model.vision_tower, model.model.multi_modal_projector) for p in m.parameters()}
    return [{"params": [p for p in params if id(p) not in vision], "lr": config.refine_lr},
            {"params": [p for p in params if id(p) in vision], "lr": config.refine_vision_lr}]


# Settings that must agree between a saved run and the run that resumes it, besides each completed stage's own.
_RESUME_KEYS = ("seed", "prior", "batch_size", "warmup", "weight_decay", "question_fraction", "description_noise",
                "faint_rate", "faint_low", "faint_high", "answer_style", "text_hidden", "text_layers", "text_heads", "text_intermediate")
_STAGE_KEYS = {"text": ("text_steps", "text_lr", "text_list_questions"), "align": ("align_steps", "align_lr"),
               "joint": ("joint_steps", "joint_lr"), "refine": ("refine_steps", "refine_lr", "refine_vision_lr")}


def _resume_state(config: TrainConfig) -> tuple[dict, list[str]]:
    """The saved log of ``config.resume_from`` and the stages it completed, checked against ``config``."""
    path = Path(config.resume_from) / "training_log.json"
    if not path.is_file():
        raise FileNotFoundError(f"resume_from={config.resume_from!r}: no training_log.json there; pass a folder "
                                "written by scripts/train_organism.py")
    log = json.loads(path.read_text())
    saved, done = log["config"], [s for s in STAGES if s in log["stages"]]
    if done != list(STAGES[:len(done)]):
        raise ValueError(f"resume_from={config.resume_from!r}: its log has stages {done}, not a prefix of {STAGES}")
    keys = list(_RESUME_KEYS) + [k for s in done for k in _STAGE_KEYS[s]]
    bad = [f"{k}={saved.get(k)!r} there but {getattr(config, k)!r} here" for k in keys if saved.get(k) != getattr(config, k)]
    if bad:
        raise ValueError(f"resume_from={config.resume_from!r} was trained with other settings: " + "; ".join(bad))
    return log, done


def train(config: TrainConfig, progress: bool = True) -> dict:
    """Train an organism from scratch and save it (model, processor, training log) to ``config.output_dir``."""
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    processor = build.build_processor(config.shape)
    log: dict = {"config": dataclasses.asdict(config), "stages": {}}
    if config.resume_from:
        saved, done = _resume_state(config)
        log["stages"] = {s: saved["stages"][s] for s in done}
        log["resumed_from"] = {"path": str(config.resume_from), "stages": done}
        model = build.load_organism(config.resume_from)[0]
    else:
        done = []
        model = build.build_model(processor.tokenizer, config.shape, seed=config.seed)
    model.set_attn_implementation("sdpa")
    model.train()
    corpus = world.text_corpus(config.text_steps * config.batch_size, world_seed=config.seed, prior=config.prior,
                               noise=config.description_noise, list_questions=config.text_list_questions)
    scene_index = 0
    probe_batch = conversation_batch(processor, world.scenes("indist", 64, config.seed, config.prior),
                                     np.random.default_rng(12345), config.question_fraction,
                                     answer_style=config.answer_style)
    for stage in STAGES:
        steps = getattr(config, f"{stage}_steps")
        if stage in done:
            scene_index += steps * config.batch_size if stage != "text" else 0
            continue
        if steps == 0:
            continue
        groups = _param_groups(model, stage, config)
        params = [p for g in groups for p in g["params"]]
        opt = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s, n=steps: _schedule(s, n, config.warmup))
        rng = np.random.default_rng([config.seed, STAGES.index(stage)])
        losses, gaps, t0 = [], [], time.time()
        for step in range(steps):
            if stage == "text":
                batch = text_batch(processor.tokenizer, corpus[step * config.batch_size:(step + 1) * config.batch_size])
            else:
                scenes = world.scenes("train", config.batch_size, config.seed, config.prior, start=scene_index,
                                      faint_rate=config.faint_rate,
                                      faint_range=(config.faint_low, config.faint_high))
                scene_index += config.batch_size
                qf = 0.0 if stage == "align" else config.question_fraction
                batch = conversation_batch(processor, scenes, rng, qf, config.description_noise, config.prior,
                                           config.answer_style)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if progress and (step + 1) % config.log_every == 0:
                recent = float(np.mean(losses[-config.log_every:]))
                print(f"[{stage}] step {step + 1}/{steps} loss {recent:.4f} ({time.time() - t0:.0f}s)", flush=True)
            if stage != "text" and ((step + 1) % config.probe_every == 0 or step + 1 == steps):
                gaps.append((step + 1, image_gap(model, probe_batch)))
                if progress:
                    print(f"[{stage}] step {step + 1}: loss gain from seeing the image {gaps[-1][1]:.4f}", flush=True)
        log["stages"][stage] = {"steps": steps, "seconds": time.time() - t0,
                                "loss_first": float(np.mean(losses[:config.log_every])),
                                "loss_last": float(np.mean(losses[-config.log_every:])),
                                "image_gap": gaps}
        if config.stage_checkpoints and stage != STAGES[-1]:
            # A run stopped later resumes from here (resume_from) instead of from scratch.
            save(model, processor, stage_checkpoint(config.output_dir, stage), log)
    model.eval()
    model.set_attn_implementation("eager")
    save(model, processor, config.output_dir, log)
    return log


def stage_checkpoint(output_dir: str | os.PathLike, stage: str) -> Path:
    """Where a run writes its checkpoint after ``stage`` (beside ``output_dir``): ``<output_dir>.after-<stage>``."""
    out = Path(output_dir)
    return out.with_name(f"{out.name}.after-{stage}")


def save(model, processor, output_dir: str | os.PathLike, log: dict) -> None:
    """Write the checkpoint atomically: into a temporary sibling folder, then renamed over ``output_dir``."""
    out = Path(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
