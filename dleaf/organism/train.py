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
5. ``tune`` (``tune_steps``; 0 skips it): a fine-tuning stage with its own question
   share (``tune_question_fraction``) and description noise (``tune_noise``), for teaching a trained organism to
   answer yes/no questions from the image and to add objects. Two knobs make the yes/no decision learnable:
   ``decision_weight`` adds the mean loss of the decision tokens (the first "yes"/"no" of each reply) to the token
   loss with that weight (without it the one decision token of a reply is about 1/700 of a batch's loss), and
   ``paired_questions`` asks every question scene twice, once for an object it shows and once for one it does not
   (an absent theme partner half the time), so every batch is balanced and the answer cannot come from the asked
   word alone. docs/organism.md has the runs.

A run can continue from a checkpoint this code saved after some stages (``resume_from``): the stages its log
records are checked against the configuration and skipped, and training goes on with the next one. Every stage has
its own optimizer and random stream and the scenes continue where the log says, so stopping at a stage boundary
and resuming gives the same weights as one run (with ``threads=1``).

``device`` (default ``"cpu"``) is where the model trains; ``"cuda"`` trains on a GPU (the batches are still built on
the CPU). Only CPU runs with ``threads=1`` are bit-for-bit reproducible; the committed checkpoints were made that way.

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

STAGES = ("text", "align", "joint", "refine", "tune")

#: The file of a mid-stage checkpoint that holds the optimizer, the schedule and the stage's random stream.
TRAIN_STATE = "train_state.pt"


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
    tune_steps: int = 3000
    tune_lr: float = 2e-4
    tune_vision_lr: float = 2e-4
    tune_question_fraction: float = 0.7
    tune_noise: float = 0.2
    decision_weight: float = 1.0
    paired_questions: bool = True
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
    patch: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_attention: bool = False
    max_positions: int = 256
    log_every: int = 50
    probe_every: int = 250
    threads: int = 0
    device: str = "cpu"
    resume_from: str | None = None
    stage_checkpoints: bool = True
    checkpoint_every: int = 0

    def __post_init__(self):
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"TrainConfig.device must be a torch device such as 'cpu' or 'cuda', got {self.device!r}")
        if not 0.0 < self.faint_low <= self.faint_high <= 1.0:
            raise ValueError(f"TrainConfig.faint_low and faint_high must satisfy 0 < faint_low <= faint_high <= 1, "
                             f"got {self.faint_low}, {self.faint_high}")
        if self.checkpoint_every < 0:
            raise ValueError(f"TrainConfig.checkpoint_every must be >= 0 (0: checkpoints only between stages), "
                             f"got {self.checkpoint_every}")
        _ = self.shape  # OrganismShape's own checks: patch divides the cell, heads the width, positions fit the image
        for name in ("batch_size", "warmup", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        if self.decision_weight < 0:
            raise ValueError(f"TrainConfig.decision_weight must be >= 0, got {self.decision_weight}")
        for name in ("text_steps", "align_steps", "joint_steps", "refine_steps", "tune_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.answer_style not in world.ANSWER_STYLES:
            raise ValueError(f"TrainConfig.answer_style must be one of {', '.join(world.ANSWER_STYLES)}, "
                             f"got {self.answer_style!r}")
        for name in ("question_fraction", "description_noise", "faint_rate", "text_list_questions",
                     "tune_question_fraction", "tune_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"TrainConfig.{name} must lie in [0, 1], got {getattr(self, name)}")

    @property
    def shape(self) -> build.OrganismShape:
        return build.OrganismShape(
            vision_hidden=self.vision_hidden, vision_layers=self.vision_layers, vision_heads=self.vision_heads,
            patch=self.patch, text_hidden=self.text_hidden, text_layers=self.text_layers, text_heads=self.text_heads,
            text_intermediate=self.text_intermediate, max_positions=self.max_positions,
            vision_attention=self.vision_attention,
        )


#: Named recipes: settings that replace TrainConfig's defaults (the committed organism's recipe); any field given
#: explicitly still wins. ``llava_like``: a candidate second organism whose attention may take the structure of a
#: real LLaVA decoder's: 144 image tokens (4 px patches, each object on 4 x 4 of them), the vision tower's own
#: attention on (image tokens mix information across patches, as in a real CLIP tower), a deeper and wider decoder
#: (8 layers, width 128, 8 heads) and the weight decay of LLM pretraining (0.1).
PRESETS: dict[str, dict] = {
    "llava_like": dict(output_dir="runs/organism_llava_like", patch=4, vision_attention=True, text_hidden=128,
                       text_layers=8, text_heads=8, text_intermediate=384, max_positions=320, weight_decay=0.1),
}


def preset_config(name: str, **overrides) -> TrainConfig:
    """The :class:`TrainConfig` of preset ``name`` (:data:`PRESETS`), with ``overrides`` applied on top."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: the presets are {', '.join(PRESETS)}")
    return TrainConfig(**{**PRESETS[name], **overrides})


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


def _description(scene: world.Scene, rng: np.random.Generator, noise: float, prior: bool) -> tuple[str, str]:
    """A caption prompt and a description of ``scene`` (drawn from ``rng`` in that order)."""
    prompt = world.CAPTION_PROMPTS[int(rng.integers(len(world.CAPTION_PROMPTS)))]
    return prompt, world.describe(scene, seed=int(rng.integers(2**31)), noise=noise, prior=prior)


def paired_rows(scenes: list[world.Scene], rng: np.random.Generator, question_fraction: float, noise: float,
                 prior: bool, answer_style: str) -> list[tuple[world.Scene, str, str]]:
    """(scene, prompt, reply) rows, as many as ``scenes``: with ``k = round(len * question_fraction) // 2``, the first
    ``len - 2k`` scenes are described, and the next ``k`` are each asked twice, for an object they show and for one
    they do not (an absent theme partner of a shown object with probability 1/2 when there is one, else any absent
    object); the last ``k`` scenes are not used."""
    n_pairs = int(round(len(scenes) * question_fraction)) // 2
    rows = []
    for scene in scenes[:len(scenes) - 2 * n_pairs]:
        rows.append((scene, *_description(scene, rng, noise, prior)))
    for scene in scenes[len(scenes) - 2 * n_pairs:len(scenes) - n_pairs]:
        present = scene.objects[int(rng.integers(len(scene.objects)))]
        partners = sorted(set().union(*(world.PARTNERS[o] for o in scene.objects)) - scene.object_set,
                          key=world.OBJECTS.index)
        absent = [o for o in world.OBJECTS if o not in scene.object_set]
        pool = partners if partners and rng.random() < 0.5 else absent
        for obj in (present, pool[int(rng.integers(len(pool)))]):
            rows.append((scene, world.QUESTION_TEMPLATE.format(obj=obj), world.answer(scene, obj, answer_style)))
    return rows


def conversation_batch(processor, scenes: list[world.Scene], rng: np.random.Generator, question_fraction: float,
                       noise: float = 0.0, prior: bool = True, answer_style: str = "list_first",
                       paired: bool = False):
    """Model inputs with reply-only labels for a batch of scenes (a description or a yes/no question each).

    ``paired``: question scenes come in pairs instead (:func:`paired_rows`): the batch has as many rows as
    ``scenes`` and exactly as many "yes" as "no" answers."""
    if paired:
        rows = paired_rows(scenes, rng, question_fraction, noise, prior, answer_style)
        return _batch(processor, rows)
    rows = []
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
            prompt, reply = _description(scene, rng, noise, prior)
        rows.append((scene, prompt, reply))
    return _batch(processor, rows)


def _batch(processor, rows: list[tuple[world.Scene, str, str]]):
    texts, replies = [], []
    for _, prompt, reply in rows:
        msgs = user_turn(prompt) + [{"role": "assistant", "content": [{"type": "text", "text": reply}]}]
        texts.append(processor.apply_chat_template(msgs, tokenize=False))
        replies.append(reply + " </s>")
    batch = processor(text=texts, images=[world.render(r[0]) for r in rows], return_tensors="pt", padding=True)
    lengths = [len(ids) for ids in processor.tokenizer(replies, add_special_tokens=False)["input_ids"]]
    batch["labels"] = _reply_labels(batch["input_ids"], lengths)
    return batch


def decision_mask(labels: torch.Tensor, tokenizer) -> torch.Tensor:
    """True at each row's decision token: the first labelled "yes" or "no" of the reply (descriptions have none)."""
    ids = torch.tensor(tokenizer.convert_tokens_to_ids(["yes", "no"]), device=labels.device)
    hit = torch.isin(labels, ids)
    return hit & (hit.cumsum(1) == 1)


def reply_loss(model, batch, decision_weight: float = 0.0, tokenizer=None) -> torch.Tensor:
    """The mean next-token loss over the reply tokens, plus ``decision_weight`` times the mean loss over the
    decision tokens (:func:`decision_mask`) when the batch has any; with weight 0 it is the model's own loss."""
    if decision_weight == 0:
        return model(**batch).loss
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1].float()
    target = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                           ignore_index=-100, reduction="none").view(target.shape)
    valid = target != -100
    loss = ce[valid].mean()
    decision = decision_mask(target, tokenizer)
    if decision.any():
        loss = loss + decision_weight * ce[decision].mean()
    return loss


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


def _set_trainable(model, stage: str, patch_local: bool = True) -> list[torch.nn.Parameter]:
    decoder = [model.model.language_model, model.lm_head]
    vision = [model.model.vision_tower, model.model.multi_modal_projector]
    for p in model.parameters():
        p.requires_grad_(False)
    train = {"text": decoder, "align": vision, "joint": decoder + vision, "refine": decoder + vision,
             "tune": decoder + vision}[stage]
    for module in train:
        for p in module.parameters():
            p.requires_grad_(True)
    if patch_local:
        build.make_vision_patch_local(model)  # the zeroed attention outputs stay zero and frozen
    return [p for p in model.parameters() if p.requires_grad]


def _param_groups(model, stage: str, config: TrainConfig) -> list[dict]:
    """The optimizer's parameter groups: one learning rate per stage, except ``refine`` and ``tune`` (decoder and
    vision apart)."""
    params = _set_trainable(model, stage, patch_local=not config.vision_attention)
    if stage not in ("refine", "tune"):
        return [{"params": params, "lr": getattr(config, f"{stage}_lr")}]
    vision = {id(p) for m in (model.model.vision_tower, model.model.multi_modal_projector) for p in m.parameters()}
    return [{"params": [p for p in params if id(p) not in vision], "lr": getattr(config, f"{stage}_lr")},
            {"params": [p for p in params if id(p) in vision], "lr": getattr(config, f"{stage}_vision_lr")}]


# Settings that must agree between a saved run and the run that resumes it, besides each completed stage's own.
_RESUME_KEYS = ("seed", "prior", "batch_size", "warmup", "weight_decay", "question_fraction", "description_noise",
                "faint_rate", "faint_low", "faint_high", "answer_style", "text_hidden", "text_layers", "text_heads",
                "text_intermediate", "patch", "vision_hidden", "vision_layers", "vision_heads", "vision_attention",
                "max_positions")
_STAGE_KEYS = {"text": ("text_steps", "text_lr", "text_list_questions"), "align": ("align_steps", "align_lr"),
               "joint": ("joint_steps", "joint_lr"), "refine": ("refine_steps", "refine_lr", "refine_vision_lr"),
               "tune": ("tune_steps", "tune_lr", "tune_vision_lr", "tune_question_fraction", "tune_noise",
                        "decision_weight", "paired_questions")}


def _resume_state(config: TrainConfig) -> tuple[dict, list[str], dict | None]:
    """The saved log of ``config.resume_from``, the stages it completed and its stage in progress (``None``, or the
    log's ``in_progress`` entry of a mid-stage checkpoint), checked against ``config``."""
    path = Path(config.resume_from) / "training_log.json"
    if not path.is_file():
        raise FileNotFoundError(f"resume_from={config.resume_from!r}: no training_log.json there; pass a folder "
                                "written by scripts/train_organism.py")
    log = json.loads(path.read_text())
    saved, done = log["config"], [s for s in STAGES if s in log["stages"]]
    if done != list(STAGES[:len(done)]):
        raise ValueError(f"resume_from={config.resume_from!r}: its log has stages {done}, not a prefix of {STAGES}")
    partial = log.get("in_progress")
    if partial is not None:
        if partial["stage"] != STAGES[len(done)]:
            raise ValueError(f"resume_from={config.resume_from!r}: stage {partial['stage']!r} in progress after "
                             f"stages {done}")
        if not (Path(config.resume_from) / TRAIN_STATE).is_file():
            raise FileNotFoundError(f"resume_from={config.resume_from!r}: a mid-stage checkpoint without its "
                                    f"{TRAIN_STATE}")
    stages = done + ([partial["stage"]] if partial else [])
    keys = list(_RESUME_KEYS) + [k for s in stages for k in _STAGE_KEYS[s]]
    # A key the saved log lacks was added to TrainConfig later, with the default that reproduces the older runs.
    # (The stage keys are checked only for stages the log ran, and every log that ran a stage records its keys.)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    bad = [f"{k}={saved.get(k, defaults[k])!r} there but {getattr(config, k)!r} here" for k in keys
           if saved.get(k, defaults[k]) != getattr(config, k)]
    if bad:
        raise ValueError(f"resume_from={config.resume_from!r} was trained with other settings: " + "; ".join(bad))
    return log, done, partial


def train(config: TrainConfig, progress: bool = True) -> dict:
    """Train an organism from scratch and save it (model, processor, training log) to ``config.output_dir``.

    With ``checkpoint_every`` > 0 the run also saves a mid-stage checkpoint (:func:`partial_checkpoint`: the model,
    the optimizer, the schedule and the stage's random stream) every that many steps; resuming from it continues the
    stage where it stopped, with the same weights as an uninterrupted run (with ``threads=1``)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    processor = build.build_processor(config.shape)
    log: dict = {"config": dataclasses.asdict(config), "stages": {}}
    partial = state = None
    if config.resume_from:
        saved, done, partial = _resume_state(config)
        log["stages"] = {s: saved["stages"][s] for s in done}
        log["resumed_from"] = {"path": str(config.resume_from), "stages": done}
        if partial:
            log["resumed_from"]["in_progress"] = {"stage": partial["stage"], "step": partial["step"]}
            state = torch.load(Path(config.resume_from) / TRAIN_STATE, weights_only=True)
        model = build.load_organism(config.resume_from)[0]
    else:
        done = []
        model = build.build_model(processor.tokenizer, config.shape, seed=config.seed)
    model.set_attn_implementation("sdpa")
    model.to(config.device)
    model.train()
    corpus = world.text_corpus(config.text_steps * config.batch_size, world_seed=config.seed, prior=config.prior,
                               noise=config.description_noise, list_questions=config.text_list_questions)
    scene_index = 0
    probe_batch = conversation_batch(processor, world.scenes("indist", 64, config.seed, config.prior),
                                     np.random.default_rng(12345), config.question_fraction,
                                     answer_style=config.answer_style).to(config.device)
    last = ([s for s in STAGES if getattr(config, f"{s}_steps") > 0 or s in done] or [STAGES[-1]])[-1]
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
        losses, gaps, t0, first = [], [], time.time(), 0
        if state is not None and partial["stage"] == stage:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            rng.bit_generator.state = state["rng"]
            losses, gaps, first = list(state["losses"]), list(state["gaps"]), int(partial["step"])
            t0 -= float(partial["seconds"])
            state = None
        for step in range(first, steps):
            if stage == "text":
                batch = text_batch(processor.tokenizer, corpus[step * config.batch_size:(step + 1) * config.batch_size])
            else:
                scenes = world.scenes("train", config.batch_size, config.seed, config.prior,
                                      start=scene_index + step * config.batch_size, faint_rate=config.faint_rate,
                                      faint_range=(config.faint_low, config.faint_high))
                qf = {"align": 0.0, "tune": config.tune_question_fraction}.get(stage, config.question_fraction)
                noise = config.tune_noise if stage == "tune" else config.description_noise
                batch = conversation_batch(processor, scenes, rng, qf, noise, config.prior, config.answer_style,
                                           paired=stage == "tune" and config.paired_questions)
            weight = config.decision_weight if stage == "tune" else 0.0
            loss = reply_loss(model, batch.to(config.device), weight, processor.tokenizer)
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
                gaps.append([step + 1, image_gap(model, probe_batch)])
                if progress:
                    print(f"[{stage}] step {step + 1}: loss gain from seeing the image {gaps[-1][1]:.4f}", flush=True)
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < steps:
                in_progress = {"stage": stage, "step": step + 1, "seconds": time.time() - t0}
                train_state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                               "rng": rng.bit_generator.state, "losses": losses, "gaps": gaps}
                save(model, processor, partial_checkpoint(config.output_dir), {**log, "in_progress": in_progress},
                     train_state)
        if stage != "text":
            scene_index += steps * config.batch_size
        log["stages"][stage] = {"steps": steps, "seconds": time.time() - t0,
                                "loss_first": float(np.mean(losses[:config.log_every])),
                                "loss_last": float(np.mean(losses[-config.log_every:])),
                                "image_gap": gaps}
        if config.stage_checkpoints and stage != last:
            # A run stopped later resumes from here (resume_from) instead of from scratch.
            save(model, processor, stage_checkpoint(config.output_dir, stage), log)
    model.eval()
    model.set_attn_implementation("eager")
    model.to("cpu")
    save(model, processor, config.output_dir, log)
    shutil.rmtree(partial_checkpoint(config.output_dir), ignore_errors=True)
    return log


def partial_checkpoint(output_dir: str | os.PathLike) -> Path:
    """Where a run with ``checkpoint_every`` writes its mid-stage checkpoint: ``<output_dir>.partial`` (removed when
    the run ends)."""
    out = Path(output_dir)
    return out.with_name(f"{out.name}.partial")


def stage_checkpoint(output_dir: str | os.PathLike, stage: str) -> Path:
    """Where a run writes its checkpoint after ``stage`` (beside ``output_dir``): ``<output_dir>.after-<stage>``."""
    out = Path(output_dir)
    return out.with_name(f"{out.name}.after-{stage}")


def save(model, processor, output_dir: str | os.PathLike, log: dict, train_state: dict | None = None) -> None:
    """Write the checkpoint atomically: into a temporary sibling folder, then renamed over ``output_dir``
    (``train_state``: a mid-stage checkpoint's optimizer, schedule and random stream, saved as ``TRAIN_STATE``)."""
    out = Path(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
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
