"""The dist/ artifacts: one layout, one manifest, one verification, one lookup for every task."""

import hashlib
import json

import pytest

from toa import artifacts, export, package, sign
from toa.deploy import builds
from toa.errors import ToaError

RELEASE = "6.1.0-56-amd64"
SRCVERSION = "0123456789ABCDEF0123456"


def _put(dist, target, release, data=b"module", **manifest):
    artifact = artifacts.write(artifacts.directory(dist, target, release), data,
                               {"kernel_release": release, "target": target, "srcversion": SRCVERSION, **manifest})
    return artifact


def test_write_then_find_round_trips_the_layout_and_the_manifest(tmp_path):
    written = _put(tmp_path, "debian-12", RELEASE, vermagic=f"{RELEASE} SMP mod_unload")
    assert written.ko == tmp_path / "debian-12" / RELEASE / "toa.ko"
    manifest = json.loads(written.manifest_path.read_text())
    assert manifest["sha256"] == hashlib.sha256(b"module").hexdigest() and manifest["size"] == len(b"module")
    found = artifacts.find(tmp_path, RELEASE)
    assert (found.ko, found.release, found.target, found.sha256, found.srcversion) == (
        written.ko, RELEASE, "debian-12", manifest["sha256"], SRCVERSION)
    assert not list(tmp_path.rglob(".*"))  # no temp names left beside


def test_several_targets_built_the_same_release_the_hosts_target_wins(tmp_path):
    _put(tmp_path, "ubuntu-22.04", RELEASE, b"other")
    _put(tmp_path, "debian-12", RELEASE)
    assert artifacts.find(tmp_path, RELEASE, "ubuntu-22.04").target == "ubuntu-22.04"
    assert artifacts.find(tmp_path, RELEASE, "debian-12").target == "debian-12"
    assert artifacts.find(tmp_path, "6.1.0-55-amd64") is None
    with pytest.raises(ToaError, match="invalid kernel release"):
        artifacts.find(tmp_path, "*")


def test_every_task_refuses_a_damaged_module_the_same_way(tmp_path):
    """deploy checked toa.ko's sha256 against its manifest, package, sign and export did not: a
    module damaged after its build (a half copy, a hand edit) was packaged and shipped."""
    damaged = _put(tmp_path, "debian-12", RELEASE)
    damaged.ko.write_bytes(b"damaged")
    with pytest.raises(ToaError, match="does not match the sha256 in its manifest: rebuild") as error:
        artifacts.find(tmp_path, RELEASE)
    assert "\n" not in str(error.value)
    for lookup in (lambda: builds.artifacts.find(tmp_path, RELEASE), lambda: package.artifacts.find_all(tmp_path),
                   lambda: sign.artifacts.find_all(tmp_path), lambda: export.find_all(tmp_path)):
        with pytest.raises(ToaError, match="does not match the sha256"):
            lookup()
    with pytest.raises(ToaError, match="does not match the sha256"):
        package.build_packages("deb", tmp_path, out_dir=tmp_path / "packages")
    assert not (tmp_path / "packages").exists()


def test_a_manifest_of_another_kernel_or_without_a_srcversion_is_refused(tmp_path):
    folder = _put(tmp_path, "debian-13", "6.12.1-amd64").ko.parent
    (folder / "manifest.json").write_text(json.dumps({"kernel_release": "6.12.2-amd64"}))
    with pytest.raises(ToaError, match="does not describe a build for 6.12.1-amd64"):
        artifacts.find_all(tmp_path)
    folder = _put(tmp_path, "debian-12", RELEASE, srcversion="").ko.parent
    with pytest.raises(ToaError, match="no sha256 or srcversion"):
        artifacts.find(tmp_path, RELEASE)
    (folder / "manifest.json").write_text("{")
    with pytest.raises(ToaError, match="is unreadable"):
        artifacts.find(tmp_path, RELEASE)


def test_find_all_lists_each_release_once_and_names_what_is_missing(tmp_path):
    _put(tmp_path, "debian-12", RELEASE)
    _put(tmp_path, "rocky-9", "5.14.0-427.13.1.el9_4.x86_64")
    assert [a.release for a in artifacts.find_all(tmp_path)] == ["5.14.0-427.13.1.el9_4.x86_64", RELEASE]
    with pytest.raises(ToaError, match="no toa.ko for 6.1.0-1-amd64 under .*: run `invoke build --kernel 6.1.0-1-amd64`"):
        artifacts.find_all(tmp_path, ["6.1.0-1-amd64"])
    with pytest.raises(ToaError, match="no built toa.ko"):
        artifacts.find_all(tmp_path / "empty")


def test_an_up_to_date_build_is_whole_and_from_the_same_sources_and_image(tmp_path):
    folder = _put(tmp_path, "debian-12", RELEASE, source_hash="s", build_image={"id": "i"}).ko.parent
    assert artifacts.up_to_date(folder, RELEASE, "s", "i")
    assert not artifacts.up_to_date(folder, RELEASE, "other sources", "i")
    assert not artifacts.up_to_date(folder, RELEASE, "s", "another image")
    assert not artifacts.up_to_date(folder, "6.1.0-55-amd64", "s", "i")
    (folder / "toa.ko").write_bytes(b"half")
    assert not artifacts.up_to_date(folder, RELEASE, "s", "i")


@pytest.mark.network
def test_the_module_itself_is_checked_against_its_manifest(guest_kernels, tmp_path):
    """vermagic and srcversion read from the module (pyelftools), on a real module of a real Debian kernel."""
    from toa import ko

    tree = guest_kernels[0]
    modules = sorted((tree.modules_dir / "kernel" / "net").rglob("*.ko*"))
    data, info = next((data, info) for path in modules
                      if (info := ko.modinfo(data := ko.read_module(path))).get("srcversion"))
    good = _put(tmp_path, "debian-12", tree.release, data, vermagic=info["vermagic"], srcversion=info["srcversion"])
    assert good.verify().verify_module() is good
    stale = artifacts.Artifact(good.ko, {**good.manifest, "srcversion": "0" * 23})
    with pytest.raises(ToaError, match=f"has srcversion {info['srcversion']}, its manifest 0+: rebuild"):
        stale.verify_module()
    other = artifacts.Artifact(good.ko, {**good.manifest, "kernel_release": "6.1.0-1-amd64"})
    with pytest.raises(ToaError, match="has vermagic .* for 6.1.0-1-amd64: rebuild"):
        other.verify_module()


def _put_bpf(tmp_path, directory, object_data=b"object", loader_data=b"loader"):
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    (scratch / "o").write_bytes(object_data)
    (scratch / "l").write_bytes(loader_data)
    return artifacts.write_bpf(directory, scratch / "o", scratch / "l",
                               {"engine": "bpf", "source_hash": "s", "toolchain": {"clang": "c"}})


def test_the_bpf_engine_has_its_place_and_manifest_in_dist(tmp_path):
    directory = artifacts.bpf_directory(tmp_path / "dist")
    assert directory == tmp_path / "dist" / "bpf"
    written = _put_bpf(tmp_path, directory)
    assert (written.object.name, written.loader.name) == ("toa.bpf.o", "toa-bpf")
    assert written.loader.stat().st_mode & 0o777 == 0o755
    manifest = json.loads(written.manifest.read_text())
    assert manifest["object"]["sha256"] == hashlib.sha256(b"object").hexdigest() == written.object_sha256
    assert manifest["loader"]["sha256"] == hashlib.sha256(b"loader").hexdigest()
    assert artifacts.BpfArtifact.from_dir(directory) == written
    assert artifacts.bpf_up_to_date(directory, "s", {"clang": "c"}).skipped
    assert artifacts.bpf_up_to_date(directory, "other sources", {"clang": "c"}) is None
    assert artifacts.bpf_up_to_date(directory, "s", {"clang": "newer"}) is None


def test_a_damaged_or_missing_bpf_build_is_one_line(tmp_path):
    directory = artifacts.bpf_directory(tmp_path)
    with pytest.raises(ToaError, match="no BPF engine build in"):
        artifacts.BpfArtifact.from_dir(directory)
    _put_bpf(tmp_path, directory)
    (directory / "toa-bpf").write_bytes(b"another loader")
    with pytest.raises(ToaError, match="toa-bpf is missing or differs from .*rebuild the BPF engine"):
        artifacts.BpfArtifact.from_dir(directory)
    assert artifacts.bpf_up_to_date(directory, "s", {"clang": "c"}) is None
