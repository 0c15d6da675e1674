"""What a run reads, by content: the record in a run's ``config.json`` (``inputs``) that decides, with the rest of
the configuration, whether a run folder may be resumed.

Every harness argument that names a file or folder (:data:`PATH_OPTIONS`) is recorded by content: a file by its
SHA-256, a folder by the images the benchmark's items load from it (each by its path inside the folder and its
bytes; the folder's other files do not count, so a COCO image folder is not read whole); item images under none of
these folders by item id (``item_images``); a LoRA adapter by what PEFT loads from it (``adapter``). Each record
keeps the path as it was given, for the reader; only the hashes decide (:func:`decisive`), so a run folder resumes
on another machine or with its inputs moved, and is refused when a file of the same name holds other questions,
labels, annotations, images or weights (:func:`input_differences` names them). The benchmarks know nothing of this:
the harness finds the image files from the items (:func:`item_image_file`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .. import models
from .registry import Benchmark, Item

#: the harness arguments that name files or folders: a run records each one's content (:func:`input_records`)
PATH_OPTIONS = ("coco_images", "coco_instances", "coco_captions", "pope_files", "pope_images")


def sha256_of(path: str | os.PathLike, cache: dict | None = None) -> str:
    """The SHA-256 of a file's bytes (read in blocks); ``cache`` maps resolved paths to digests already taken."""
    key = os.path.realpath(path)
    if cache is not None and key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if cache is not None:
        cache[key] = digest
    return digest


def item_image_file(item: Item) -> Path | None:
    """The image file an item's image is loaded from, when it is one: the ``path`` (or ``image_path``) of the item
    or of its image loader, else the one path among the loader's bound arguments (``lambda p=path:
    load_image(p)``, ``functools.partial(load_image, path)``); None for images made in memory (the organism's
    rendered scenes)."""
    for obj in (item, item.image):
        for name in ("image_path", "path"):
            value = getattr(obj, name, None)
            if isinstance(value, (str, os.PathLike)) and not callable(value):
                return Path(value)
    bound = list(getattr(item.image, "__defaults__", None) or ()) + list(getattr(item.image, "args", None) or ())
    paths = [b for b in bound if isinstance(b, os.PathLike)]
    return Path(paths[0]) if len(paths) == 1 else None


def _digest_lines(lines) -> str:
    return hashlib.sha256("".join(f"{line}\n" for line in sorted(lines)).encode()).hexdigest()


def input_records(args, benchmark: Benchmark) -> dict[str, Any]:
    """What a run's inputs are, by content (``args``: the harness arguments, :class:`~dleaf.eval.EvalArguments`).

    For each path option given (:data:`PATH_OPTIONS`): a file's ``{"path", "sha256"}`` (a list of them for a list
    of files); a folder's ``{"path", "files", "sha256"}`` over the images the benchmark's items load from it (each
    by its path inside the folder and its bytes; ``files`` counts them, and a benchmark whose items name no image
    file records none). ``item_images``: the item images under none of these folders, by item id. ``adapter``: a
    LoRA adapter (:func:`dleaf.models.adapter_digest`). The paths are as given, for the reader; the hashes decide
    whether a run may resume (:func:`dleaf.eval.runner.check_config`)."""
    cache: dict[str, str] = {}
    images = {it.id: p for it in benchmark.items if (p := item_image_file(it)) is not None and p.is_file()}
    placed: set[str] = set()
    out: dict[str, Any] = {}

    def record(value) -> dict:
        path = Path(value)
        if path.is_file():
            return {"path": str(value), "sha256": sha256_of(path, cache)}
        if path.is_dir():
            root = path.resolve()
            lines = set()
            for item_id, image in images.items():
                try:
                    inside = image.resolve().relative_to(root)
                except ValueError:
                    continue
                placed.add(item_id)
                lines.add(f"{inside.as_posix()}\t{sha256_of(image, cache)}")
            return {"path": str(value), "files": len(lines), "sha256": _digest_lines(lines)}
        return {"path": str(value), "sha256": None}

    for name in PATH_OPTIONS:
        value = getattr(args, name, None)
        if not value:
            continue
        out[name] = [record(v) for v in value] if isinstance(value, (list, tuple)) else record(value)
    rest = {item_id: image for item_id, image in images.items() if item_id not in placed}
    if rest:
        out["item_images"] = {"files": len(rest), "sha256": _digest_lines(
            f"{item_id}\t{sha256_of(image, cache)}" for item_id, image in rest.items())}
    if args.adapter:
        out["adapter"] = {"path": str(args.adapter), "sha256": models.adapter_digest(args.adapter)}
    return out


def _without_paths(value):
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items() if k != "path"}
    if isinstance(value, list):
        return [_without_paths(v) for v in value]
    return value


def decisive(config: dict) -> dict:
    """The part of a run configuration a resume must match: everything but the paths its inputs were read from
    (their hashes decide; the adapter's path too when its hash is recorded)."""
    out = json.loads(json.dumps(config))
    inputs = out.get("inputs")
    if isinstance(inputs, dict):
        out["inputs"] = _without_paths(inputs)
        if isinstance(inputs.get("adapter"), dict) and out.get("adapter") is not None:
            out["adapter"] = True
    return out


def _flag(name: str) -> str:
    return f"--{name}" if name in PATH_OPTIONS or name == "adapter" else name


def _was(old, new) -> str:
    """`` (the run read X)`` when the run read the input from another path."""
    if isinstance(old, dict) and isinstance(new, dict) and old.get("path") and old.get("path") != new.get("path"):
        return f" (the run read {old['path']})"
    return ""


def input_differences(old: dict, new: dict) -> list[str]:
    """Each input whose recorded content differs between two runs' ``inputs``, as a phrase naming it."""
    out = []
    for name in sorted(set(old) | set(new), key=lambda k: (k not in new, k)):
        a, b = old.get(name), new.get(name)
        if _without_paths(a) == _without_paths(b):
            continue
        if a is None:
            where = b.get("path") if isinstance(b, dict) else None
            out.append(f"{_flag(name)}{' ' + where if where else ''}: not recorded in the run (made before the "
                       "harness recorded it, or without it)")
        elif b is None:
            out.append(f"{_flag(name)}: the run was made with it, this command has none")
        elif isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                out.append(f"{_flag(name)}: {len(b)} given, the run had {len(a)}")
            else:
                out += [f"{_flag(name)} {y.get('path')}: its content differs from the run's{_was(x, y)}"
                        for x, y in zip(a, b) if _without_paths(x) != _without_paths(y)]
        elif isinstance(b, dict) and "path" in b:
            what = "the images its items use differ from the run's" if "files" in b else \
                "its content differs from the run's"
            out.append(f"{_flag(name)} {b['path']}: {what}{_was(a, b)}")
        else:
            out.append(f"{_flag(name)}: {a!r} in the run, {b!r} now")
    return out
