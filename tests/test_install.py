"""An installed wheel finds its templates and build recipes exactly as a checkout does (package data):
the wheel is built from this tree and installed into a throwaway venv, then run from a folder that is
not the checkout. pip fetches only the build backend (setuptools, wheel) from its configured index;
toa's dependencies come from this Python (--no-deps, a venv with the system's site-packages)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from toa import resources

pytestmark = pytest.mark.network  # pip fetches the build backend from its index

REPO = Path(__file__).resolve().parent.parent
# What the wheel is built from: the project's metadata and the package, nothing a local run left behind.
BUILD_INPUTS = ("pyproject.toml", "README.md", "toa")
RUNTIME_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.o", "*.ko", "*.cmd", "probes.h")


def _run(argv, cwd, **kwargs):
    result = subprocess.run([str(part) for part in argv], cwd=cwd, capture_output=True, text=True, timeout=300,
                            **kwargs)
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    source, wheels, env = root / "source", root / "wheels", root / "venv"
    source.mkdir()
    for name in BUILD_INPUTS:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, source / name, **({"ignore": RUNTIME_IGNORE} if (REPO / name).is_dir() else {}))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", wheels, source], root)
    _run([sys.executable, "-m", "venv", "--system-site-packages", env], root)
    _run([env / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", *wheels.glob("toa-*.whl")], root)
    return env


def test_wheel_carries_every_resource_folder(venv):
    """Every file under the package's resource folders is in the installed package, and the installed
    toa (not this checkout, not the shared editable install) is the one that runs."""
    where = _run([venv / "bin" / "python", "-c", "import toa.resources as r; print(r.PACKAGE_DIR)"], venv.parent)
    installed = Path(where.stdout.strip())
    assert installed.is_relative_to(venv), installed
    for folder in (resources.TEMPLATES_DIR, resources.CONTAINERS_DIR, resources.MODULE_SOURCE,
                   resources.BPF_SOURCE, resources.GUEST_DIR):
        shipped = {path.relative_to(resources.PACKAGE_DIR) for path in folder.rglob("*")
                   if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".o", ".ko", ".cmd")
                   and path.name != "probes.h"}
        missing = sorted(str(path) for path in shipped if not (installed / path).is_file())
        assert shipped and not missing, f"not in the wheel: {missing}"


def test_installed_toa_renders_templates_and_plans_a_recipe_build(venv, tmp_path):
    toa_command = venv / "bin" / "toa"
    rendered = json.loads(_run([toa_command, "render", "--kernel", "5.15.0-52-generic", "--distro", "ubuntu-22.04",
                                "--out", tmp_path / "root", "--json"], tmp_path).stdout)
    files = {entry["path"]: entry for entry in rendered["items"][0]["files"]}
    assert "toa\n" in files["/etc/modules-load.d/toa.conf"]["content"]
    assert (tmp_path / "root" / "etc" / "modules-load.d" / "toa.conf").read_text() == \
        files["/etc/modules-load.d/toa.conf"]["content"]

    planned = json.loads(_run([toa_command, "build", "--kernel", "5.14.0-503.11.1.el9_5.x86_64", "--dry-run",
                               "--json"], tmp_path).stdout)["items"][0]
    assert (planned["method"], planned["recipe"]) == ("recipe", "containers/el")

    # The package metadata templates, rendered by the installed package itself.
    control = _run([venv / "bin" / "python", "-c",
                    "from toa import package; print(package.render_package_template("
                    "'common-control.j2', version='9.8.7', maintainer='someone'), end='')"], tmp_path)
    assert control.stdout.startswith("Package: toa-common\nVersion: 9.8.7\n")
