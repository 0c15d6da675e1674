"""POPE from question files in the standard format: one JSON object per line (or a JSON list) with
``question_id``, ``image``, ``text`` and ``label`` (``yes``/``no``). Each file is one section, named by its file name
without extension (``coco_pope_random``, ``coco_pope_popular``, ``coco_pope_adversarial``...); ids are
``section/question_id``. The benchmark ``pope_file`` needs the files (``pope_files``) and the folder their image
names are in (``pope_images``).

Answers are read by the official POPE rule by default (protocol version 2, ``answer_rule: pope_official``: the
first sentence, a ``no``/``No``/``not`` in it means no, anything else yes; :func:`dleaf.metrics.parse_yes_no_official`),
so accuracy, precision and yes-ratio compare with published POPE tables; ``--pope_answer_rule dleaf`` reads them with
the project's stricter parser, which leaves an answer that says neither yes nor no unparsed (and also reports the
official rule's numbers).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..io import InputError, load_image, read_json, read_jsonl
from ..metrics import ANSWER_RULES
from .coco import check_images
from .protocol import Protocol
from .registry import Benchmark, BenchmarkSpec, Item, limit_count, register_benchmark


def read_pope_file(path: str | os.PathLike) -> list[dict]:
    """A POPE question file: JSON lines (or a JSON list) of objects with ``question_id``, ``image``, ``text`` and
    ``label`` (``yes``/``no``). Errors name the file and the line (or list index)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"POPE question file not found: {path}")
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
            raise InputError(f"POPE question file {path}, {where}: lacks {', '.join(missing)}")
        label = str(r["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise InputError(f"POPE question file {path}, {where}: label must be 'yes' or 'no', got "
                                       f"{r['label']!r}")
        if str(r["question_id"]) in seen:
            raise InputError(f"POPE question file {path}, {where}: question_id {r['question_id']!r} "
                                       f"repeats an earlier one")
        seen.add(str(r["question_id"]))
        out.append({**r, "label": label})
    if not out:
        raise InputError(f"POPE question file {path} holds no questions")
    return out


def pope_file_benchmark(protocol: Protocol, files: Sequence[str | os.PathLike], images: str | os.PathLike,
                        limit: int | None = None, answer_rule: str | None = None) -> Benchmark:
    """POPE from question files: one section per file (its name without extension), ids
    ``section/question_id``, in file order; answers read by ``answer_rule`` (default: the protocol's, else
    ``dleaf``, the rule of protocol version 1)."""
    rule = answer_rule or protocol.get("answer_rule", "dleaf")
    if rule not in ANSWER_RULES:
        raise InputError(f"--pope_answer_rule must be one of {', '.join(ANSWER_RULES)}, got {rule!r}")
    if not files:
        raise InputError("pope_file needs at least one question file (--pope_files)")
    images = Path(images)
    items, sections = [], set()
    for f in files:
        f = Path(f)
        section = f.name.split(".")[0]
        if section in sections:
            raise InputError(f"two POPE question files are both named {section!r}: {f}")
        sections.add(section)
        qs = read_pope_file(f)
        qs = qs[: limit_count(len(qs), limit)]
        paths = [images / q["image"] for q in qs]
        check_images(paths, f"POPE ({f.name}, folder {images})")
        for q, p in zip(qs, paths):
            items.append(Item(f"{section}/{q['question_id']}", section, "yesno",
                              protocol["prompt"].format(question=q["text"]), lambda p=p: load_image(p),
                              q["label"] == "yes", image_path=p))
    return Benchmark("pope_file", protocol, items, scoring={"answer_rule": rule})


def _build(protocol, options: Mapping[str, Any], limit: int | None) -> Benchmark:
    return pope_file_benchmark(protocol, options.get("pope_files") or [], options["pope_images"], limit,
                               options.get("pope_answer_rule"))


register_benchmark(BenchmarkSpec(
    name="pope_file", kind="yesno", build=_build, protocol_keys=("prompt", "max_new_tokens"),
    options={"pope_files": "POPE question files (one section each)",
             "pope_images": "folder the question files' image names are in",
             "pope_answer_rule": "how answers are read: pope_official (the POPE repository's rule; the protocol's "
                                 "default) or dleaf (the project's stricter parser)"},
    required=("pope_files", "pope_images"),
    description="POPE from standard question files (your images)"))
