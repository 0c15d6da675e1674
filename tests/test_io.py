"""Tests for dleaf.io: umask-honouring atomic writes, strict JSON, JSON lines, images converted by mode."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from dleaf import io
from dleaf.io import InputError


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_honour_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        for write, arg in ((io.write_text_atomic, "x"), (io.write_json_atomic, {"a": 1}),
                           (io.write_bytes_atomic, b"x")):
            path = write(arg, tmp_path / f"f{mask}" / write.__name__)
            assert os.stat(path).st_mode & 0o777 == mode
    finally:
        os.umask(old)
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary file left


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    path = io.write_json_atomic({"a": 1}, tmp_path / "m.json")
    with pytest.raises(TypeError):
        io.write_json_atomic({"a": object()}, path)
    assert json.loads(path.read_text()) == {"a": 1} and len(list(tmp_path.iterdir())) == 1


def test_strict_json():
    obj = {"nan": math.nan, "inf": [math.inf, -math.inf], "np": np.float32(0.5), "arr": np.arange(3),
           "int": np.int64(7), "set": {"b", "a"}, "nested": {"x": (1, float("nan"))}, 3: "key"}
    text = io.to_json(obj)
    assert io.loads_strict(text) == {"nan": None, "inf": [None, None], "np": 0.5, "arr": [0, 1, 2], "int": 7,
                                     "set": ["a", "b"], "nested": {"x": [1, None]}, "3": "key"}
    for bad in ('{"a": NaN}', "[Infinity]", "-Infinity"):
        with pytest.raises(ValueError, match="not valid JSON"):
            io.loads_strict(bad)
    assert io.json_line({"a": math.nan}) == '{"a": null}\n'


def test_read_json_and_jsonl_name_file_and_line(tmp_path):
    p = tmp_path / "g.jsonl"
    p.write_text('{"id": 1}\n\n{"id": 2}\n{"id": 3')
    rows, truncated = io.read_jsonl(p, drop_truncated_tail=True)
    assert [r["id"] for _, r in rows] == [1, 2] and truncated and [n for n, _ in rows] == [1, 3]
    with pytest.raises(InputError, match=r"g\.jsonl, line 4"):
        io.read_jsonl(p)
    p.write_text('{"id": 1}\n[1]\n')
    with pytest.raises(InputError, match="line 2: expected a JSON object"):
        io.read_jsonl(p)
    q = tmp_path / "c.json"
    q.write_text('{\n "a": 1,\n}')
    with pytest.raises(InputError, match=r"c\.json is not valid JSON: line 3"):
        io.read_json(q)
    with pytest.raises(InputError, match="not found"):
        io.read_json(tmp_path / "nope.json")


def test_read_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text("- kind: diffuse\n  layers: [1, 2]\n")
    assert io.read_yaml(p) == [{"kind": "diffuse", "layers": [1, 2]}]
    p.write_text("a: 1\nb: [2, 3\nc: 4\n")
    with pytest.raises(InputError, match=r"^grid .*g\.yaml, line \d+ is not valid YAML"):
        io.read_yaml(p, "grid")
    with pytest.raises(InputError, match=r"^grid not found: .*nope\.yaml$"):
        io.read_yaml(tmp_path / "nope.yaml", "grid")


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    with Image.open(tmp_path / "ramp16.png") as raw:
        assert raw.mode.startswith("I")
        clipped = np.asarray(raw.convert("RGB"))  # what a bare convert does: nearly all white
    assert clipped.mean() > 240
    im = io.load_image(tmp_path / "ramp16.png")
    arr = np.asarray(im)
    assert im.mode == "RGB" and arr.shape == (64, 64, 3)
    expected = np.rint(ramp.astype(float) * 255 / 65535)
    assert np.abs(arr[..., 0] - expected).max() <= 1
    assert abs(arr.mean() - 127.5) < 1


def test_other_modes(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red: white once composited
    assert np.asarray(io.to_rgb(rgba)).tolist()[0][0] == [255, 255, 255]
    half = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    assert abs(int(np.asarray(io.to_rgb(half))[0, 0, 0]) - 127) <= 1
    assert np.asarray(io.to_rgb(Image.fromarray(np.full((2, 2), 0.5, np.float32), "F")))[0, 0, 0] == 128
    with pytest.raises(InputError, match="no known range"):
        io.to_rgb(Image.fromarray(np.full((2, 2), 900.0, np.float32), "F"))
    eight = Image.fromarray(np.full((2, 2), 200, np.int32), "I")
    assert np.asarray(io.to_rgb(eight))[0, 0, 0] == 200
    assert io.to_rgb(Image.new("CMYK", (2, 2))).mode == "RGB"
    assert io.to_rgb(Image.new("1", (2, 2), 1)).getpixel((0, 0)) == (255, 255, 255)


def test_bad_image_files(tmp_path):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    assert io.load_image(tmp_path / "ok.png").getpixel((0, 0)) == (1, 2, 3)
    assert io.check_image(tmp_path / "ok.png") == tmp_path / "ok.png"
    with pytest.raises(InputError, match="not found"):
        io.load_image(tmp_path / "missing.png")
    with pytest.raises(InputError, match="not an image file"):
        io.load_image(tmp_path / "text.jpg")
    with pytest.raises(InputError, match="not an image file"):
        io.check_image(tmp_path / "text.jpg")
    with pytest.raises(InputError, match="damaged or truncated"):
        io.load_image(tmp_path / "cut.png")
