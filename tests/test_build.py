"""toa.build: the real module compiled in real Debian containers against real kernel headers."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import toa
from tests.cli import assert_one_line_error, toa as run_toa
from toa import build, debian, ko, targets
from toa.errors import ToaError

pytestmark = pytest.mark.docker


@pytest.fixture(scope="session")
def docker_client():
    return build.docker_client()


@pytest.fixture(scope="session")
def kernel_trees() -> dict[str, debian.KernelTree]:
    """The newest bookworm and trixie kernels, fetched once per run (cached across runs)."""
    return {suite: debian.fetch(debian.resolve_suite(suite)) for suite in ("bookworm", "trixie")}


@pytest.fixture(scope="session")
def builds(kernel_trees, docker_client, tmp_path_factory) -> dict[str, build.BuildResult]:
    out = tmp_path_factory.mktemp("dist")
    return {
        suite: build.build_module(tree.headers_dir, tree.release, suite, out)
        for suite, tree in kernel_trees.items()
    }


def _modinfo_field(module: Path, field: str) -> str:
    """kmod's own modinfo: an oracle independent of toa's pyelftools reading."""
    return subprocess.run(["modinfo", "-F", field, str(module)], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("suite", ["bookworm", "trixie"])
def test_build_writes_the_module_and_a_true_manifest(suite, builds, kernel_trees, docker_client):
    result, tree = builds[suite], kernel_trees[suite]
    assert result.ko == result.ko.parent.parent / tree.release / "toa.ko"
    assert result.ko.stat().st_uid == os.getuid()
    manifest = json.loads(result.manifest.read_text())
    data = result.ko.read_bytes()

    assert manifest["toa_version"] == toa.__version__
    assert manifest["kernel_release"] == tree.release
    assert manifest["suite"] == suite
    assert manifest["vermagic"].startswith(tree.release + " ")
    assert manifest["vermagic"].strip() == _modinfo_field(result.ko, "vermagic")
    assert manifest["srcversion"] == _modinfo_field(result.ko, "srcversion")
    assert _modinfo_field(result.ko, "name") == "toa"
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["size"] == len(data)

    image = docker_client.images.get(f"toa-build:debian-{suite}")
    assert manifest["build_image"] == {"id": image.id, "tag": f"toa-build:debian-{suite}"}
    # The compiler is the one the kernel itself was built with (CONFIG_CC_VERSION_TEXT names it).
    kernel_cc = re.search(r'^CONFIG_CC_VERSION_TEXT="([^"]+)"', (tree.headers_dir / ".config").read_text(), re.M)
    assert manifest["compiler"].split()[0] == kernel_cc.group(1).split()[0]
    assert manifest["compiler"].split()[-1] == kernel_cc.group(1).split()[-1]
    assert re.fullmatch(r"(x86_64-linux-gnu-)?gcc-[0-9]+ \(Debian .*\) [0-9.]+", manifest["compiler"])

    built_at = datetime.datetime.fromisoformat(manifest["built_at"])
    assert built_at.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.timezone.utc) - built_at) < datetime.timedelta(hours=1)
    assert "toa.ko" in (result.ko.parent / "build.log").read_text()


def test_a_second_build_reuses_the_images(builds, kernel_trees, docker_client, tmp_path):
    tree = kernel_trees["bookworm"]
    before = docker_client.images.get("toa-build:debian-bookworm").id
    result = build.build_module(tree.headers_dir, tree.release, "bookworm", tmp_path)
    assert docker_client.images.get("toa-build:debian-bookworm").id == before
    assert json.loads(result.manifest.read_text())["build_image"]["id"] == before


def test_broken_source_fails_with_the_compiler_error(kernel_trees, docker_client, tmp_path):
    source = tmp_path / "module"
    shutil.copytree(build.MODULE_SOURCE, source)
    with (source / "toa.c").open("a") as c_file:
        c_file.write("\nstatic int toa_broken_on_purpose = ;\n")
    tree = kernel_trees["bookworm"]
    with pytest.raises(ToaError) as error:
        build.build_module(tree.headers_dir, tree.release, "bookworm", tmp_path / "out", module_source=source)
    message = str(error.value)
    assert re.search(r"toa\.c:[0-9]+:[0-9]+: error: expected expression", message)
    assert "build.log" in message.splitlines()[0]
    assert len(message.splitlines()) <= build.LOG_TAIL_LINES + 1
    log = (tmp_path / "out" / tree.release / "build.log").read_text()
    assert "toa_broken_on_purpose" in log
    assert not (tmp_path / "out" / tree.release / "toa.ko").exists()


def test_headers_of_another_kernel_fail_the_vermagic_check(kernel_trees, docker_client, tmp_path):
    tree = kernel_trees["bookworm"]
    other = re.sub(r"-([0-9]+)-amd64$", lambda m: f"-{int(m.group(1)) - 1}-amd64", tree.release)
    with pytest.raises(ToaError, match=f"vermagic '{re.escape(tree.release)} "):
        build.build_module(tree.headers_dir, other, "bookworm", tmp_path)


def test_unreachable_engine_is_one_line(monkeypatch, kernel_trees, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-such.sock")
    tree = kernel_trees["bookworm"]
    with pytest.raises(ToaError) as error:
        build.build_module(tree.headers_dir, tree.release, "bookworm", tmp_path)
    assert str(error.value) == (
        f"Docker engine not reachable at unix://{tmp_path}/no-such.sock: install docker.io and start dockerd"
    )


def test_modinfo_reads_the_modinfo_section(builds):
    info = ko.modinfo(builds["bookworm"].ko)
    assert info["license"] == _modinfo_field(builds["bookworm"].ko, "license")
    assert info["name"] == "toa"


def test_not_a_module_is_refused(tmp_path):
    with pytest.raises(ToaError, match="no .modinfo section"):
        ko.modinfo(Path("/bin/true"))


# ---------------------------------------------------------------- the build task, as a user runs it


def test_build_task_prints_the_manifest_as_json(kernel_trees, docker_client, tmp_path):
    result = run_toa("build", "--suite", "bookworm", "--out", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    release = kernel_trees["bookworm"].release
    assert printed["kernel_release"] == release
    assert printed["ko"] == str(tmp_path / release / "toa.ko")
    assert json.loads((tmp_path / release / "manifest.json").read_text()) == {
        key: value for key, value in printed.items() if key not in ("ko", "manifest")
    }


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--kernel", "3.10.0-693"], "base image centos:7 is not here and cannot be pulled"),
        (["--kernel", "2.6.32-754.el6.x86_64"], "no container recipe for CentOS 6"),
        (["--kernel", "4.4.0-210"], "ambiguous"),
        (["--kernel", "5.4.0-150-generic", "--distro", "sles-15"], "not a sles-15 kernel"),
        (["--kernel", "6.1.0-56-amd64;reboot"], "invalid kernel release"),
        (["--suite", "hamm"], "unknown Debian suite"),
        ([], "give --kernel RELEASE or --suite SUITE"),
    ],
)
def test_build_task_refuses_with_one_line(args, fragment, tmp_path):
    result = run_toa("build", *args, "--out", str(tmp_path))
    assert result.returncode == 2
    assert_one_line_error(result, fragment)
    assert not any(tmp_path.iterdir())


def test_recipe_path_builds_for_real_on_a_local_base_image(docker_client, tmp_path):
    """The non-Debian path (containers/<recipe>, build arguments, offline compile, vermagic check,
    manifest) run for real: the ubuntu/ recipe installs linux-headers-<release> with apt, so on a
    Debian base image it builds against a real Debian kernel's headers package."""
    import functools

    debian.kernels_of_suite("bookworm")  # refreshes the index
    main_pocket = debian._pocket_indexes(debian.SUITES["bookworm"])["bookworm"]
    kernels = [k for k in debian.kernels_in_index("bookworm", main_pocket) if debian.is_generic_flavour(k.release)]
    release = max(kernels, key=functools.cmp_to_key(lambda a, b: debian.compare_versions(a.version, b.version))).release
    base = build.base_image(docker_client, "bookworm").tags[0]

    result = build.build_for_target(targets.get("ubuntu-22.04"), release, tmp_path, base=base)

    manifest = json.loads(result.manifest.read_text())
    assert (manifest["target"], manifest["base_image"], manifest["kernel_release"]) == ("ubuntu-22.04", base, release)
    assert _modinfo_field(result.ko, "vermagic").split()[0] == release
    assert manifest["build_image"]["tag"] == f"toa-build:ubuntu-22.04-{release}"


def test_recipe_build_arguments_follow_the_kernel():
    centos = build.recipe_build_args(targets.get("centos-7"), "3.10.0-693.21.1.el7.x86_64")
    assert centos == {"BASE": "centos:7", "KERNEL_RELEASE": "3.10.0-693.21.1.el7.x86_64", "CENTOS_VAULT": "7.4.1708"}
    rocky = build.recipe_build_args(targets.get("rocky-8"), "4.18.0-513.5.1.el8_9.x86_64")
    assert rocky["REPO_URL"] == "https://dl.rockylinux.org/vault/rocky/8.9/AppStream/x86_64/os/"
    assert rocky["REPO_GPGKEY"].endswith("RPM-GPG-KEY-rockyofficial")
    assert build.recipe_build_args(targets.get("fedora-coreos"), "6.5.6-200.fc38.x86_64")["BASE"].endswith(":38")
    with pytest.raises(ToaError, match="no container recipe for CentOS 6"):
        build.build_for_target(targets.get("centos-6"), "2.6.32-754.el6.x86_64")
