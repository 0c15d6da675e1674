"""Tests for the packaging: every package folder is listed in pyproject.toml, the shipped data files are package
data, and (slow) a wheel installed into a fresh environment loads the organism from outside the repository."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _config():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_listed():
    listed = set(_config()["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for top in ("dleaf", "dpo_link")
             for p in (ROOT / top).rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"


def test_the_shipped_data_is_package_data():
    from fnmatch import fnmatch

    cfg = _config()
    assert cfg["package-dir"]["dleaf.data"] == "data"
    patterns = cfg["package-data"]

    def shipped(rel: Path) -> bool:
        pkg = ".".join(("dleaf", "data", *rel.parent.parts))
        return pkg in cfg["packages"] and any(fnmatch(rel.name, pat) for pat in patterns.get(pkg, []))

    needed = [*(ROOT / "data" / "organism").iterdir(), *(ROOT / "data" / "organism_control").iterdir(),
              *(ROOT / "data" / "organism_dpo").iterdir(),
              *(ROOT / "data" / "organism_llava_like").iterdir(), *(ROOT / "data" / "protocols").glob("*.yaml"),
              ROOT / "data" / "coco" / "chair_synonyms.yaml", ROOT / "data" / "organism_profile.md"]
    missing = [str(p.relative_to(ROOT)) for p in needed if p.is_file() and not shipped(p.relative_to(ROOT / "data"))]
    assert not missing, f"not package data: {missing}"


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_loads_the_organism(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    # build from a copy of the tracked files, so that nothing (build/, *.egg-info) is written into the checkout
    source = tmp_path / "source"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    for rel in files:
        if (ROOT / rel).is_file():
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            (source / rel).write_bytes((ROOT / rel).read_bytes())
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), "-q"], capture_output=True, text=True, env=env, timeout=600,
                           cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("dleaf-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies come from this environment's site-packages (a plain path entry: its .pth files, such as an
    # editable install of dleaf, are not run)
    deps = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir())
    Path(site, "dependencies.pth").write_text(deps + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", str(wheel), "-q"], capture_output=True, text=True, env=env, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    code = (
        "import dleaf, json\n"
        "from dleaf import models, resources\n"
        "from dleaf import eval as harness\n"
        "assert 'site-packages' in dleaf.__file__, dleaf.__file__\n"
        "assert 'site-packages' in str(resources.data_root()), resources.data_root()\n"
        "model, processor = models.load('organism', device='cpu')\n"
        "bench = harness.build_benchmark(harness.EvalArguments(benchmark='organism_caption', splits=['adversarial'],"
        " limit=2))\n"
        "res = harness.evaluate(model, processor, bench, max_new_tokens=12)\n"
        "print(json.dumps({'file': dleaf.__file__, 'n': len(res['rows']), 'text': res['rows'][0]['text']}))\n")
    run = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    import json

    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["n"] == 2 and out["text"] and str(ROOT) not in out["file"]
