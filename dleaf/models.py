"""The one model loader and the one chat-prompt helper.

:func:`load` returns ``(model, processor)`` for a name registered here (the checkpoints that ship with the project:
``organism``, its no-prior control ``organism_control`` and the LLaVA-like organism ``organism_llava_like``), a
local checkpoint folder or a hub id, with an optional LoRA adapter merged in, in the requested dtype, on the
requested device (by default the GPU when there is one), in eval mode. :func:`chat_prompt` formats a one-turn
question about an image with the processor's own chat template, whatever the model. :func:`model_inputs` turns
prompts and images into left-padded processor inputs on the model's device. :func:`build` makes a randomly
initialised model of a registered family (offline, of any size its family allows: for tests and benchmarks);
families register through :mod:`dleaf.plugins`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from . import plugins
from .io import InputError
from .resources import data_path

DTYPES = ("float32", "bfloat16", "float16", "auto")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclasses.dataclass(frozen=True)
class NamedModel:
    """A model known by name: where its checkpoint is and how it is loaded by default."""

    path: Path
    attn_implementation: str | None = None
    description: str = ""


_REGISTRY: dict[str, NamedModel] = {}


def register(name: str, path: str | os.PathLike, attn_implementation: str | None = None, description: str = "") -> None:
    """Make ``name`` resolve to the checkpoint folder ``path`` in :func:`load` (re-registering replaces it)."""
    _REGISTRY[name] = NamedModel(Path(path), attn_implementation, description)


def unregister(name: str) -> None:
    """Forget a named model (a missing name is ignored)."""
    _REGISTRY.pop(name, None)


def registered() -> dict[str, NamedModel]:
    """The named models, by name."""
    return dict(_REGISTRY)


def model_help() -> str:
    """What a ``--model`` argument takes, naming the registered models (one sentence for every script's help)."""
    return f"a registered model ({', '.join(map(repr, _REGISTRY))}), a checkpoint folder or a hub id"


# The checkpoints that ship as package data. Eager attention by default: their measured results were taken with it,
# and a method attached to them then reproduces plain decoding bit for bit at zero strength.
register("organism", data_path("organism"), "eager", "the organism (a tiny Llava trained on the synthetic world)")
register("organism_control", data_path("organism_control"), "eager", "the organism's no-prior control")
register("organism_llava_like", data_path("organism_llava_like"), "eager",
         "the LLaVA-like organism (144 image tokens, CLIP attention on, an 8-layer decoder: scripts/train_organism.py "
         "--preset llava_like)")


_WORLD_CHECKS: list = []


def register_world(check) -> None:
    """Register ``check(model) -> bool``: whether a model belongs to a synthetic world whose own benchmarks study it
    (the organism's plugin registers :func:`dleaf.organism.build.is_world_checkpoint`)."""
    _WORLD_CHECKS.append(check)


def is_world_model(model: str | os.PathLike) -> bool:
    """Whether a registered world check claims ``model`` (:func:`register_world`)."""
    return any(check(model) for check in _WORLD_CHECKS)


def resolve(model: str | os.PathLike) -> tuple[str, NamedModel | None]:
    """``(path or hub id, the registry entry or None)`` for a model name, folder or hub id."""
    key = os.fspath(model)
    entry = _REGISTRY.get(key)
    return (str(entry.path), entry) if entry is not None else (key, None)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (``HF_HUB_OFFLINE=1``, or transformers' ``TRANSFORMERS_OFFLINE``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in ("1", "ON",
                                                                                                  "YES", "TRUE")


def check_hub_id(repo_id: str) -> None:
    """With the hub offline, a hub id must be in the local cache (its ``config.json``): checked without loading
    anything (``huggingface_hub.try_to_load_from_cache``). Online, nothing is checked here; the loader says what is
    wrong (:func:`load`)."""
    if not hub_offline():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError as e:  # huggingface_hub's HFValidationError: not a valid repository id
        raise InputError(f"--model {repo_id} is neither a local folder nor a valid hub id ({_one_line(e)})") from None
    if not isinstance(found, str):
        raise InputError(f"--model {repo_id}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub is "
                         "offline (HF_HUB_OFFLINE=1), and no local folder has that name: download it first "
                         f"(huggingface-cli download {repo_id}) with the hub online, or pass a checkpoint folder")


def check_model(model: str | os.PathLike) -> str:
    """Check a model argument before loading anything: a registered name must have its checkpoint, a local folder
    its ``config.json``; a string that is no local path is taken as a hub id, which must be in the local cache when
    the hub is offline (:func:`check_hub_id`; online, the loader checks it). Returns the path or hub id."""
    path, entry = resolve(model)
    if entry is not None and not (Path(path) / "config.json").is_file():
        raise InputError(f"the {model!r} checkpoint is missing ({path} has no config.json)")
    p = Path(path)
    if entry is None:
        if p.is_file():
            raise InputError(f"--model {path} is a file; pass a checkpoint folder or a hub id")
        if p.is_dir() and not (p / "config.json").is_file():
            raise InputError(f"model folder {p} has no config.json")
        if not p.exists() and not _HUB_ID.match(path):
            raise InputError(f"model folder not found: {path} (nor is it a hub id like owner/name)")
        if not p.exists():
            check_hub_id(path)
    return path


def check_adapter(adapter: str | os.PathLike | None) -> str | None:
    """Check a LoRA adapter folder (it must hold ``adapter_config.json``); returns it as a string."""
    if adapter is None:
        return None
    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise InputError(f"LoRA adapter folder {path} has no adapter_config.json (pass the output_dir of "
                         "scripts/train_dpo.py or another PEFT adapter folder)")
    return str(path)


def adapter_digest(adapter: str | os.PathLike) -> str:
    """SHA-256 over what PEFT loads from a LoRA adapter folder: ``adapter_config.json`` and the
    ``adapter_model.*`` weight files (each by name and bytes; the folder's other files, such as its processor or
    model card, do not change what a merged model generates)."""
    import hashlib

    path = Path(check_adapter(adapter))
    h = hashlib.sha256()
    for f in sorted(q for q in path.iterdir() if q.is_file() and (q.name == "adapter_config.json"
                                                                   or q.name.startswith("adapter_model."))):
        h.update(f"{f.name}\n".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def check_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load(model: str | os.PathLike = "organism", adapter: str | os.PathLike | None = None,
         attn_implementation: str | None = None, dtype: str = "float32", device: str | None = None):
    """``(model, processor)``.

    ``model``: a registered name (``organism``, ``organism_control``, ``organism_llava_like``), a checkpoint folder
    or a hub id (loaded with ``AutoModelForImageTextToText`` and ``AutoProcessor``). ``adapter``: a PEFT LoRA
    adapter folder, merged into the weights. ``attn_implementation``: default eager for the registered checkpoints,
    the checkpoint's own otherwise. ``dtype``: ``float32``, ``bfloat16``, ``float16`` or ``auto``. ``device``:
    default the GPU when there is one, else the CPU. The model is returned in eval mode.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = check_model(model)
    _, entry = resolve(model)
    adapter = check_adapter(adapter)
    torch_dtype = check_dtype(dtype)
    attn = attn_implementation or (entry.attn_implementation if entry else None)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if attn:
        kwargs["attn_implementation"] = attn
    try:  # what the loader cannot load is the user's input, said in one line
        processor = AutoProcessor.from_pretrained(path)
        net = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise InputError(f"--model {model} could not be loaded: {_one_line(e)}") from None
    if adapter:
        from peft import PeftModel

        try:
            net = PeftModel.from_pretrained(net, adapter).merge_and_unload()
        except (OSError, ValueError, RuntimeError) as e:
            raise InputError(f"--adapter {adapter} could not be loaded onto {model}: {_one_line(e)}") from None
    net.to(device or default_device())
    net.eval()
    return net, processor


# ---------------------------------------------------------------------------------------------------------------
# Model families built from scratch
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family that can be built from scratch, randomly initialised and offline.

    ``shape()``: the dataclass of its sizes (its fields are the knobs of :func:`build`; constructing it validates
    them); ``processor(shape)``: its processor; ``model(processor, shape, seed)``: a randomly initialised model,
    deterministic from ``seed``."""

    shape: Callable[[], type]
    processor: Callable[[Any], Any]
    model: Callable[[Any, Any, int], Any]
    description: str = ""


_FAMILIES: dict[str, Family] = {}


def register_family(name: str, shape: Callable[[], type], processor: Callable[[Any], Any],
                    model: Callable[[Any, Any, int], Any], description: str = "") -> Family:
    """Make ``name`` buildable with :func:`build` (re-registering replaces it); returns the entry."""
    _FAMILIES[name] = Family(shape, processor, model, description)
    return _FAMILIES[name]


def families() -> dict[str, Family]:
    """The registered model families, by name."""
    plugins.load()
    return dict(_FAMILIES)


def family(name: str) -> Family:
    """The registered family ``name``; an unknown name is an :class:`~dleaf.io.InputError` listing the known."""
    plugins.load()
    if name not in _FAMILIES:
        raise InputError(f"unknown model family {name!r}; expected one of {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def family_shape(name: str, shape: Any = None):
    """The family's shape from ``shape``: None (its defaults), a mapping of field values, or a shape instance.
    Unknown fields and values the shape refuses are a ``ValueError`` naming the fields."""
    cls = family(name).shape()
    if isinstance(shape, cls):
        return shape
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(shape or {}) - set(fields))
    if unknown:
        raise ValueError(f"unknown {name} shape field(s) {', '.join(unknown)}; expected some of {', '.join(fields)}")
    return cls(**dict(shape or {}))


def build_processor(name: str, shape: Any = None):
    """The processor of a registered family, built from scratch (offline)."""
    return family(name).processor(family_shape(name, shape))


def build(name: str, shape: Any = None, seed: int = 0):
    """``(model, processor)``: a randomly initialised model of the registered family ``name`` (deterministic from
    ``seed``) and its processor, built offline, in eval mode on the CPU. ``shape``: see :func:`family_shape`."""
    fam = family(name)
    s = family_shape(name, shape)
    processor = fam.processor(s)
    net = fam.model(processor, s, int(seed))
    net.eval()
    return net, processor


# ---------------------------------------------------------------------------------------------------------------
# Prompts and inputs
# ---------------------------------------------------------------------------------------------------------------


def user_turn(prompt: str, image: bool = True) -> list[dict]:
    """A one-turn conversation asking ``prompt`` (about an image when ``image``), in the message format of
    transformers' multimodal chat templates."""
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


def chat_prompt(processor, prompt: str, image: bool = True) -> str:
    """The text a model is prompted with: ``prompt`` (after an image placeholder when ``image``) as one user turn
    in the processor's own chat template, followed by the assistant's generation prompt."""
    return processor.apply_chat_template(user_turn(prompt, image), add_generation_prompt=True, tokenize=False)


def model_inputs(processor, prompts: Sequence[str], images: Sequence, model=None, chat: bool = True):
    """Processor inputs for one image per prompt, left-padded; on ``model``'s device with floating-point pixel
    values in its dtype when a model is given. ``chat=False`` takes ``prompts`` as already formatted texts."""
    if len(prompts) != len(images):
        raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
    tok = getattr(processor, "tokenizer", processor)
    tok.padding_side = "left"
    texts = [chat_prompt(processor, p) for p in prompts] if chat else list(prompts)
    batch = processor(text=texts, images=list(images), return_tensors="pt", padding=True)
    if model is not None:
        device = next(model.parameters()).device
        batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}
        if "pixel_values" in batch and batch["pixel_values"].is_floating_point():
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    return batch


def teacher_forced_inputs(processor, prompts: Sequence[str], images: Sequence, replies: Sequence[str], model=None
                          ) -> tuple[dict, int, list[list[int]]]:
    """Model inputs holding each prompt (left-padded, :func:`model_inputs`) followed by its reply's tokens
    (right-padded, masked), the prompt width ``n`` (the first reply column) and each reply's token ids; on
    ``model``'s device when a model is given."""
    import torch

    tok = getattr(processor, "tokenizer", processor)
    batch = model_inputs(processor, list(prompts), list(images), model)
    reply_ids = [tok(r, add_special_tokens=False)["input_ids"] for r in replies]
    width = max(1, max(len(r) for r in reply_ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(reply_ids), width), pad, dtype=batch["input_ids"].dtype, device=batch["input_ids"].device)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(reply_ids):
        ids[i, :len(r)] = torch.tensor(r, dtype=ids.dtype)
        mask[i, :len(r)] = 1
    n = batch["input_ids"].shape[1]
    full = {**batch, "input_ids": torch.cat([batch["input_ids"], ids], 1),
            "attention_mask": torch.cat([batch["attention_mask"], mask], 1)}
    if "mm_token_type_ids" in full:
        full["mm_token_type_ids"] = torch.cat([full["mm_token_type_ids"], torch.zeros_like(ids)], 1)
    return full, n, reply_ids
