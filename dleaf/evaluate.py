"""The evaluation harness: one protocol for every method, on the organism and on COCO (CHAIR, POPE).

A run evaluates one model (optionally with a LoRA adapter) under one decoding method (plain decoding, D-LEAF, PAI,
SPIN, the ablations; see :mod:`dleaf.engine`) on one benchmark, and writes a run folder:

``config.json``
    everything that decides what is generated (model, adapter, method and knobs, decoding, benchmark, sections,
    protocol name, version and file hash, overrides); a resumed run must match it exactly.
``generations.jsonl``
    one JSON object per item (``id``, ``section``, ``prompt``, ``raw``, ``text``, ``n_tokens``, ``stopped``),
    appended and flushed as it is produced. A run started again skips the ids already there; a last line cut by a
    kill (no newline) is dropped and regenerated. At the end the file holds every item once, in protocol order,
    whether it was written by one process, by several (``accelerate launch``), or over several interrupted runs.
``metrics.json``
    per section CHAIR (caption benchmarks) or POPE (yes/no benchmarks) from :mod:`dleaf.metrics`, with the protocol
    and the run configuration; written atomically (temporary file + ``os.replace``).

Benchmarks (:data:`BENCHMARKS`): ``organism_caption`` (sections: the held-out splits), ``organism_pope`` (sections:
``split/negatives``), ``coco_chair`` (section ``val2014``) and ``pope_file`` (one section per question file). The
protocol of each lives in a versioned YAML file under ``data/protocols``: id lists (or the rule that fixes them),
prompts, token limits, seeds and the trailing-incomplete-sentence rule.

Scale-out: under ``accelerate launch --num_processes N``, process ``r`` takes the pending items ``r::N``, writes them
to its own shard file ``generations.shard-r-of-N.jsonl``, and process 0 merges the shards into
``generations.jsonl`` in protocol order before it computes the metrics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from . import metrics
from . import models
from .cli import parse_knobs
from .generation import SENTENCE_RULES, apply_sentence_rule, generate
from .io import InputError, json_line, read_json, read_jsonl, write_json_atomic, write_text_atomic
from .resources import data_root
from .settings import Setting

DATA_DIR = data_root()
PROTOCOL_DIR = DATA_DIR / "protocols"
COCO_SYNONYMS = DATA_DIR / "coco" / "chair_synonyms.yaml"
BENCHMARKS: tuple[str, ...] = ("organism_caption", "organism_pope", "coco_chair", "pope_file")
DECODINGS: tuple[str, ...] = ("greedy", "beam", "sample")
GENERATIONS = "generations.jsonl"
METRICS = "metrics.json"
CONFIG = "config.json"
_SHARD_RE = re.compile(r"^generations\.shard-(\d+)-of-(\d+)\.jsonl$")


EvaluationInputError = InputError  # the harness's bad-input error (kept under its old name)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _row_line(row: dict) -> str:
    return json_line(row)


# ---------------------------------------------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------------------------------------------

_PROTOCOL_KEYS = {
    "organism_caption": ("world_seed", "n_images", "splits", "prompt", "max_new_tokens"),
    "organism_pope": ("world_seed", "n_images", "splits", "negatives", "question_seed", "prompt", "max_new_tokens"),
    "coco_chair": ("image_ids", "synonyms", "prompt", "max_new_tokens"),
    "pope_file": ("prompt", "max_new_tokens"),
}


@dataclasses.dataclass(frozen=True)
class Protocol:
    """A protocol file: ``name``, ``version``, ``benchmark`` and the benchmark's fields (``fields``); ``sha256`` is
    the file's hash, recorded with every result."""

    name: str
    version: int
    benchmark: str
    fields: dict
    path: Path
    sha256: str

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def record(self) -> dict:
        """What a result records about its protocol (no machine-specific path)."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


def load_protocol(name_or_path: str | os.PathLike) -> Protocol:
    """Load a protocol by name (``data/protocols/<name>.yaml``) or from a YAML file, and check its fields."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROTOCOL_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROTOCOL_DIR.glob("*.yaml"))
        raise EvaluationInputError(f"protocol file not found: {path} (protocols shipped: {', '.join(known)})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise EvaluationInputError(f"protocol file {path}{where} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise EvaluationInputError(f"protocol file {path} must hold a mapping, got {type(data).__name__}")
    for key in ("name", "version", "benchmark"):
        if key not in data:
            raise EvaluationInputError(f"protocol file {path} has no {key!r} field")
    bench = data["benchmark"]
    if bench not in BENCHMARKS:
        raise EvaluationInputError(f"protocol file {path}: unknown benchmark {bench!r}; expected one of "
                                   f"{', '.join(BENCHMARKS)}")
    if not isinstance(data["version"], int) or isinstance(data["version"], bool):
        raise EvaluationInputError(f"protocol file {path}: version must be an int, got {data['version']!r}")
    missing = [k for k in _PROTOCOL_KEYS[bench] if k not in data]
    if missing:
        raise EvaluationInputError(f"protocol file {path} (benchmark {bench}) lacks field(s) {', '.join(missing)}")
    rule = data.setdefault("trailing_incomplete_sentence", "keep")
    if rule not in SENTENCE_RULES:
        raise EvaluationInputError(f"protocol file {path}: trailing_incomplete_sentence must be one of "
                                   f"{', '.join(SENTENCE_RULES)}, got {rule!r}")
    data.setdefault("sampling_seed", 0)
    fields = {k: v for k, v in data.items() if k not in ("name", "version", "benchmark")}
    return Protocol(str(data["name"]), data["version"], bench, fields, path, _sha256(path))


# ---------------------------------------------------------------------------------------------------------------
# Items and benchmarks
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Item:
    """One prompt to answer: ``truth`` is the ground-truth category set (``kind == "caption"``) or whether the asked
    object is present (``kind == "yesno"``); ``image`` loads the image."""

    id: str
    section: str
    kind: str
    prompt: str
    image: Callable[[], Any] = dataclasses.field(compare=False, repr=False)
    truth: Any = None


@dataclasses.dataclass
class Benchmark:
    """The items of one benchmark in protocol order, the vocabulary its captions are scored with, and what it
    records about its inputs (``info``)."""

    name: str
    protocol: Protocol
    items: list[Item]
    vocab: metrics.ObjectVocabulary | None = None
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return [it.id for it in self.items]

    @property
    def sections(self) -> list[str]:
        return list(dict.fromkeys(it.section for it in self.items))

    def max_new_tokens(self, override: int | None = None) -> int:
        return int(override if override is not None else self.protocol["max_new_tokens"])


def _select(requested: Sequence[str] | None, available: Sequence[str], what: str) -> list[str]:
    if not requested:
        return list(available)
    bad = [r for r in requested if r not in available]
    if bad:
        raise EvaluationInputError(f"unknown {what} {', '.join(map(repr, bad))}; this protocol has "
                                   f"{', '.join(available)}")
    return [a for a in available if a in requested]  # protocol order


def _limit(n: int, limit: int | None) -> int:
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be a positive int or None, got {limit}")
    return n if limit is None else min(n, limit)


def organism_caption_benchmark(protocol: Protocol, splits: Sequence[str] | None = None,
                               limit: int | None = None) -> Benchmark:
    """Captions of ``n_images`` scenes (or the first ``limit``) of each held-out split; ids ``split/index``."""
    from .organism import world
    from .organism.profile import VOCAB

    items = []
    n = _limit(int(protocol["n_images"]), limit)
    for split in _select(splits, protocol["splits"], "split"):
        if split not in world.SPLITS or split == "train":
            raise EvaluationInputError(f"protocol {protocol.path}: {split!r} is not a held-out organism split")
        for i, scene in enumerate(world.scenes(split, n, int(protocol["world_seed"]))):
            items.append(Item(f"{split}/{i}", split, "caption", protocol["prompt"],
                              lambda s=scene: world.render(s), scene.object_set))
    return Benchmark("organism_caption", protocol, items, VOCAB)


def organism_pope_benchmark(protocol: Protocol, splits: Sequence[str] | None = None,
                            negatives: Sequence[str] | None = None, limit: int | None = None) -> Benchmark:
    """Yes/no questions on ``n_images`` scenes (or the first ``limit``) per split and negative sampling; sections
    ``split/negatives``, ids ``split/negatives/question index`` (two questions per scene, present one first)."""
    from .organism import world

    items = []
    n = _limit(int(protocol["n_images"]), limit)
    negs = _select(negatives, protocol["negatives"], "negative sampling")
    popularity = world.object_frequencies() if "popular" in negs else None
    for split in _select(splits, protocol["splits"], "split"):
        scene_list = world.scenes(split, n, int(protocol["world_seed"]))
        for neg in negs:
            section = f"{split}/{neg}"
            qs = world.pope_questions(scene_list, neg, seed=int(protocol["question_seed"]), popularity=popularity)
            for q_index, q in enumerate(qs):
                items.append(Item(f"{section}/{q_index}", section, "yesno", protocol["prompt"].format(object=q.obj),
                                  lambda s=q.scene: world.render(s), bool(q.label)))
    return Benchmark("organism_pope", protocol, items)


# --- COCO CHAIR -------------------------------------------------------------------------------------------------


def plural_forms(phrase: str, irregular: dict[str, Sequence[str]] | None = None,
                 same: Iterable[str] = ()) -> list[str]:
    """Plural spellings of a singular phrase (offline lemmatization of plurals, run backwards).

    The word pluralized is the one before ``of`` if the phrase has one ("glass of wine" -> "glasses of wine"), else
    the last word. A word in ``irregular`` takes the spellings listed there; a word in ``same`` has no separate
    plural; otherwise ``+es`` after s, x, z, ch, sh; consonant + ``y`` -> ``ies``; else ``+s``.
    """
    irregular = irregular or {}
    same = set(same)
    words = phrase.split()
    if not words:
        raise ValueError("plural_forms needs a non-empty phrase")
    k = words.index("of") - 1 if "of" in words[1:] else len(words) - 1
    w = words[k]
    if w in irregular:
        forms = list(irregular[w])
    elif w in same:
        forms = []
    elif w.endswith(("s", "x", "z", "ch", "sh")):
        forms = [w + "es"]
    elif len(w) > 1 and w.endswith("y") and w[-2] not in "aeiou":
        forms = [w[:-1] + "ies"]
    else:
        forms = [w + "s"]
    return [" ".join(words[:k] + [f] + words[k + 1:]) for f in forms if f != w]


def coco_vocabulary(path: str | os.PathLike | None = None) -> metrics.ObjectVocabulary:
    """The COCO CHAIR vocabulary: every phrase of the synonym table (and its plurals) -> its COCO category."""
    path = Path(path) if path is not None else COCO_SYNONYMS
    if not path.is_file():
        raise EvaluationInputError(f"COCO synonym table not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise EvaluationInputError(f"COCO synonym table {path} is not valid YAML: {e}") from e
    cats = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(cats, dict) or not cats:
        raise EvaluationInputError(f"COCO synonym table {path} needs a non-empty 'categories' mapping")
    irregular = data.get("irregular_plurals") or {}
    same = data.get("same_plural") or []
    synonyms: dict[str, str] = {}
    for cat, phrases in cats.items():
        if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
            raise EvaluationInputError(f"COCO synonym table {path}: category {cat!r} must list phrases (strings)")
        for phrase in [cat, *phrases]:
            for form in [phrase, *plural_forms(phrase, irregular, same)]:
                prev = synonyms.setdefault(form, cat)
                if prev != cat:
                    raise EvaluationInputError(f"COCO synonym table {path}: {form!r} is listed (or generated as a "
                                               f"plural) under both {prev!r} and {cat!r}")
    return metrics.ObjectVocabulary(synonyms)


def _coco_table(path: Path, data: Any, key: str, fields: Sequence[str]) -> list[dict]:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise EvaluationInputError(f"COCO annotation file {path} has no {key!r} list; is it a COCO "
                                   f"instances/captions file?")
    for k, entry in enumerate(data[key]):
        missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
        if missing:
            raise EvaluationInputError(f"COCO annotation file {path}: {key}[{k}] lacks {', '.join(missing)}")
    return data[key]


@dataclasses.dataclass
class CocoAnnotations:
    """What CHAIR needs from the COCO files: per image id its file name and its ground-truth categories (from the
    instance annotations and from the object words of its reference captions)."""

    file_names: dict[int, str]
    from_instances: dict[int, frozenset[str]]
    from_captions: dict[int, frozenset[str]]

    def ground_truth(self, image_id: int, sources: Sequence[str] = ("instances", "captions")) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        if "instances" in sources:
            out |= self.from_instances.get(image_id, frozenset())
        if "captions" in sources:
            out |= self.from_captions.get(image_id, frozenset())
        return out


def load_coco_annotations(instances: str | os.PathLike, captions: str | os.PathLike | None,
                          vocab: metrics.ObjectVocabulary) -> CocoAnnotations:
    """Read a COCO instances file (``images``, ``annotations``, ``categories``) and optionally a captions file."""
    instances = Path(instances)
    data = read_json(instances, "COCO instances file")
    cats = {c["id"]: c["name"] for c in _coco_table(instances, data, "categories", ("id", "name"))}
    unknown = sorted(n for n in cats.values() if n not in vocab.categories)
    if unknown:
        raise EvaluationInputError(f"COCO instances file {instances}: categories {', '.join(map(repr, unknown))} "
                                   f"are not in the CHAIR synonym table")
    file_names = {int(im["id"]): str(im.get("file_name", "")) for im in
                  _coco_table(instances, data, "images", ("id",))}
    objs: dict[int, set[str]] = {}
    for k, ann in enumerate(_coco_table(instances, data, "annotations", ("image_id", "category_id"))):
        if ann["category_id"] not in cats:
            raise EvaluationInputError(f"COCO instances file {instances}: annotations[{k}] has category_id "
                                       f"{ann['category_id']!r}, which is not in its categories")
        objs.setdefault(int(ann["image_id"]), set()).add(cats[ann["category_id"]])
    from_caps: dict[int, set[str]] = {}
    if captions is not None:
        captions = Path(captions)
        cdata = read_json(captions, "COCO captions file")
        for k, ann in enumerate(_coco_table(captions, cdata, "annotations", ("image_id", "caption"))):
            if not isinstance(ann["caption"], str):
                raise EvaluationInputError(f"COCO captions file {captions}: annotations[{k}].caption is not a string")
            found = from_caps.setdefault(int(ann["image_id"]), set())
            found.update(m.category for m in vocab.extract(ann["caption"]))
    return CocoAnnotations(file_names, {k: frozenset(v) for k, v in objs.items()},
                           {k: frozenset(v) for k, v in from_caps.items()})


def select_coco_ids(annotations: CocoAnnotations, n: int, seed: int) -> list[int]:
    """The protocol's rule for the image id list: the sorted ids of the images with at least one instance
    annotation, permuted by ``numpy.random.default_rng(seed)``, first ``n``."""
    pool = sorted(annotations.from_instances)
    order = np.random.default_rng(seed).permutation(len(pool))
    return [pool[i] for i in order[:n]]


def read_id_list(path: Path) -> list[int]:
    """One integer image id per line (blank lines and ``#`` comments ignored); errors name the file and line."""
    if not path.is_file():
        raise EvaluationInputError(f"image id list not found: {path}")
    ids = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if not line.isdigit():
            raise EvaluationInputError(f"image id list {path}, line {n}: {line!r} is not an integer image id")
        ids.append(int(line))
    if len(set(ids)) != len(ids):
        raise EvaluationInputError(f"image id list {path} repeats an image id")
    return ids


def _open_image(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _check_images(paths: Sequence[Path], what: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise EvaluationInputError(f"{len(missing)} of {len(paths)} {what} images are missing, first {missing[0]}")


def coco_id_list(protocol: Protocol, annotations: CocoAnnotations) -> tuple[list[int], str]:
    """The protocol's image ids and where they came from (``file`` or ``rule``)."""
    spec = protocol["image_ids"]
    if not isinstance(spec, dict) or "file" not in spec:
        raise EvaluationInputError(f"protocol {protocol.path}: image_ids needs a 'file' (and may give n, seed)")
    path = DATA_DIR / spec["file"]
    if path.is_file():
        return read_id_list(path), "file"
    if "n" not in spec or "seed" not in spec:
        raise EvaluationInputError(f"image id list not found: {path}, and protocol {protocol.path} gives no rule "
                                   f"(image_ids.n and image_ids.seed) to derive it")
    return select_coco_ids(annotations, int(spec["n"]), int(spec["seed"])), "rule"


def coco_chair_benchmark(protocol: Protocol, images: str | os.PathLike, instances: str | os.PathLike,
                         captions: str | os.PathLike | None, limit: int | None = None,
                         image_ids: Sequence[int] | None = None) -> Benchmark:
    """COCO CHAIR: captions of the protocol's image ids (or ``image_ids``, or the first ``limit``), ground truth
    from instances and reference captions; section ``val2014``, ids ``val2014/<image id>``."""
    vocab = coco_vocabulary(DATA_DIR / protocol["synonyms"])
    sources = protocol.get("ground_truth", ["instances", "captions"])
    if "captions" in sources and captions is None:
        raise EvaluationInputError(f"protocol {protocol.path} takes ground truth from reference captions: "
                                   f"give the COCO captions file (--coco_captions)")
    ann = load_coco_annotations(instances, captions if "captions" in sources else None, vocab)
    if image_ids is None:
        ids, source = coco_id_list(protocol, ann)
    else:
        ids, source = list(image_ids), "given"
    ids = ids[: _limit(len(ids), limit)]
    unknown = [i for i in ids if i not in ann.file_names]
    if unknown:
        raise EvaluationInputError(f"COCO instances file {instances} has no image {unknown[0]} of the protocol's "
                                   f"id list ({len(unknown)} missing); is it the val2014 instances file?")
    images = Path(images)
    pattern = protocol.get("image_file", "COCO_val2014_{id:012d}.jpg")
    paths = [images / (ann.file_names[i] or pattern.format(id=i)) for i in ids]
    _check_images(paths, f"COCO (folder {images})")
    items = [Item(f"val2014/{i}", "val2014", "caption", protocol["prompt"], lambda p=p: _open_image(p),
                  ann.ground_truth(i, sources)) for i, p in zip(ids, paths)]
    digest = hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()
    return Benchmark("coco_chair", protocol, items, vocab, {"image_ids": source, "image_ids_sha256": digest})


# --- POPE question files ----------------------------------------------------------------------------------------


def read_pope_file(path: str | os.PathLike) -> list[dict]:
    """A POPE question file: JSON lines (or a JSON list) of objects with ``question_id``, ``image``, ``text`` and
    ``label`` (``yes``/``no``). Errors name the file and the line (or list index)."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationInputError(f"POPE question file not found: {path}")
    head = path.read_text(encoding="utf-8").lstrip()[:1]
    if head == "[":
        data = read_json(path, "POPE question file")
        rows = [(f"entry {k}", r) for k, r in enumerate(data)]
    else:
        rows = [(f"line {n}", r) for n, r in read_jsonl(path, "POPE question file")[0]]
    out, seen = [], set()
    for where, r in rows:
        missing = [f for f in ("question_id", "image", "text", "label") if not isinstance(r, dict) or f not in r]
        if missing:
            raise EvaluationInputError(f"POPE question file {path}, {where}: lacks {', '.join(missing)}")
        label = str(r["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise EvaluationInputError(f"POPE question file {path}, {where}: label must be 'yes' or 'no', got "
                                       f"{r['label']!r}")
        if str(r["question_id"]) in seen:
            raise EvaluationInputError(f"POPE question file {path}, {where}: question_id {r['question_id']!r} "
                                       f"repeats an earlier one")
        seen.add(str(r["question_id"]))
        out.append({**r, "label": label})
    if not out:
        raise EvaluationInputError(f"POPE question file {path} holds no questions")
    return out


def pope_file_benchmark(protocol: Protocol, files: Sequence[str | os.PathLike], images: str | os.PathLike,
                        limit: int | None = None) -> Benchmark:
    """POPE from question files: one section per file (its name without extension), ids
    ``section/question_id``, in file order."""
    if not files:
        raise EvaluationInputError("pope_file needs at least one question file (--pope_files)")
    images = Path(images)
    items, sections = [], set()
    for f in files:
        f = Path(f)
        section = f.name.split(".")[0]
        if section in sections:
            raise EvaluationInputError(f"two POPE question files are both named {section!r}: {f}")
        sections.add(section)
        qs = read_pope_file(f)
        qs = qs[: _limit(len(qs), limit)]
        paths = [images / q["image"] for q in qs]
        _check_images(paths, f"POPE ({f.name}, folder {images})")
        for q, p in zip(qs, paths):
            items.append(Item(f"{section}/{q['question_id']}", section, "yesno",
                              protocol["prompt"].format(question=q["text"]), lambda p=p: _open_image(p),
                              q["label"] == "yes"))
    return Benchmark("pope_file", protocol, items)


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalArguments:
    """Arguments of ``scripts/evaluate.py`` (each field is a ``--flag``; a YAML file with these keys works too)."""

    benchmark: str | None = dataclasses.field(default=None, metadata={
        "help": f"one of {', '.join(BENCHMARKS)}"})
    output_dir: str | None = dataclasses.field(default=None, metadata={
        "help": "run folder (config.json, generations.jsonl, metrics.json); an existing one is resumed"})
    model: str = dataclasses.field(default="organism", metadata={
        "help": "'organism', 'organism_control', a checkpoint folder or a hub id"})
    adapter: str | None = dataclasses.field(default=None, metadata={"help": "LoRA adapter folder (PEFT)"})
    method: str = dataclasses.field(default="greedy", metadata={
        "help": "greedy (nothing attached), dleaf, pai, spin, no_localization, random_layers"})
    knobs: list[str] = dataclasses.field(default_factory=list, metadata={
        "help": "method knobs as key=value (values parsed as YAML), e.g. --knobs gamma=0.3 layer_start=2"})
    decoding: str = dataclasses.field(default="greedy", metadata={"help": "greedy, beam or sample"})
    num_beams: int = dataclasses.field(default=5, metadata={"help": "beams for --decoding beam"})
    temperature: float = dataclasses.field(default=1.0, metadata={"help": "for --decoding sample"})
    top_p: float = dataclasses.field(default=1.0, metadata={"help": "for --decoding sample"})
    seed: int | None = dataclasses.field(default=None, metadata={
        "help": "sampling seed (default: the protocol's sampling_seed)"})
    protocol: str | None = dataclasses.field(default=None, metadata={
        "help": "protocol name under data/protocols or a YAML file (default: the benchmark's own)"})
    max_new_tokens: int | None = dataclasses.field(default=None, metadata={
        "help": "override the protocol's token limit (recorded as an override)"})
    limit: int | None = dataclasses.field(default=None, metadata={
        "help": "evaluate only the first N images (organism, COCO) or questions (POPE files) per section "
                "(recorded as an override)"})
    splits: list[str] = dataclasses.field(default_factory=list, metadata={"help": "organism splits to run"})
    negatives: list[str] = dataclasses.field(default_factory=list, metadata={
        "help": "organism_pope negative samplings to run"})
    coco_images: str | None = dataclasses.field(default=None, metadata={"help": "folder of val2014 images"})
    coco_instances: str | None = dataclasses.field(default=None, metadata={"help": "instances_val2014.json"})
    coco_captions: str | None = dataclasses.field(default=None, metadata={"help": "captions_val2014.json"})
    pope_files: list[str] = dataclasses.field(default_factory=list, metadata={"help": "POPE question files"})
    pope_images: str | None = dataclasses.field(default=None, metadata={"help": "folder of the POPE images"})
    batch_size: int = dataclasses.field(default=16, metadata={"help": "prompts per generate call"})
    dtype: str = dataclasses.field(default="float32", metadata={"help": "float32, bfloat16 or float16"})
    attn_implementation: str | None = dataclasses.field(default=None, metadata={
        "help": "attention implementation to load the model with (default: eager for the organism, the "
                "model's own otherwise)"})
    progress: bool = dataclasses.field(default=True, metadata={"help": "show a progress bar"})
    compare: list[str] = dataclasses.field(default_factory=list, metadata={
        "help": "instead of evaluating, print a markdown table comparing these run folders"})
    table_out: str | None = dataclasses.field(default=None, metadata={"help": "also write the table to this file"})
    write_coco_ids: str | None = dataclasses.field(default=None, metadata={
        "help": "write the protocol's COCO image id list (derived from --coco_instances) to this file and exit"})

    def __post_init__(self):
        if self.decoding not in DECODINGS:
            raise EvaluationInputError(f"unknown decoding {self.decoding!r}; expected one of {', '.join(DECODINGS)}")
        if self.batch_size < 1:
            raise EvaluationInputError(f"batch_size must be >= 1, got {self.batch_size}")

    def knob_values(self) -> dict:
        return parse_knobs(self.knobs)

    def setting(self, protocol: Protocol | None = None) -> Setting:
        """The decoding :class:`~dleaf.settings.Setting` these arguments ask for (sampling seed: ``--seed``, else
        the protocol's ``sampling_seed``)."""
        seed = self.seed if self.seed is not None else int(protocol["sampling_seed"]) if protocol is not None else 0
        return Setting(self.method, self.knob_values(), self.decoding,
                       num_beams=self.num_beams if self.decoding == "beam" else None,
                       temperature=self.temperature, top_p=self.top_p, seed=seed)


def build_benchmark(args: EvalArguments) -> Benchmark:
    """The benchmark ``args`` asks for, with its protocol; every input is checked here, before any generation."""
    if args.benchmark not in BENCHMARKS:
        raise EvaluationInputError(f"unknown benchmark {args.benchmark!r}; expected one of {', '.join(BENCHMARKS)}")
    protocol = load_protocol(args.protocol or args.benchmark)
    if protocol.benchmark != args.benchmark:
        raise EvaluationInputError(f"protocol {protocol.path} is for benchmark {protocol.benchmark!r}, not "
                                   f"{args.benchmark!r}")
    if args.benchmark == "organism_caption":
        return organism_caption_benchmark(protocol, args.splits, args.limit)
    if args.benchmark == "organism_pope":
        return organism_pope_benchmark(protocol, args.splits, args.negatives, args.limit)
    if args.benchmark == "coco_chair":
        if not args.coco_images or not args.coco_instances:
            raise EvaluationInputError("coco_chair needs --coco_images and --coco_instances (and --coco_captions)")
        return coco_chair_benchmark(protocol, args.coco_images, args.coco_instances, args.coco_captions, args.limit)
    if not args.pope_images:
        raise EvaluationInputError("pope_file needs --pope_images (the folder the files' image names are in)")
    return pope_file_benchmark(protocol, args.pope_files, args.pope_images, args.limit)


def run_config(args: EvalArguments, benchmark: Benchmark) -> dict:
    """What decides the generations of a run (no batch size, process count or machine path of the harness)."""
    setting = args.setting(benchmark.protocol)
    overrides = {}
    if args.max_new_tokens is not None:
        overrides["max_new_tokens"] = args.max_new_tokens
    if args.limit is not None:
        overrides["limit"] = args.limit
    return {
        "benchmark": benchmark.name,
        "protocol": {**benchmark.protocol.record(), "overrides": overrides},
        "sections": benchmark.sections,
        "n_items": len(benchmark.items),
        "inputs": benchmark.info,
        "model": args.model,
        "adapter": args.adapter,
        **setting.record(),
        "max_new_tokens": benchmark.max_new_tokens(args.max_new_tokens),
        "dtype": args.dtype,
    }


# ---------------------------------------------------------------------------------------------------------------
# Model and generation
# ---------------------------------------------------------------------------------------------------------------


def load_model(args: EvalArguments):
    """``(model, processor)`` for ``args.model`` (the organism by default), with the LoRA adapter merged in
    (:func:`dleaf.models.load`)."""
    return models.load(args.model, args.adapter, args.attn_implementation, args.dtype)


def generate_rows(model, processor, items: Sequence[Item], config: dict, batch_size: int,
                  sentence_rule: str) -> Iterable[dict]:
    """One row per item, in order, through :func:`dleaf.generation.generate` under the run's setting."""
    setting = Setting.from_record(config)
    for it, row in zip(items, generate(model, processor, items, setting, config["max_new_tokens"], batch_size,
                                       sentence_rule if items and items[0].kind == "caption" else "keep")):
        assert row["id"] == it.id
        yield {"id": it.id, "section": it.section, "prompt": it.prompt, **{k: v for k, v in row.items() if k != "id"}}


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
            raise EvaluationInputError(f"{what} {path}, line {n}: id {rid!r} is not an item of this run's benchmark "
                                       f"(is the folder from another benchmark or protocol?)")
        if rid in rows and rows[rid] != row:
            raise EvaluationInputError(f"{what} {path}, line {n}: id {rid!r} appears twice with different content")
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
    main_ids: list[str] = []
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
        text = "".join(_row_line(rows[rid]) for rid in sorted(rows, key=order.__getitem__))
        write_text_atomic(text, main)
    for shard in shards:
        shard.unlink()
    return rows


def _check_config(run_dir: Path, config: dict) -> None:
    path = run_dir / CONFIG
    if path.exists():
        old = read_json(path, "run config")
        if old != json.loads(json.dumps(config)):
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != json.loads(json.dumps(config)).get(k))
            raise EvaluationInputError(f"run folder {run_dir} holds a different run (config.json differs in "
                                       f"{', '.join(diff)}); use a new --output_dir")
    else:
        write_json_atomic(config, path)


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def compute_metrics(benchmark: Benchmark, rows: dict[str, dict] | Sequence[dict]) -> dict[str, dict]:
    """Per section: CHAIR (``kind == "caption"``, on each row's ``text``) or POPE (``kind == "yesno"``)."""
    if not isinstance(rows, dict):
        rows = {r["id"]: r for r in rows}
    missing = [it.id for it in benchmark.items if it.id not in rows]
    if missing:
        raise ValueError(f"{len(missing)} items have no generation yet (first {missing[0]!r})")
    out: dict[str, dict] = {}
    for section in benchmark.sections:
        items = [it for it in benchmark.items if it.section == section]
        texts = [rows[it.id]["text"] for it in items]
        if items[0].kind == "caption":
            res = metrics.chair(texts, [it.truth for it in items], benchmark.vocab)
        else:
            res = metrics.pope(texts, [it.truth for it in items])
        out[section] = {"kind": items[0].kind, **res.as_dict()}
    return out


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def _from_main(obj, state):
    """Process 0's ``obj`` on every process (a barrier too)."""
    if state.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def process_state():
    """This process's ``accelerate.PartialState``. Without an accelerator, processes launched by accelerate only form
    a group when told to use the CPU."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def run_evaluation(args: EvalArguments, model=None, processor=None, benchmark: Benchmark | None = None
                   ) -> dict | None:
    """Evaluate (or resume) one run; returns the metrics dict on process 0 and None on the others.

    ``model``/``processor`` may be given (already loaded); otherwise :func:`load_model` loads them. Under
    ``accelerate launch`` the pending items are sharded across processes (see the module docstring).
    """
    from tqdm.auto import tqdm

    if not args.output_dir:
        raise EvaluationInputError("--output_dir is required")
    benchmark = benchmark or build_benchmark(args)
    config = run_config(args, benchmark)
    run_dir = Path(args.output_dir)
    state = process_state()
    rank, world = state.process_index, state.num_processes
    ids = benchmark.ids
    error = None
    if state.is_main_process:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            _check_config(run_dir, config)
            consolidate(run_dir, ids)
        except EvaluationInputError as e:
            error = str(e)
    error = _from_main(error, state)  # every process stops on process 0's error, none waits for ever
    if error is not None:
        raise EvaluationInputError(error)
    main = run_dir / GENERATIONS
    done = {r["id"] for _, r in read_jsonl(main, "generations file")[0]} if main.exists() else set()
    pending = [it for it in benchmark.items if it.id not in done]
    mine = pending[rank::world]
    if mine:
        if model is None:
            model, processor = load_model(args)
        model.to(state.device)
        target = main if world == 1 else _shard_path(run_dir, rank, world)
        bar = tqdm(total=len(mine), desc=f"{benchmark.name}" + (f" [{rank}/{world}]" if world > 1 else ""),
                   disable=not args.progress, position=rank, leave=world == 1)
        rule = benchmark.protocol.get("trailing_incomplete_sentence", "keep")
        with open(target, "a", encoding="utf-8") as f:
            for row in generate_rows(model, processor, mine, config, args.batch_size, rule):
                f.write(_row_line(row))
                f.flush()
                bar.update(1)
        bar.close()
    state.wait_for_everyone()
    result = None
    if state.is_main_process:
        rows = consolidate(run_dir, ids)
        result = {"benchmark": benchmark.name, "protocol": config["protocol"], "run": config,
                  "sections": compute_metrics(benchmark, rows)}
        write_json_atomic(result, run_dir / METRICS)
    state.wait_for_everyone()
    return result


def write_coco_ids(args: EvalArguments, path: str | os.PathLike) -> list[int]:
    """Derive the protocol's COCO image id list from ``--coco_instances`` by its rule and write it to ``path``."""
    protocol = load_protocol(args.protocol or "coco_chair")
    if not args.coco_instances:
        raise EvaluationInputError("--write_coco_ids needs --coco_instances")
    ann = load_coco_annotations(args.coco_instances, None, coco_vocabulary(DATA_DIR / protocol["synonyms"]))
    spec = protocol["image_ids"]
    ids = select_coco_ids(ann, int(spec["n"]), int(spec["seed"]))
    header = (f"# COCO val2014 image ids of protocol {protocol.name} v{protocol.version}: sorted ids with an instance "
              f"annotation, permuted by numpy default_rng({spec['seed']}), first {spec['n']}\n")
    Path(path).write_text(header + "".join(f"{i}\n" for i in ids), encoding="utf-8")
    return ids


# ---------------------------------------------------------------------------------------------------------------
# Comparison table
# ---------------------------------------------------------------------------------------------------------------


def _pct(x) -> str:
    return "nan" if x is None or x != x else f"{100 * x:.1f}"


def _method_label(run: dict) -> str:
    label = run.get("method", "?")
    if run.get("knobs"):
        label += " (" + ", ".join(f"{k}={v}" for k, v in sorted(run["knobs"].items())) + ")"
    if run.get("adapter"):
        label += " + adapter"
    dec = run.get("decoding", {})
    if dec.get("strategy") not in (None, "greedy"):
        label += f", {dec['strategy']}"
    return label


def comparison_table(run_dirs: Sequence[str | os.PathLike]) -> str:
    """Markdown tables comparing run folders: one CHAIR table for caption sections and one POPE table for yes/no
    sections, a row per run and section. Runs on different protocols (name, version, overrides) are flagged."""
    runs = []
    for d in run_dirs:
        path = Path(d) / METRICS
        res = read_json(path, "metrics file")
        if not isinstance(res, dict) or "sections" not in res or "run" not in res:
            raise EvaluationInputError(f"metrics file {path} is not one written by dleaf.evaluate")
        runs.append((Path(d).name, res))
    protocols: dict[str, set[str]] = {}
    for _, r in runs:
        protocols.setdefault(r["benchmark"], set()).add(json.dumps(r["protocol"], sort_keys=True))
    chair_rows, pope_rows = [], []
    for name, res in runs:
        proto = res["protocol"]
        ptxt = f"{proto['name']} v{proto['version']}" + (" *" if proto.get("overrides") else "")
        for section, m in res["sections"].items():
            lead = f"| {name} | {_method_label(res['run'])} | {section} | {ptxt} |"
            if m["kind"] == "caption":
                chair_rows.append(
                    f"{lead} {m['n_captions']} | {_pct(m['chair_s'])} | {_pct(m['chair_i'])} | {_pct(m['recall'])} | "
                    f"{m['mean_length']:.1f} | {m['n_hallucinated_mentions']} | {m['n_grounded_mentions']} |")
            else:
                pope_rows.append(
                    f"{lead} {m['n']} | {_pct(m['accuracy'])} | {_pct(m['precision'])} | {_pct(m['recall'])} | "
                    f"{_pct(m['f1'])} | {_pct(m['yes_ratio'])} | {m['n_unparsed']} |")
    lines = []
    if chair_rows:
        lines += ["| run | method | section | protocol | n | CHAIR_s % | CHAIR_i % | recall % | words | "
                  "hallucinated mentions | grounded mentions |", "|---|---|---|---|---|---|---|---|---|---|---|",
                  *chair_rows, ""]
    if pope_rows:
        lines += ["| run | method | section | protocol | n | accuracy % | precision % | recall % | F1 % | yes % | "
                  "unparsed |", "|---|---|---|---|---|---|---|---|---|---|---|", *pope_rows, ""]
    if any(r["protocol"].get("overrides") for _, r in runs):
        lines.append("\\* run with protocol overrides (token limit or item limit): not comparable to full runs.")
    mixed = sorted(b for b, ps in protocols.items() if len(ps) > 1)
    if mixed:
        lines.append(f"Warning: runs of {', '.join(mixed)} used different protocols (name, version, file hash or "
                     "overrides).")
    return "\n".join(lines).rstrip() + "\n"
