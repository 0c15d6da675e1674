"""Files in and out: atomic writes, strict JSON, JSON lines, and images.

* Every result file is written to a temporary file in its own folder and renamed over the target
  (:func:`write_text_atomic`), so a reader never sees half a file and an interrupted write leaves the previous
  version. The file gets the permissions an ordinary ``open(path, "w")`` would give (``0o666`` less the umask),
  not the owner-only mode of a bare temporary file.
* JSON is written strictly (:func:`to_json`): an undefined number (NaN, +-infinity) becomes ``null``, numpy scalars
  and arrays become plain numbers and lists, so every file parses with any standard JSON parser.
* :func:`read_json` and :func:`read_jsonl` name the file and the line of any syntax error (:class:`InputError`).
* :func:`load_image` opens an image file as 8-bit RGB, converting 16-bit and 32-bit integer images by their range
  and compositing transparent images on white, and refuses what it cannot convert faithfully.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """Bad input from the user: a missing or malformed file, an unknown name, a value out of range. The message
    names the file (and the line, where there is one) and what would be right. Scripts print it as
    ``error: <message>`` and exit with status 2."""


# ---------------------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, ``os.replace``), creating
    the folder; the file's mode is ``0o666`` less the process umask. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`write_bytes_atomic`); returns the path."""
    return write_bytes_atomic(text.encode("utf-8"), path)


def save_figure_atomic(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """Save a matplotlib figure to ``path`` atomically; the format follows the suffix (PNG if none)."""
    import io as _io

    path = Path(path)
    buf = _io.BytesIO()
    fig.savefig(buf, format=path.suffix[1:].lower() or "png", **savefig_kwargs)
    return write_bytes_atomic(buf.getvalue(), path)


# ---------------------------------------------------------------------------------------------------------------
# Strict JSON
# ---------------------------------------------------------------------------------------------------------------


def clean_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None, numpy scalars and arrays turned into Python
    numbers and lists, tuples and sets into lists (sets sorted) and paths into strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {(k if isinstance(k, str) else str(k)): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [clean_json(v) for v in sorted(obj)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays, torch tensors
        return clean_json(obj.tolist())
    if hasattr(obj, "item"):
        return clean_json(obj.item())
    raise TypeError(f"cannot write a {type(obj).__name__} as JSON")


def to_json(obj: Any, indent: int | None = None) -> str:
    """Strict JSON text of ``obj`` (see :func:`clean_json`; never ``NaN`` or ``Infinity``)."""
    return json.dumps(clean_json(obj), indent=indent, ensure_ascii=False, allow_nan=False)


def write_json_atomic(obj: Any, path: str | os.PathLike, indent: int = 2) -> Path:
    """Write ``obj`` as strict JSON (a final newline) to ``path`` atomically; returns the path."""
    return write_text_atomic(to_json(obj, indent) + "\n", path)


def json_line(obj: Any) -> str:
    """One strict JSON line (with its newline) for a JSON-lines file."""
    return to_json(obj) + "\n"


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def loads_strict(text: str) -> Any:
    """Parse JSON as strict parsers do (``NaN``, ``Infinity`` and ``-Infinity`` are errors)."""
    return json.loads(text, parse_constant=_reject_constant)


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file; a missing file or a syntax error raises :class:`InputError` with file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{what} {path} is not valid JSON: line {e.lineno}, column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path} is not UTF-8 text: {e}") from e


def read_yaml(path: str | os.PathLike, what: str = "YAML file") -> Any:
    """Parse a YAML file (``yaml.safe_load``); a missing file or a syntax error raises :class:`InputError` with the
    file and, where the parser knows it, the line."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"{what} {path}{where} is not valid YAML: {e}") from e
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path} is not UTF-8 text: {e}") from e


def read_jsonl(path: str | os.PathLike, what: str = "JSONL file", drop_truncated_tail: bool = False
               ) -> tuple[list[tuple[int, dict]], bool]:
    """Read a JSON-lines file as ``[(line number, object)]`` and whether a truncated last line was dropped.

    Blank lines are skipped. With ``drop_truncated_tail``, a last line without its newline (what a kill in the
    middle of a write leaves) is dropped instead of parsed; every other malformed line raises :class:`InputError`
    naming the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    data = path.read_bytes()
    truncated = False
    if drop_truncated_tail and data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        truncated = True
    rows = []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{what} {path}, line {n}: not a JSON object ({e})") from e
        if not isinstance(obj, dict):
            raise InputError(f"{what} {path}, line {n}: expected a JSON object, got {type(obj).__name__}")
        rows.append((n, obj))
    return rows, truncated


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(im, where: str = "image"):
    """An 8-bit RGB copy of a PIL image, converting explicitly by mode.

    16-bit integer images (``I;16*``) are scaled by 255/65535; 32-bit integer images (``I``) by their bit range
    (values up to 255 are taken as 8-bit, up to 65535 as 16-bit; larger values are refused); float images (``F``)
    are accepted when their values lie in [0, 1] (scaled by 255) or [0, 255] and refused otherwise. Images with an
    alpha channel or a transparent palette colour are composited on white. Every other mode goes through PIL's own
    ``convert("RGB")``.
    """
    import numpy as np
    from PIL import Image

    mode = im.mode
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        low = float(arr.min()) if arr.size else 0.0
        if low < 0:
            raise InputError(f"{where}: mode {mode} with negative values ({low:g}) cannot be read as an image")
        if mode == "F":
            if top <= 1.0:
                scale = 255.0
            elif top <= 255.0:
                scale = 1.0
            else:
                raise InputError(f"{where}: a floating-point image with values up to {top:g} has no known range; "
                                 "save it as an 8-bit or 16-bit PNG or a JPEG")
        elif mode in _SIXTEEN_BIT:
            scale = 255.0 / 65535.0
        elif top <= 255:
            scale = 1.0
        elif top <= 65535:
            scale = 255.0 / 65535.0
        else:
            raise InputError(f"{where}: a 32-bit integer image with values up to {top:g} has no known range; "
                             "save it as an 8-bit or 16-bit PNG or a JPEG")
        grey = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def check_image(path: str | os.PathLike, what: str = "image") -> Path:
    """Check that ``path`` is a readable image file without decoding all of it; raises :class:`InputError`."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        with Image.open(path) as im:
            im.verify()
    except UnidentifiedImageError:
        raise InputError(f"{what} {path} is not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{what} {path} is damaged or truncated: {e}") from None
    return path


def load_image(path: str | os.PathLike, what: str = "image"):
    """Open an image file as 8-bit RGB (see :func:`to_rgb`); a missing, truncated or non-image file raises
    :class:`InputError` naming it."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im, f"{what} {path}")
    except UnidentifiedImageError:
        raise InputError(f"{what} {path} is not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{what} {path} is damaged or truncated: {e}") from None
