"""toa.export: KMM kmod images built in the real engine and read back, the Module manifest checked
against KMM's own CRD schema, and the Ansible role run with ansible-core against the QEMU fleet."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import yaml

from tests.cli import assert_one_line_error, json_items, toa
from toa import build, debian, export, render
from toa.errors import ToaError

KMM_CRD_NAME = "kmm.sigs.x-k8s.io_modules.yaml"


def _kmm_crd() -> Path | None:
    """KMM's Module CRD (not part of the project): $TOA_SCHEMAS_DIR, else shared/schemas/ beside
    the checkout or one of its parents."""
    where = [Path(os.environ["TOA_SCHEMAS_DIR"])] if os.environ.get("TOA_SCHEMAS_DIR") else []
    where += [parent / "shared" / "schemas" for parent in Path(__file__).resolve().parents]
    return next((folder / KMM_CRD_NAME for folder in where if (folder / KMM_CRD_NAME).is_file()), None)


def kmm_schema() -> dict:
    crd_path = _kmm_crd()
    if crd_path is None:
        pytest.skip(f"KMM's Module CRD ({KMM_CRD_NAME}) is not in $TOA_SCHEMAS_DIR or a shared/schemas/ "
                    "beside the checkout: put it there to validate the Module against it")
    crd = yaml.safe_load(crd_path.read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    return version["schema"]["openAPIV3Schema"]


def assert_valid_module(manifest: dict) -> None:
    import jsonschema

    jsonschema.validate(manifest, kmm_schema())


@pytest.fixture(scope="module")
def two_kernels() -> list[str]:
    """Two kernels of different series, one with a `+` in its release (not a tag character)."""
    return [debian.resolve_suite("bookworm").release, debian.resolve_suite("trixie").release]


@pytest.fixture(scope="module")
def dist(tmp_path_factory, two_kernels) -> Path:
    out = tmp_path_factory.mktemp("dist")
    for release in two_kernels:
        build.build_kernel(release, out_dir=out)
    return out


def _file_in_image(image_reference: str, path: str) -> bytes:
    client = build.docker_client()
    container = client.containers.create(image_reference, ["true"], network_disabled=True)
    try:
        stream, _ = container.get_archive(path)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            return tar.extractfile(tar.getmembers()[0]).read()
    finally:
        container.remove(force=True)


def _run_in_image(image_reference: str, *argv: str) -> str:
    return build.docker_client().containers.run(image_reference, list(argv), remove=True,
                                                network_disabled=True).decode()


@pytest.mark.docker
@pytest.mark.network
def test_kmm_export_builds_one_image_per_kernel_and_a_module_that_maps_each(dist, two_kernels, tmp_path):
    out = tmp_path / "kmm"
    result = toa("export", "kmm", "--out", str(out), "--dist", str(dist), "--registry", "registry.example.com/kmods",
                 "--option", "trusted=100.64.0.0/10", "--json")
    assert result.returncode == 0, result.stderr
    [printed] = json_items(result, "export")
    manifest = yaml.safe_load((out / "module.yaml").read_text())
    assert_valid_module(manifest)
    container = manifest["spec"]["moduleLoader"]["container"]
    assert container["modprobe"] == {"moduleName": "toa", "dirName": "/opt", "parameters": ["trusted=100.64.0.0/10"]}
    assert sorted(image["kernel"] for image in printed["images"]) == sorted(two_kernels)
    for release in two_kernels:
        reference = export.image_for(manifest, release)
        assert reference == f"registry.example.com/kmods/toa-kmod:{export.image_tag(release)}"
        built = next(dist.glob(f"*/{release}/toa.ko")).read_bytes()
        # exactly the built module, where KMM's worker looks, indexed so that modprobe -d /opt finds it
        assert _file_in_image(reference, f"/opt/lib/modules/{release}/toa.ko") == built
        assert "toa.ko" in _file_in_image(reference, f"/opt/lib/modules/{release}/modules.dep").decode()
        shown = _run_in_image(reference, "modprobe", "-d", "/opt", "-S", release, "--show-depends", "toa")
        assert shown.strip() == f"insmod /opt/lib/modules/{release}/toa.ko"
        labels = build.docker_client().images.get(reference).labels
        assert labels["io.toa.sha256"] == hashlib.sha256(built).hexdigest()
        for tool in ("cp", "sleep", "modprobe"):
            _run_in_image(reference, "sh", "-c", f"command -v {tool}")
    assert export.image_for(manifest, "6.1.0-1-amd64") is None
    assert "docker push registry.example.com/kmods/toa-kmod:" in (out / "module.yaml").read_text()


def _image(release: str) -> export.KmodImage:
    return export.KmodImage(release, f"registry.example.com/toa-kmod:{export.image_tag(release)}", "0" * 64, "sha256:0")


def test_module_manifest_with_in_cluster_signing_validates_against_the_crd():
    images = [_image("6.1.0-56-amd64"), _image("6.12.90+deb13-amd64")]
    manifest = export.module_manifest(images, namespace="kmm-operator-system", options={"kinds": "254,200"},
                                      selector={"node-role.kubernetes.io/worker": ""},
                                      sign_secrets=("toa-signing-key", "toa-signing-cert"))
    assert_valid_module(manifest)
    [first, second] = manifest["spec"]["moduleLoader"]["container"]["kernelMappings"]
    assert first["sign"]["unsignedImage"] == "registry.example.com/toa-kmod:6.1.0-56-amd64"
    assert first["containerImage"] == "registry.example.com/toa-kmod:6.1.0-56-amd64-signed"
    assert second["sign"]["filesToSign"] == ["/opt/lib/modules/6.12.90+deb13-amd64/toa.ko"]
    assert export.image_for(manifest, "6.12.90+deb13-amd64") == "registry.example.com/toa-kmod:6.12.90_deb13-amd64-signed"
    assert manifest["spec"]["selector"] == {"node-role.kubernetes.io/worker": ""}


def test_a_manifest_the_crd_refuses_is_caught_by_the_schema_check():
    import jsonschema

    manifest = export.module_manifest([_image("6.1.0-56-amd64")])
    del manifest["spec"]["selector"]  # required by the CRD
    with pytest.raises(jsonschema.ValidationError):
        assert_valid_module(manifest)


@pytest.mark.parametrize("args, fragment", [
    (["kmm", "--out", "OUT"], "give --registry"),
    (["kmm", "--out", "OUT", "--registry", "bad registry"], "invalid --registry"),
    (["kmm", "--out", "OUT", "--registry", "r.example.com", "--namespace", "Bad_NS"], "invalid --namespace"),
    (["kmm", "--out", "OUT", "--registry", "r.example.com", "--option", "trusted=10.0.0.1/8"], "did you mean"),
    (["kmm", "--out", "OUT", "--registry", "r.example.com", "--selector", "no-equals"], "invalid --selector"),
    (["kmm", "--out", "OUT", "--registry", "r.example.com", "--sign-key-secret", "k"], "give both"),
    (["kmm", "--out", "OUT", "--registry", "r.example.com"], "no built toa.ko under"),
    (["helm", "--out", "OUT"], "give the engine to export to"),
    (["kmm"], "give --out DIR"),
])
def test_export_refuses_with_one_line(args, fragment, tmp_path):
    args = [str(tmp_path / "out") if arg == "OUT" else arg for arg in args]
    assert_one_line_error(toa("export", *args, "--dist", str(tmp_path / "empty")), fragment)
    assert not (tmp_path / "out").exists()


def test_export_help_is_help():
    result = toa("export", "--help")
    assert result.returncode == 0 and "--registry" in result.stdout


def test_selectors_and_tags():
    assert export.parse_selector(["node-role.kubernetes.io/worker=", "toa=yes"]) == {
        "node-role.kubernetes.io/worker": "", "toa": "yes"}
    assert export.image_tag("6.12.90+deb13-amd64") == "6.12.90_deb13-amd64"
    with pytest.raises(ToaError, match="invalid --registry"):
        export.kmod_reference("reg;istry", "6.1.0-56-amd64")


# ---------------------------------------------------------------- Ansible, against the QEMU fleet


def _fake_dist(tmp_path: Path) -> Path:
    folder = tmp_path / "dist" / "debian-12" / "6.1.0-56-amd64"
    folder.mkdir(parents=True)
    (folder / "toa.ko").write_bytes(b"\x7fELF")
    (folder / "manifest.json").write_text(json.dumps(
        {"kernel_release": "6.1.0-56-amd64", "target": "debian-12", "srcversion": "0" * 23,
         "sha256": hashlib.sha256(b"\x7fELF").hexdigest()}))
    return tmp_path / "dist"


def test_the_exported_role_passes_ansible_lint(tmp_path):
    import shutil
    import subprocess

    lint = shutil.which("ansible-lint")
    assert lint, "ansible-lint not installed: pip install -e '.[test]'"
    out = tmp_path / "out"
    export.ansible(_fake_dist(tmp_path), out, options={"trusted": "10.0.0.0/8"})
    result = subprocess.run([lint, "--offline", "--profile", "production"], cwd=out, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "ANSIBLE_HOME": str(tmp_path / ".ansible"),
                                          "NO_COLOR": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    defaults = yaml.safe_load((out / "roles/toa/defaults/main.yml").read_text())
    assert defaults == {"toa_kinds": "", "toa_trusted": "10.0.0.0/8"}


def test_the_role_carries_the_module_sources_as_one_archive_the_same_each_export(tmp_path):
    """The kernel hooks' sources in one tar (Ansible copied a folder file by file): each source's bytes,
    root's, 0644 in 0755 folders, and the same archive from a second export, so that a host's unchanged
    tree reads as unchanged."""
    archives = []
    for out in (tmp_path / "one", tmp_path / "two"):
        export.ansible(_fake_dist(tmp_path / out.name), out)
        archives.append((out / "roles/toa/files" / export.HOOK_SOURCES_ARCHIVE).read_bytes())
    assert archives[0] == archives[1]
    with tarfile.open(fileobj=io.BytesIO(archives[0])) as tar:
        members = {member.name: member for member in tar.getmembers()}
        sources = render.module_source_files()
        assert {name for name, member in members.items() if member.isfile()} == {path.as_posix() for path in sources}
        for path in sources:
            assert tar.extractfile(members[path.as_posix()]).read() == (render.MODULE_SOURCE / path).read_bytes()
        assert {(m.uid, m.gid, m.mode) for m in members.values() if m.isfile()} == {(0, 0, 0o644)}
        assert {(m.uid, m.gid, m.mode) for m in members.values() if m.isdir()} == {(0, 0, 0o755)}
    assert not (tmp_path / "one/roles/toa/files/toa-kmod").exists()


def test_a_build_without_a_target_is_one_line(tmp_path):
    dist = _fake_dist(tmp_path)
    manifest = dist / "debian-12" / "6.1.0-56-amd64" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "target": None}))
    assert_one_line_error(toa("export", "ansible", "--out", str(tmp_path / "out"), "--dist", str(dist)),
                          "names no target")


@pytest.fixture(scope="module")
def fleet_dist(guest_kernels, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fleet-dist")
    for tree in guest_kernels:
        build.build_kernel(tree.release, out_dir=out)
    return out


@pytest.fixture(scope="module")
def fleet(guest_kernels, tmp_path_factory):
    """Two guests: the newest bookworm and bullseye kernels."""
    from toa import guests

    with guests.fleet(guest_kernels, tmp_path_factory.mktemp("fleet")) as running:
        yield running


def _inventory(path: Path, fleet, group_vars: dict[str, str]) -> Path:
    from toa import guests

    known_hosts = path.with_name("known_hosts")
    known_hosts.write_text("".join(guest.known_hosts.read_text() for guest in fleet))
    ssh_args = f"-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes"
    lines = ["[toa:children]", "first", "rest", "", "[first]", f"{fleet[0].name} ansible_port={fleet[0].port}",
             "", "[first:vars]", *(f"{k}={v}" for k, v in group_vars.items()), "", "[rest]"]
    lines += [f"{guest.name} ansible_port={guest.port}" for guest in fleet[1:]]
    lines += ["", "[toa:vars]", f"ansible_host={guests.LOOPBACK}", "ansible_user=root",
              f"ansible_ssh_private_key_file={fleet[0].key_path}", f"ansible_ssh_common_args='{ssh_args}'"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _playbook(role_dir: Path, inventory: Path, *extra: str):
    import shutil
    import subprocess

    playbook = shutil.which("ansible-playbook")
    assert playbook, "ansible-playbook not installed: pip install ansible-core"
    env = {**os.environ, "ANSIBLE_HOME": str(role_dir / ".ansible"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_HOST_KEY_CHECKING": "True", "ANSIBLE_RETRY_FILES_ENABLED": "False"}
    result = subprocess.run([playbook, "-i", str(inventory), str(role_dir / "playbook.yml"), *extra],
                            capture_output=True, text=True, env=env, timeout=900, stdin=subprocess.DEVNULL)
    recap = {}
    for line in result.stdout.split("PLAY RECAP")[-1].splitlines():
        words = line.split()
        if len(words) > 2 and words[1] == ":":
            recap[words[0]] = {k: int(v) for k, v in (word.split("=") for word in words[2:])}
    return result, recap


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.network
@pytest.mark.ssh
@pytest.mark.slow
# four playbook runs on two TCG guests, each task a Python run in the guest: 10.5 minutes on a 2-core
# Xeon (2026-12-01; 29 when the role copied the hooks' 20 source files one by one), more beside other QEMU work
@pytest.mark.timeout(2400)
def test_the_exported_role_installs_loads_and_keeps_toa_on_the_fleet(fleet, fleet_dist, tmp_path):
    out = tmp_path / "ansible"
    result = toa("export", "ansible", "--out", str(out), "--dist", str(fleet_dist), "--json")
    assert result.returncode == 0, result.stderr
    assert sorted(json_items(result, "export")[0]["kernels"]) == sorted(guest.release for guest in fleet)
    inventory = _inventory(tmp_path / "inventory.ini", fleet, {"toa_kinds": "254,200",
                                                               "toa_trusted": "10.0.2.0/24,fd00::/8"})

    # --check on fresh hosts: reports what it would do, changes nothing
    checked, recap = _playbook(out, inventory, "--check", "--diff")
    assert checked.returncode == 0, checked.stdout[-3000:]
    for guest in fleet:
        assert recap[guest.name]["failed"] == 0 and recap[guest.name]["changed"] > 0
        assert guest.run("ls /sys/module/toa /lib/modules/$(uname -r)/extra/toa.ko /etc/modules-load.d/toa.conf "
                         "2>/dev/null | wc -l").strip() == "0"

    applied, recap = _playbook(out, inventory)
    assert applied.returncode == 0, applied.stdout[-3000:]
    for guest in fleet:
        built = next(fleet_dist.glob(f"*/{guest.release}/toa.ko"))
        srcversion = json.loads(built.with_name("manifest.json").read_text())["srcversion"]
        assert guest.run("cat /sys/module/toa/srcversion").strip() == srcversion
        assert guest.run("sha256sum /lib/modules/$(uname -r)/extra/toa.ko").split()[0] == \
            hashlib.sha256(built.read_bytes()).hexdigest()
        assert guest.run("cat /etc/modules-load.d/toa.conf").splitlines()[-1] == "toa"
        assert guest.run("ls /lib/modules/$(uname -r)/extra/").split() == ["toa.ko"]  # no backup left behind
        # the kernel hooks' sources, as deploy installs them: the next kernel gets toa.ko built from them
        sources = render.module_source_files()
        listed = guest.run(f"cd {render.hook_source_dir()} && sha256sum {' '.join(map(str, sources))}")
        assert {line.split()[1]: line.split()[0] for line in listed.splitlines()} == {
            str(path): hashlib.sha256((render.MODULE_SOURCE / path).read_bytes()).hexdigest() for path in sources}
    # per-group options: the first group's kinds, the module's defaults for the rest
    assert fleet[0].run("cat /sys/module/toa/parameters/kinds").strip() == "254,200"
    assert fleet[0].run("cat /sys/module/toa/parameters/trusted").strip() == "10.0.2.0/24,fd00::/8"
    assert "options toa kinds=254,200 trusted=10.0.2.0/24,fd00::/8" in fleet[0].run("cat /etc/modprobe.d/toa.conf")
    assert fleet[1].run("cat /sys/module/toa/parameters/kinds").strip() == "254,253"
    assert fleet[1].run("cat /sys/module/toa/parameters/trusted").strip() == ""

    again, recap = _playbook(out, inventory)
    assert again.returncode == 0, again.stdout[-3000:]
    assert all(recap[guest.name]["changed"] == 0 for guest in fleet), recap

    # a module the kernel refuses to load (a kind it rejects) fails that host alone and leaves toa as it was
    inventory = _inventory(tmp_path / "bad.ini", fleet, {"toa_kinds": "254,1", "toa_trusted": "10.0.2.0/24,fd00::/8"})
    failed, recap = _playbook(out, inventory)
    assert failed.returncode != 0
    assert recap[fleet[0].name]["failed"] == 1 and recap[fleet[1].name]["failed"] == 0
    assert "rolled back" in failed.stdout
    assert fleet[0].run("cat /sys/module/toa/parameters/kinds").strip() == "254,200"
    assert fleet[0].run("cat /sys/module/toa/parameters/trusted").strip() == "10.0.2.0/24,fd00::/8"
    assert "options toa kinds=254,200 trusted" in fleet[0].run("cat /etc/modprobe.d/toa.conf")
