"""toa.package: the DKMS package installed and rebuilt by Debian's real dkms in a Debian container,
the kmod .deb installed with dpkg where modprobe finds it, the .rpm read back with rpm's own tools."""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

import toa
from tests.cli import assert_one_line_error, json_items, toa as run_toa
from toa import artifacts, build, debian, package, preflight
from toa.deploy.facts import FACTS_END, facts_command, parse_facts
from toa.errors import ToaError

DKMS_IMAGE = "toa-test:dkms-bookworm"


@pytest.fixture(scope="module")
def first_kernel() -> str:
    """The kernel whose headers the DKMS container starts with: bookworm's newest."""
    return debian.resolve_suite("bookworm").release


@pytest.fixture(scope="module")
def second_kernel() -> str:
    """The kernel a headers upgrade brings in later: the newer series bookworm-security carries."""
    return debian.resolve_suite("bookworm-security").release


@pytest.fixture(scope="module")
def dist(tmp_path_factory, first_kernel, second_kernel) -> Path:
    """A dist/ with the real module built for FIRST_KERNEL and SECOND_KERNEL."""
    out = tmp_path_factory.mktemp("dist")
    for release in (first_kernel, second_kernel):
        build.build_kernel(release, out_dir=out)
    return out


@pytest.fixture(scope="module")
def dkms_image(first_kernel, second_kernel):
    """Debian bookworm with Debian's dkms and FIRST_KERNEL's headers installed; SECOND_KERNEL's
    headers are downloaded only, so that a container installs them offline later."""
    client = build.docker_client()
    base = build.base_image(client, "bookworm")
    dockerfile = f"""FROM {base.tags[0]}
ENV DEBIAN_FRONTEND=noninteractive
RUN echo 'deb {debian.mirror_for("security")} bookworm-security main' > /etc/apt/sources.list.d/security.list \\
    && apt-get update \\
    && apt-get install -y --no-install-recommends dkms dwarves rpm linux-headers-{first_kernel} \\
    && apt-get install -y --no-install-recommends --download-only linux-headers-{second_kernel}
"""
    image, _ = client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=DKMS_IMAGE, rm=True, forcerm=True,
                                   pull=False)
    return image


class Container:
    """A throwaway container of IMAGE with the packages at /pkgs; run() executes one command in it."""

    def __init__(self, image, packages: Path):
        self._container = build.docker_client().containers.run(
            image.id, ["sleep", "infinity"], detach=True, network_disabled=True,
            volumes={str(packages): {"bind": "/pkgs", "mode": "ro"}},
        )

    def run(self, *argv: str) -> tuple[int, str]:
        result = self._container.exec_run(list(argv), environment={"DEBIAN_FRONTEND": "noninteractive"})
        return result.exit_code, result.output.decode(errors="replace")

    def ok(self, *argv: str) -> str:
        code, output = self.run(*argv)
        assert code == 0, f"{' '.join(argv)} failed ({code}):\n{output[-3000:]}"
        return output

    def remove(self):
        self._container.remove(force=True)


@pytest.fixture
def container_of(dkms_image):
    made = []

    def start(packages: Path) -> Container:
        made.append(Container(dkms_image, packages))
        return made[-1]

    yield start
    for container in made:
        container.remove()


@pytest.mark.docker
@pytest.mark.network
def test_dkms_package_builds_for_the_headers_and_again_after_a_headers_upgrade(
        tmp_path, container_of, first_kernel, second_kernel):
    deb, rpm, tarball = package.build_packages("dkms", out_dir=tmp_path)
    version = toa.__version__
    assert deb.name == f"toa-dkms_{version}_all.deb" and tarball.name == f"toa-{version}-dkms.tar.gz"
    assert rpm.name == f"toa-dkms-{version}-1.noarch.rpm"
    container = container_of(tmp_path)

    container.ok("dpkg", "-i", f"/pkgs/{deb.name}")
    status = container.ok("dkms", "status")
    assert f"toa/{version}, {first_kernel}, x86_64: installed" in status
    assert second_kernel not in status
    conf = container.ok("cat", f"/usr/src/toa-{version}/dkms.conf")
    assert 'MAKE[0]="make KDIR=/lib/modules/${kernelver}/build"' in conf and 'AUTOINSTALL="yes"' in conf
    info = container.ok("modinfo", "-k", first_kernel, "toa")
    assert f"vermagic:       {first_kernel} " in info

    # A kernel upgrade: the new headers' postinst hook has DKMS build toa for that kernel too.
    container.ok("apt-get", "install", "-y", "--no-install-recommends", "--no-download", f"linux-headers-{second_kernel}")
    status = container.ok("dkms", "status")
    assert f"toa/{version}, {first_kernel}, x86_64: installed" in status
    assert f"toa/{version}, {second_kernel}, x86_64: installed" in status
    assert f"vermagic:       {second_kernel} " in container.ok("modinfo", "-k", second_kernel, "toa")

    # Removing the package takes toa out of DKMS for every kernel.
    container.ok("dpkg", "-r", "toa-dkms")
    assert "toa" not in container.ok("dkms", "status")
    assert container.run("modinfo", "-k", first_kernel, "toa")[0] != 0

    # The plain tarball loads into DKMS the way `dkms mktarball --source-only` tarballs do.
    container.ok("dkms", "ldtarball", f"/pkgs/{tarball.name}")
    assert f"toa/{version}: added" in container.ok("dkms", "status")


@pytest.mark.docker
@pytest.mark.network
def test_the_kernel_hook_builds_toa_for_a_kernel_whose_headers_come_later(dist, tmp_path, container_of, first_kernel,
                                                                          second_kernel):
    """toa-common's hooks, run by Debian's own linux-headers postinst (header_postinst.d): a kernel
    without toa.ko gets one built from the sources toa-common carries, indexed for that kernel;
    DKMS is installed here but does not manage toa, so the hook builds."""
    out = tmp_path / "packages"
    common, *kmods = package.build_packages("deb", dist, [first_kernel], out)
    container = container_of(out)
    container.ok("dpkg", "-i", f"/pkgs/{common.name}", *(f"/pkgs/{deb.name}" for deb in kmods))
    source_dir = f"/usr/src/toa-kmod-{toa.__version__}"
    assert container.ok("dpkg", "-S", f"{source_dir}/toa.c").startswith("toa-common:")
    assert "/etc/kernel/header_postinst.d/zz-toa" in container.ok("dpkg", "-L", "toa-common")
    assert f"{source_dir}/toa.c" not in container.ok("cat", "/var/lib/dpkg/info/toa-common.conffiles")

    installed = container.ok("apt-get", "install", "-y", "--no-install-recommends", "--no-download",
                             f"linux-headers-{second_kernel}")
    assert f"toa: built toa.ko for kernel {second_kernel} from {source_dir}" in installed
    assert f"/lib/modules/{second_kernel}/extra/toa.ko" in container.ok("modinfo", "-k", second_kernel, "-n", "toa")
    assert f"vermagic:       {second_kernel} " in container.ok("modinfo", "-k", second_kernel, "toa")
    assert container.ok("sh", "-c", "ls -a /tmp; ls -a /lib/modules/*/extra").count("toa-build.") == 0
    # run again (a reinstall of the headers): toa.ko is there, nothing to say
    assert "toa:" not in container.ok("run-parts", "--report", f"--arg={second_kernel}", "/etc/kernel/header_postinst.d")

    # a build that fails says why, keeps the log, and never fails the kernel's installation
    container.ok("rm", f"/lib/modules/{second_kernel}/extra/toa.ko")
    container.ok("sh", "-c", f"echo '#error broken on purpose' >> {source_dir}/toa_compat.h")
    failed = container.ok("run-parts", "--report", f"--arg={second_kernel}", "/etc/kernel/postinst.d")
    assert f"toa: kernel {second_kernel} has no toa.ko" in failed and "broken on purpose" in failed
    assert "broken on purpose" in container.ok("cat", f"/var/log/toa-build-{second_kernel}.log")
    # where DKMS manages toa, the hook leaves the building to DKMS and only checks
    container.ok("mkdir", "-p", "/var/lib/dkms/toa")
    assert "DKMS did not build it" in container.ok("/etc/kernel/postinst.d/zz-toa", second_kernel)


@pytest.mark.docker
@pytest.mark.network
def test_kmod_debs_of_two_kernels_install_side_by_side_where_modprobe_finds_them(
        dist, tmp_path, container_of, first_kernel, second_kernel):
    out = tmp_path / "packages"
    common, *kmods = package.build_packages("deb", dist, None, out, options={"trusted": "100.64.0.0/10"})
    version = toa.__version__
    assert common.name == f"toa-common_{version}_all.deb"
    assert sorted(deb.name for deb in kmods) == sorted(
        f"toa-kmod-{release}_{version}_amd64.deb" for release in (first_kernel, second_kernel))
    container = container_of(out)

    first_deb = next(deb for deb in kmods if first_kernel in deb.name)
    container.ok("dpkg", "-i", f"/pkgs/{common.name}", f"/pkgs/{first_deb.name}")
    # a kernel installed without its toa: the package manager's hook (as linux-image's postinst runs
    # it) says so loudly, and lets the installation go on
    container.ok("mkdir", "-p", f"/lib/modules/{second_kernel}")
    hooks = container.ok("run-parts", "--report", f"--arg={second_kernel}", "/etc/kernel/postinst.d")
    assert f"toa: kernel {second_kernel} has no toa.ko" in hooks
    container.ok("dpkg", "-i", *(f"/pkgs/{deb.name}" for deb in kmods if deb != first_deb))
    assert "toa:" not in container.ok("run-parts", "--report", f"--arg={second_kernel}", "/etc/kernel/postinst.d")
    for release in (first_kernel, second_kernel):
        assert f"/lib/modules/{release}/extra/toa.ko" in container.ok("modinfo", "-k", release, "-n", "toa")
        # modprobe reads toa-common's options file: what a boot-time load passes to the module
        assert f"insmod /lib/modules/{release}/extra/toa.ko trusted=100.64.0.0/10" in container.ok(
            "modprobe", "--show-depends", "-S", release, "toa")
        built = next(dist.glob(f"*/{release}/toa.ko")).read_bytes()
        assert container.ok("sha256sum", f"/lib/modules/{release}/extra/toa.ko").split()[0] == \
            hashlib.sha256(built).hexdigest()
    assert "toa" in container.ok("cat", "/etc/modules-load.d/toa.conf").split()
    assert container.ok("dpkg", "-S", "/etc/modprobe.d/toa.conf").startswith("toa-common:")

    # one kernel's package goes: the other kernel's toa and the boot files stay
    container.ok("dpkg", "--purge", f"toa-kmod-{second_kernel}")
    assert container.run("modinfo", "-k", second_kernel, "toa")[0] != 0
    assert f"/lib/modules/{first_kernel}/extra/toa.ko" in container.ok("modinfo", "-k", first_kernel, "-n", "toa")
    assert "toa" in container.ok("cat", "/etc/modules-load.d/toa.conf").split()
    # the boot files cannot go while a kernel's package needs them
    assert container.run("dpkg", "--remove", "toa-common")[0] != 0
    container.ok("dpkg", "--purge", f"toa-kmod-{first_kernel}", "toa-common")
    assert container.run("test", "-e", "/etc/modules-load.d/toa.conf")[0] != 0


@pytest.mark.docker
@pytest.mark.network
def test_kmod_rpm_lists_the_module_and_runs_depmod(dist, tmp_path, first_kernel):
    if shutil.which("rpm") is None:
        pytest.fail("rpm not installed: apt-get install rpm")
    common, rpm = package.build_packages("rpm", dist, [first_kernel], tmp_path)
    assert rpm.name == f"toa-kmod-{first_kernel}-{toa.__version__}-1.x86_64.rpm"
    assert common.name == f"toa-common-{toa.__version__}-1.noarch.rpm"

    def query(*args, package=rpm):
        return subprocess.run(["rpm", "-qp", *args, str(package)], capture_output=True, text=True, check=True).stdout

    assert query("-l").split() == [f"/lib/modules/{first_kernel}/extra/toa.ko"]
    assert f"toa-common = {toa.__version__}" in query("--requires")
    assert "/etc/modules-load.d/toa.conf" in query("--configfiles", package=common).split()
    scripts = query("--scripts")
    assert f"postinstall scriptlet (using /bin/sh):\ndepmod -a {first_kernel}" in scripts
    assert "postuninstall scriptlet" in scripts and scripts.count(f"depmod -a {first_kernel}") == 2
    # The module goes in exactly as built: rpm did not strip it.
    built = next(dist.glob(f"*/{first_kernel}/toa.ko"))
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    cpio = subprocess.run(["rpm2cpio", str(rpm)], capture_output=True, check=True).stdout
    subprocess.run(["cpio", "-idm", "--quiet"], input=cpio, cwd=unpacked, check=True)
    assert (unpacked / f"lib/modules/{first_kernel}/extra/toa.ko").read_bytes() == built.read_bytes()


@pytest.mark.docker
@pytest.mark.network
def test_package_task_prints_the_packages_as_json(dist, tmp_path, first_kernel):
    result = run_toa("package", "--format", "deb", "--dist", str(dist), "--out", str(tmp_path), "--json",
                     "--kernel", first_kernel)
    assert result.returncode == 0, result.stderr
    assert json_items(result, "package") == [
        {"format": "deb", "package": str(tmp_path / f"toa-common_{toa.__version__}_all.deb")},
        {"format": "deb", "package": str(tmp_path / f"toa-kmod-{first_kernel}_{toa.__version__}_amd64.deb")}]


@pytest.mark.docker
@pytest.mark.network
def test_rpm_packages_install_with_rpm_and_their_scripts_run(dist, tmp_path, container_of, first_kernel, second_kernel):
    """rpm itself installs them in a Debian container (--nodeps: their dependencies, dkms and kmod,
    are dpkg's packages here); RHEL's weak-modules is absent, so that branch of the scripts is not run."""
    version = toa.__version__
    _, dkms_rpm, _ = package.build_packages("dkms", out_dir=tmp_path)
    kmods = package.build_packages("rpm", dist, [first_kernel, second_kernel], tmp_path)
    container = container_of(tmp_path)

    # the DKMS rpm's %post builds toa for every kernel whose headers are installed; %preun takes it out
    container.ok("rpm", "-i", "--nodeps", f"/pkgs/{dkms_rpm.name}")
    assert f"toa/{version}, {first_kernel}, x86_64: installed" in container.ok("dkms", "status")
    assert f"vermagic:       {first_kernel} " in container.ok("modinfo", "-k", first_kernel, "toa")
    container.ok("rpm", "-e", "--nodeps", "toa-dkms")
    assert "toa" not in container.ok("dkms", "status")
    assert container.run("modinfo", "-k", first_kernel, "toa")[0] != 0

    # kmod rpms of two kernels side by side; %post indexes each; one goes, the other stays
    container.ok("rpm", "-i", "--nodeps", *(f"/pkgs/{path.name}" for path in kmods))
    for release in (first_kernel, second_kernel):
        assert f"/lib/modules/{release}/extra/toa.ko" in container.ok("modinfo", "-k", release, "-n", "toa")
        assert "extra/toa.ko:" in container.ok("cat", f"/lib/modules/{release}/modules.dep")
    container.ok("rpm", "-e", "--nodeps", f"toa-kmod-{second_kernel}")
    assert container.run("modinfo", "-k", second_kernel, "toa")[0] != 0
    assert f"/lib/modules/{first_kernel}/extra/toa.ko" in container.ok("modinfo", "-k", first_kernel, "-n", "toa")
    assert "toa" in container.ok("cat", "/etc/modules-load.d/toa.conf").split()


@pytest.mark.docker
@pytest.mark.network
def test_kmod_rpms_of_two_kernels_have_no_file_in_common(dist, tmp_path, first_kernel, second_kernel):
    rpms = package.build_packages("rpm", dist, [first_kernel, second_kernel], tmp_path / "rpms")
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["rpm", "--root", str(root), "--initdb"], check=True, capture_output=True)
    # rpm's own conflict check over the three file lists (--nodeps: no RHEL base to depend on here)
    checked = subprocess.run(["rpm", "--root", str(root), "-i", "--test", "--nodeps", "--ignorearch", "--ignoreos",
                              *map(str, rpms)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    lists = [set(subprocess.run(["rpm", "-qpl", str(rpm)], capture_output=True, text=True, check=True).stdout.split())
             for rpm in rpms]
    assert not (lists[1] & lists[2]) and not (lists[0] & (lists[1] | lists[2]))


# ---------------------------------------------------------------- SUSE's kernel module packages (KMPs)

WEAK_MODULES2_RECORDER = """#!/bin/sh
# Test double for suse-module-tools' weak-modules2 (SUSE-only, not in Debian): it records its
# arguments, and the module list --remove-kmp reads on stdin, so the test sees which branch ran.
echo "args: $*" >> /tmp/weak-modules2.log
if [ "$1" = --remove-kmp ]; then sed 's/^/stdin: /' >> /tmp/weak-modules2.log; fi
"""


@pytest.fixture(scope="module")
def suse_dist(dist, tmp_path_factory) -> Path:
    """dist's real modules for FIRST_KERNEL and SECOND_KERNEL filed as SLES 15 builds: no SUSE kernel
    mirror is reachable here, and what a KMP does (its name, paths, scripts, rpm's handling) does not
    depend on which kernel its toa.ko was built for."""
    out = tmp_path_factory.mktemp("suse-dist")
    for manifest_path in dist.glob("*/*/manifest.json"):
        folder = out / "sles-15" / manifest_path.parent.name
        shutil.copytree(manifest_path.parent, folder)
        manifest = json.loads(manifest_path.read_text())
        (folder / "manifest.json").write_text(json.dumps({**manifest, "target": "sles-15"}))
    return out


def _kmp_nvr(release: str) -> str:
    name, version = package.kmp_name(release)
    return f"{name}-{version}-1"


@pytest.mark.docker
@pytest.mark.network
def test_suse_kmps_of_two_kernels_install_side_by_side_and_index_toa_without_weak_modules2(
        suse_dist, tmp_path, container_of, first_kernel, second_kernel):
    """rpm installs the KMPs in a Debian container (--nodeps: kmod and the kernels' ksym() provides
    are not rpm's here); suse-module-tools is absent, so %post and %postun run depmod."""
    out = tmp_path / "packages"
    common, *kmps = package.build_packages("rpm", suse_dist, [first_kernel, second_kernel], out)
    assert sorted(rpm.name for rpm in kmps) == sorted(f"{_kmp_nvr(r)}.x86_64.rpm" for r in (first_kernel, second_kernel))
    assert {package.kmp_name(r)[0] for r in (first_kernel, second_kernel)} == {"toa-kmp-amd64"}  # one name
    provides = subprocess.run(["rpm", "-qp", "--provides", str(kmps[0])], capture_output=True, text=True,
                              check=True).stdout.splitlines()
    assert "multiversion(kernel)" in provides
    requires = subprocess.run(["rpm", "-qp", "--requires", str(kmps[0])], capture_output=True, text=True,
                              check=True).stdout.splitlines()
    assert f"toa-common = {toa.__version__}" in requires
    assert any(line.startswith("ksym(amd64:") for line in requires)
    container = container_of(out)

    container.ok("rpm", "-i", "--nodeps", f"/pkgs/{common.name}", *(f"/pkgs/{rpm.name}" for rpm in kmps))
    assert sorted(container.ok("rpm", "-q", "toa-kmp-amd64").split()) == sorted(
        f"{_kmp_nvr(r)}.x86_64" for r in (first_kernel, second_kernel))
    assert container.ok("rpm", "-qf", "/etc/modprobe.d/10-unsupported-modules.conf").startswith("toa-common-")
    for release in (first_kernel, second_kernel):
        assert container.ok("modinfo", "-k", release, "-n", "toa").strip() == f"/lib/modules/{release}/updates/toa.ko"
        assert "updates/toa.ko:" in container.ok("cat", f"/lib/modules/{release}/modules.dep")
        built = next(suse_dist.glob(f"*/{release}/toa.ko")).read_bytes()
        assert container.ok("sha256sum", f"/lib/modules/{release}/updates/toa.ko").split()[0] == \
            hashlib.sha256(built).hexdigest()

    def next_kernels_module() -> str | None:
        """What `invoke status` reads of SECOND_KERNEL as the next boot's kernel: the toa.ko its facts
        command finds (the container runs the machine's kernel, so both kernels here are other kernels)."""
        # the facts as a host's session hands them over: what comes before FACTS_END
        facts = container.ok("sh", "-c", facts_command(False)).partition(f"\n{FACTS_END}\n")[0]
        return parse_facts(facts, "root").state.others[second_kernel][1]

    assert next_kernels_module() == f"/lib/modules/{second_kernel}/updates/toa.ko"

    # one kernel's KMP goes (its %postun reindexes that kernel); the other kernel's toa stays whole
    container.ok("rpm", "-e", "--nodeps", _kmp_nvr(second_kernel))
    assert next_kernels_module() is None
    # the link weak-modules2 makes for a kABI-compatible kernel (by hand here: no suse-module-tools)
    container.ok("sh", "-c", f"mkdir -p /lib/modules/{second_kernel}/weak-updates/updates && ln -s "
                             f"/lib/modules/{first_kernel}/updates/toa.ko /lib/modules/{second_kernel}/weak-updates/updates/")
    assert next_kernels_module() == f"/lib/modules/{second_kernel}/weak-updates/updates/toa.ko"
    container.ok("rm", "-r", f"/lib/modules/{second_kernel}/weak-updates")
    assert container.run("modinfo", "-k", second_kernel, "toa")[0] != 0
    assert "toa.ko" not in container.ok("cat", f"/lib/modules/{second_kernel}/modules.dep")
    assert container.ok("modinfo", "-k", first_kernel, "-n", "toa").strip() == \
        f"/lib/modules/{first_kernel}/updates/toa.ko"
    built = next(suse_dist.glob(f"*/{first_kernel}/toa.ko")).read_bytes()
    assert container.ok("sha256sum", f"/lib/modules/{first_kernel}/updates/toa.ko").split()[0] == \
        hashlib.sha256(built).hexdigest()
    assert "toa" in container.ok("cat", "/etc/modules-load.d/toa.conf").split()


@pytest.mark.docker
@pytest.mark.network
def test_suse_kmp_hands_toa_to_weak_modules2_where_suse_module_tools_is_installed(
        suse_dist, tmp_path, container_of, first_kernel):
    """With an executable weak-modules2 at suse-module-tools' path (a recorder standing in for the
    SUSE-only tool), %post runs `--add-kmp <nvr>` instead of depmod, %postun feeds it the module
    for `--remove-kmp <nvr>`, and a reinstall takes nothing back."""
    out = tmp_path / "packages"
    common, kmp = package.build_packages("rpm", suse_dist, [first_kernel], out)
    container = container_of(out)
    log = "/tmp/weak-modules2.log"
    container.ok("mkdir", "-p", "/usr/lib/module-init-tools")
    container.ok("sh", "-c", f"printf %s {shlex.quote(WEAK_MODULES2_RECORDER)} > {package.WEAK_MODULES2} "
                             f"&& chmod 755 {package.WEAK_MODULES2}")
    nvr = _kmp_nvr(first_kernel)
    module = f"/lib/modules/{first_kernel}/updates/toa.ko"

    container.ok("rpm", "-i", "--nodeps", f"/pkgs/{common.name}", f"/pkgs/{kmp.name}")
    assert container.ok("cat", log).splitlines() == [f"args: --add-kmp {nvr}"]
    # weak-modules2 indexes (here: nobody did); the depmod branch did not run
    assert container.run("grep", "-qs", "toa.ko", f"/lib/modules/{first_kernel}/modules.dep")[0] != 0

    container.ok("rpm", "-i", "--nodeps", "--reinstall", f"/pkgs/{kmp.name}")
    assert container.ok("cat", log).splitlines() == [f"args: --add-kmp {nvr}"] * 2

    container.ok("rpm", "-e", "--nodeps", nvr)
    assert container.ok("cat", log).splitlines() == [f"args: --add-kmp {nvr}"] * 2 + [
        f"args: --remove-kmp {nvr}", f"stdin: {module}"]
    assert container.run("test", "-e", module)[0] != 0


def test_kmp_names_follow_suse_conventions():
    version = toa.__version__
    assert package.kmp_name("6.4.0-150600.23.7-default") == ("toa-kmp-default", f"{version}_k6.4.0_150600.23.7")
    assert package.kmp_name("4.12.14-122.37-azure") == ("toa-kmp-azure", f"{version}_k4.12.14_122.37")
    assert package.kmp_name("6.8.0+git1-rt") == ("toa-kmp-rt", f"{version}_k6.8.0+git1")
    for release in ("6.4.0", "5.14.0-427.13.1.el9_4.x86_64"):
        with pytest.raises(ToaError, match="does not end in a SUSE flavor"):
            package.kmp_name(release)


def test_kmp_symbols_are_the_ksym_capabilities_suse_kernels_provide():
    module = preflight.Module(vermagic="", modinfo={}, relocation_types=frozenset(), crcs={"printk": 0x0A1B2C3D,
                              "__fentry__": 0xBDFB6DBB}, signed=False)
    assert package.kmp_symbols(module, "default") == ["ksym(default:__fentry__) = bdfb6dbb",
                                                      "ksym(default:printk) = a1b2c3d"]


def test_suse_modules_are_packaged_as_rpm_only(tmp_path):
    _artifact(tmp_path, "sles-15", "6.4.0-150600.23.7-default")
    assert_one_line_error(run_toa("package", "--format", "deb", "--dist", str(tmp_path)),
                          "SUSE hosts install rpm packages: give --format rpm")


def test_a_kmp_is_refused_for_a_module_that_failed_its_supported_check(tmp_path):
    folder = _artifact(tmp_path, "sles-15", "6.4.0-150600.23.7-default")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["preflight"] = [{"name": "supported", "ok": False, "detail": "no supported tag"}]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ToaError, match="failed the supported check of its build"):
        package.kmp_rpm(artifacts.find_all(tmp_path)[0], tmp_path / "out")


@pytest.mark.parametrize("args, fragment", [
    (["--format", "zip"], "unknown package format 'zip'"),
    ([], "give --format"),
    (["--format", "dkms", "--kernel", "6.1.0-56-amd64"], "--kernel is for deb and rpm"),
    (["--format", "deb", "--kernel", "6.1.0-1-amd64"], "no toa.ko for 6.1.0-1-amd64"),
    (["--format", "rpm", "--kernel", "6.1;reboot"], "6.1;reboot"),
    (["--format", "dkms", "--option", "trusted=10.0.0.0/8"], "--option is for deb and rpm"),
    (["--format", "deb", "--option", "trusted=10.0.0.1/8"], "did you mean 10.0.0.0/8"),
    (["--format", "dkms", "--engine", "bpf"], "give --format deb or rpm"),
    (["--format", "deb", "--engine", "bpf", "--kernel", "6.1.0-56-amd64"], "and no --kernel"),
    (["--format", "deb", "--engine", "bpf"], "no BPF engine build in"),
    (["--format", "deb", "--engine", "ebpf"], "unknown engine 'ebpf'"),
])
def test_package_task_refuses_with_one_line(args, fragment, tmp_path):
    assert_one_line_error(run_toa("package", "--dist", str(tmp_path), *args), fragment)


def _artifact(dist: Path, target: str, release: str, manifest: dict | None = None) -> Path:
    folder = dist / target / release
    folder.mkdir(parents=True)
    (folder / "toa.ko").write_bytes(b"\x7fELF")
    (folder / "manifest.json").write_text(json.dumps(manifest or {
        "kernel_release": release, "target": target, "sha256": hashlib.sha256(b"\x7fELF").hexdigest(),
        "srcversion": "0" * 23}))
    return folder


def test_find_artifacts_reads_the_dist_layout(tmp_path):
    _artifact(tmp_path, "debian-12", "6.1.0-56-amd64")
    _artifact(tmp_path, "rocky-9", "5.14.0-427.13.1.el9_4.x86_64")
    (tmp_path / "packages").mkdir()
    found = artifacts.find_all(tmp_path)
    assert [a.release for a in found] == ["5.14.0-427.13.1.el9_4.x86_64", "6.1.0-56-amd64"]
    assert artifacts.find_all(tmp_path, ["6.1.0-56-amd64"])[0].ko == tmp_path / "debian-12/6.1.0-56-amd64/toa.ko"
    with pytest.raises(ToaError, match="no built toa.ko"):
        artifacts.find_all(tmp_path / "empty")


def test_find_artifacts_refuses_a_manifest_of_another_kernel(tmp_path):
    _artifact(tmp_path, "debian-13", "6.12.1-amd64", {"kernel_release": "6.12.2-amd64"})
    with pytest.raises(ToaError, match="does not describe a build for 6.12.1-amd64"):
        artifacts.find_all(tmp_path)


def test_package_names_keep_to_the_allowed_characters():
    assert package.package_name("6.12.112+deb13-amd64") == "toa-kmod-6.12.112+deb13-amd64"
    assert package.package_name("4.12.14-122.37_default") == "toa-kmod-4.12.14-122.37-default"


def test_coreos_hosts_get_no_kmod_package(tmp_path):
    folder = _artifact(tmp_path, "fedora-coreos", "6.8.5-301.fc40.x86_64")
    artifact = artifacts.Artifact(folder / "toa.ko", json.loads((folder / "manifest.json").read_text()))
    with pytest.raises(ToaError, match="do not take toa from a package"):
        package.autoload_files(artifact)


def test_modules_of_targets_that_load_toa_differently_are_packaged_separately(tmp_path):
    _artifact(tmp_path, "debian-12", "6.1.0-56-amd64")
    _artifact(tmp_path, "centos-7", "3.10.0-1160.el7.x86_64")
    found = artifacts.find_all(tmp_path)
    with pytest.raises(ToaError, match=r"load toa at boot differently \(centos-7, debian-12\).*--kernel"):
        package.common_files(found, None)
    [files] = {tuple(f.path for f in package.common_files([a], None)) for a in found[:1]}
    assert "/etc/modules-load.d/toa.conf" in files or "/etc/sysconfig/modules/toa.modules" in files


# ---------------------------------------------------------------- the eBPF engine's package


@pytest.fixture(scope="module")
def bpf_dist(tmp_path_factory) -> Path:
    from toa import engine_bpf

    dist = tmp_path_factory.mktemp("dist")
    engine_bpf.build(dist / "bpf")
    return dist


def test_bpf_deb_carries_the_loader_and_an_enabled_unit_and_conflicts_with_the_module(bpf_dist, tmp_path):
    from toa import engine_bpf, render

    result = run_toa("package", "--format", "deb", "--engine", "bpf", "--dist", str(bpf_dist), "--out", str(tmp_path),
                     "--option", "kinds=254,200", "--json")
    assert result.returncode == 0, result.stderr
    deb = Path(json_items(result, "package")[0]["package"])
    assert deb.name == f"toa-bpf_{toa.__version__}_amd64.deb"
    root = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(root)], check=True)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["DEBIAN/control", "DEBIAN/postinst", "DEBIAN/postrm", "DEBIAN/prerm",
                     "lib/systemd/system/toa-bpf.service", "usr/sbin/toa-bpf"]
    loader = root / "usr/sbin/toa-bpf"
    assert engine_bpf.sha256(loader) == engine_bpf.sha256(bpf_dist / "bpf" / "toa-bpf") and loader.stat().st_mode & 0o111
    unit = (root / "lib/systemd/system/toa-bpf.service").read_text()
    assert "ExecStart=/usr/sbin/toa-bpf attach kinds=254,200\n" in unit and "ExecStop=/usr/sbin/toa-bpf detach" in unit
    control = (root / "DEBIAN/control").read_text()
    assert "Conflicts: toa-common" in control and artifacts.BpfArtifact.from_dir(bpf_dist / "bpf").object_sha256 in control
    postinst = (root / "DEBIAN/postinst").read_text()
    assert "systemctl enable toa-bpf.service" in postinst and "systemctl restart toa-bpf.service" in postinst
    for script in ("postinst", "prerm", "postrm"):
        subprocess.run(["sh", "-n", str(root / "DEBIAN" / script)], check=True)
    assert render.PACKAGED_BPF_LOADER == "/usr/sbin/toa-bpf"


@pytest.mark.skipif(shutil.which("rpmbuild") is None, reason="rpmbuild is not installed (apt: rpm)")
def test_bpf_rpm_lists_the_loader_and_the_unit(bpf_dist, tmp_path):
    rpm = package.build_packages("rpm", bpf_dist, out_dir=tmp_path, engine="bpf")[0]
    assert rpm.name == f"toa-bpf-{toa.__version__}-1.x86_64.rpm"
    listed = subprocess.run(["rpm", "-qp", "--qf", "[%{FILEMODES:perms} %{FILENAMES}\n]", str(rpm)],
                            capture_output=True, text=True, check=True).stdout.split("\n")
    assert "-rwxr-xr-x /usr/sbin/toa-bpf" in listed and "-rw-r--r-- /usr/lib/systemd/system/toa-bpf.service" in listed
    conflicts = subprocess.run(["rpm", "-qp", "--conflicts", str(rpm)], capture_output=True, text=True, check=True)
    assert conflicts.stdout.split() == ["toa-common"]
