"""CHAIR on COCO val2014: captions of a fixed list of image ids, scored against each image's ground-truth objects
(from the instance annotations and the object words of its reference captions).

Object words are found by one of two rule sets (``chair_rules``): ``reference`` (the default from protocol version
2: exactly the CHAIR script published tables use, :mod:`dleaf.eval.chair_reference`) or ``dleaf`` (the project's own
synonym table, ``data/coco/chair_synonyms.yaml``: the 80 COCO categories, their synonyms, double words, plurals and
non-object phrases, matched longest first; ``docs/chair.md`` lists how the two differ). The same rules read the
generated captions and the reference captions that are part of the ground truth.

The benchmark ``coco_chair`` (one section, ``val2014``; ids ``val2014/<image id>``) needs the user's COCO files: the
val2014 image folder (``coco_images``), ``instances_val2014.json`` (``coco_instances``) and, when the protocol takes
ground truth from reference captions, ``captions_val2014.json`` (``coco_captions``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import metrics
from ..io import InputError, check_image, load_image, read_json, read_yaml
from ..resources import data_path
from .protocol import Protocol
from .registry import Benchmark, BenchmarkSpec, Item, limit_count, register_benchmark


def check_images(paths: Sequence[Path], what: str) -> None:
    """Every image file exists and is an image PIL can read (checked without decoding it all); the first missing or
    unreadable one is an :class:`~dleaf.io.InputError` naming it."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"{len(missing)} of {len(paths)} {what} images are missing, first {missing[0]}")
    for p in dict.fromkeys(paths):
        check_image(p, f"{what} image")


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


#: the rule sets a COCO CHAIR run can find object words with
CHAIR_RULES = ("reference", "dleaf")


def coco_vocabulary(path: str | os.PathLike | None = None) -> metrics.ObjectVocabulary:
    """The project's COCO CHAIR vocabulary (``chair_rules="dleaf"``): every phrase of the synonym table (and its
    plurals) -> its COCO category; with each animal category's phrases after ``qualifiers.words`` ("baby elephant"
    is an elephant, not a person) and ``non_objects`` phrases that name no object ("train track")."""
    path = Path(path) if path is not None else data_path("coco", "chair_synonyms.yaml")
    data = read_yaml(path, "COCO synonym table")
    cats = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(cats, dict) or not cats:
        raise InputError(f"COCO synonym table {path} needs a non-empty 'categories' mapping")
    irregular = data.get("irregular_plurals") or {}
    same = data.get("same_plural") or []
    qualifiers = data.get("qualifiers") or {}
    if not isinstance(qualifiers, dict) or not set(qualifiers) <= {"words", "categories"}:
        raise InputError(f"COCO synonym table {path}: 'qualifiers' must be a mapping with 'words' and 'categories'")
    unknown = [c for c in qualifiers.get("categories", []) if c not in cats]
    if unknown:
        raise InputError(f"COCO synonym table {path}: qualifiers.categories names {unknown[0]!r}, which is not a "
                         f"category of the table")
    synonyms: dict[str, str] = {}

    def add(form: str, cat: str) -> None:
        prev = synonyms.setdefault(form, cat)
        if prev != cat:
            raise InputError(f"COCO synonym table {path}: {form!r} is listed (or generated as a "
                             f"plural) under both {prev!r} and {cat!r}")

    for cat, phrases in cats.items():
        if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
            raise InputError(f"COCO synonym table {path}: category {cat!r} must list phrases (strings)")
        for phrase in [cat, *phrases]:
            for form in [phrase, *plural_forms(phrase, irregular, same)]:
                add(form, cat)
    for cat in qualifiers.get("categories", []):
        for phrase in [cat, *cats[cat]]:
            for word in qualifiers.get("words", []):
                for form in [phrase, *plural_forms(phrase, irregular, same)]:
                    add(f"{word} {form}", cat)
    non_objects: set[str] = set()
    for phrase in data.get("non_objects") or []:
        if not isinstance(phrase, str):
            raise InputError(f"COCO synonym table {path}: non_objects must list phrases (strings)")
        non_objects.update([phrase, *plural_forms(phrase, irregular, same)])
    return metrics.ObjectVocabulary(synonyms, non_objects=frozenset(non_objects))


def chair_vocabulary(protocol: Protocol, rules: str | None = None) -> metrics.ObjectVocabulary:
    """The vocabulary of a COCO CHAIR run: ``rules`` (else the protocol's ``chair_rules``, else ``dleaf``, the rule of
    protocol version 1)."""
    rules = rules or protocol.get("chair_rules", "dleaf")
    if rules == "reference":
        from .chair_reference import reference_vocabulary

        return reference_vocabulary(protocol.get("reference_rules", "coco/chair_reference.yaml"))
    if rules == "dleaf":
        return coco_vocabulary(data_path(protocol["synonyms"]))
    raise InputError(f"--chair_rules must be one of {', '.join(CHAIR_RULES)}, got {rules!r}")


def _coco_table(path: Path, data: Any, key: str, fields: Sequence[str]) -> list[dict]:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise InputError(f"COCO annotation file {path} has no {key!r} list; is it a COCO "
                                   f"instances/captions file?")
    for k, entry in enumerate(data[key]):
        missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
        if missing:
            raise InputError(f"COCO annotation file {path}: {key}[{k}] lacks {', '.join(missing)}")
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
        raise InputError(f"COCO instances file {instances}: categories {', '.join(map(repr, unknown))} "
                                   f"are not in the CHAIR synonym table")
    file_names = {int(im["id"]): str(im.get("file_name", "")) for im in
                  _coco_table(instances, data, "images", ("id",))}
    objs: dict[int, set[str]] = {}
    for k, ann in enumerate(_coco_table(instances, data, "annotations", ("image_id", "category_id"))):
        if ann["category_id"] not in cats:
            raise InputError(f"COCO instances file {instances}: annotations[{k}] has category_id "
                                       f"{ann['category_id']!r}, which is not in its categories")
        objs.setdefault(int(ann["image_id"]), set()).add(cats[ann["category_id"]])
    from_caps: dict[int, set[str]] = {}
    if captions is not None:
        captions = Path(captions)
        cdata = read_json(captions, "COCO captions file")
        for k, ann in enumerate(_coco_table(captions, cdata, "annotations", ("image_id", "caption"))):
            if not isinstance(ann["caption"], str):
                raise InputError(f"COCO captions file {captions}: annotations[{k}].caption is not a string")
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
        raise InputError(f"image id list not found: {path}")
    ids = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if not line.isdigit():
            raise InputError(f"image id list {path}, line {n}: {line!r} is not an integer image id")
        ids.append(int(line))
    if len(set(ids)) != len(ids):
        raise InputError(f"image id list {path} repeats an image id")
    return ids


def coco_id_list(protocol: Protocol, annotations: CocoAnnotations) -> tuple[list[int], str]:
    """The protocol's image ids and where they came from (``file`` or ``rule``)."""
    spec = protocol["image_ids"]
    if not isinstance(spec, dict) or "file" not in spec:
        raise InputError(f"protocol {protocol.path}: image_ids needs a 'file' (and may give n, seed)")
    path = data_path(spec["file"])
    if path.is_file():
        return read_id_list(path), "file"
    if "n" not in spec or "seed" not in spec:
        raise InputError(f"image id list not found: {path}, and protocol {protocol.path} gives no rule "
                                   f"(image_ids.n and image_ids.seed) to derive it")
    return select_coco_ids(annotations, int(spec["n"]), int(spec["seed"])), "rule"


def coco_chair_benchmark(protocol: Protocol, images: str | os.PathLike, instances: str | os.PathLike,
                         captions: str | os.PathLike | None, limit: int | None = None,
                         image_ids: Sequence[int] | None = None, chair_rules: str | None = None) -> Benchmark:
    """COCO CHAIR: captions of the protocol's image ids (or ``image_ids``, or the first ``limit``), ground truth
    from instances and reference captions, object words by ``chair_rules`` (default: the protocol's); section
    ``val2014``, ids ``val2014/<image id>``."""
    rules = chair_rules or protocol.get("chair_rules", "dleaf")
    vocab = chair_vocabulary(protocol, rules)
    sources = protocol.get("ground_truth", ["instances", "captions"])
    if "captions" in sources and captions is None:
        raise InputError(f"protocol {protocol.path} takes ground truth from reference captions: "
                                   f"give the COCO captions file (--coco_captions)")
    ann = load_coco_annotations(instances, captions if "captions" in sources else None, vocab)
    if image_ids is None:
        ids, source = coco_id_list(protocol, ann)
    else:
        ids, source = list(image_ids), "given"
    ids = ids[: limit_count(len(ids), limit)]
    unknown = [i for i in ids if i not in ann.file_names]
    if unknown:
        raise InputError(f"COCO instances file {instances} has no image {unknown[0]} of the protocol's "
                                   f"id list ({len(unknown)} missing); is it the val2014 instances file?")
    images = Path(images)
    pattern = protocol.get("image_file", "COCO_val2014_{id:012d}.jpg")
    paths = [images / (ann.file_names[i] or pattern.format(id=i)) for i in ids]
    check_images(paths, f"COCO (folder {images})")
    items = [Item(f"val2014/{i}", "val2014", "caption", protocol["prompt"], lambda p=p: load_image(p),
                  ann.ground_truth(i, sources), image_path=p) for i, p in zip(ids, paths)]
    digest = hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()
    return Benchmark("coco_chair", protocol, items, vocab, {"image_ids": source, "image_ids_sha256": digest},
                     scoring={"chair_rules": rules})


def write_coco_ids(instances: str | os.PathLike, path: str | os.PathLike, protocol: str = "coco_chair") -> list[int]:
    """Derive the protocol's COCO image id list from the instances file by its rule and write it to ``path``."""
    from ..io import write_text_atomic
    from .protocol import load_protocol

    proto = load_protocol(protocol)
    ann = load_coco_annotations(instances, None, chair_vocabulary(proto))
    spec = proto["image_ids"]
    ids = select_coco_ids(ann, int(spec["n"]), int(spec["seed"]))
    header = (f"# COCO val2014 image ids of protocol {proto.name} v{proto.version}: sorted ids with an instance "
              f"annotation, permuted by numpy default_rng({spec['seed']}), first {spec['n']}\n")
    write_text_atomic(header + "".join(f"{i}\n" for i in ids), path)
    return ids


def _build(protocol, options: Mapping[str, Any], limit: int | None) -> Benchmark:
    return coco_chair_benchmark(protocol, options["coco_images"], options["coco_instances"],
                                options.get("coco_captions"), limit, chair_rules=options.get("chair_rules"))


register_benchmark(BenchmarkSpec(
    name="coco_chair", kind="caption", build=_build,
    protocol_keys=("image_ids", "synonyms", "prompt", "max_new_tokens"),
    options={"coco_images": "folder of the val2014 images", "coco_instances": "instances_val2014.json",
             "coco_captions": "captions_val2014.json (reference captions, part of the ground truth)",
             "chair_rules": "how object words are found: reference (the CHAIR script published tables use; the "
                            "protocol's default) or dleaf (the project's synonym table)"},
    required=("coco_images", "coco_instances"),
    description="CHAIR on COCO val2014 (your images and annotation files)"))
