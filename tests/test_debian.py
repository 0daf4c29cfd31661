"""toa.debian against the real Debian mirror apt is configured with.

Kernels land in the user's cache (or $TOA_CACHE_DIR), so a second run downloads nothing.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from toa import debian
from toa.errors import ToaError

FIXTURES = Path(__file__).parent / "fixtures"
HOSTILE = [entry["release"] for entry in json.loads((FIXTURES / "hostile_releases.json").read_text())]
HOSTILE_SUITES = ["bookworm;reboot", "bookworm$(id)", "book worm", "bookworm/../x", "bookworm\n", "a" * 101, ""]


def _apt_cache(suite: str, *args: str) -> str:
    """The real apt-cache over the suite's private index: an oracle independent of toa's own parsing."""
    return subprocess.run(
        ["apt-cache", *debian.apt_options(suite), *args], capture_output=True, text=True, check=True
    ).stdout


def _newest_headers_in_apt(suite: str, pattern: str) -> str:
    names = _apt_cache(suite, "pkgnames", "linux-headers-").split()
    releases = [name.removeprefix("linux-headers-") for name in names if re.fullmatch(pattern, name)]
    return max(releases, key=lambda release: [int(n) for n in re.findall(r"[0-9]+", release)])


class FailingSubprocess:
    """Stands in for subprocess.run/Popen where no command may run: any call fails the test."""

    def __call__(self, argv, *args, **kwargs):
        pytest.fail(f"a command ran where none may: {argv!r}")


@pytest.fixture
def no_subprocess(monkeypatch):
    monkeypatch.setattr(subprocess, "run", FailingSubprocess())
    monkeypatch.setattr(subprocess, "Popen", FailingSubprocess())


@pytest.fixture(scope="session")
def bookworm_packages() -> debian.KernelPackages:
    return debian.resolve_suite("bookworm")


@pytest.fixture(scope="session")
def bookworm_tree(bookworm_packages) -> debian.KernelTree:
    return debian.fetch(bookworm_packages)


# ---------------------------------------------------------------- resolution from the real index


@pytest.mark.parametrize(
    "suite, pattern",
    [
        ("bookworm", r"linux-headers-6\.1\.0-[0-9]+-amd64"),
        ("trixie", r"linux-headers-6\.12\.[0-9]+\+deb13-amd64"),
    ],
)
@pytest.mark.network
def test_resolve_suite_gives_the_newest_abi_in_the_index(suite, pattern):
    pkgs = debian.resolve_suite(suite)
    assert pkgs.suite == suite
    assert f"linux-headers-{pkgs.release}" == re.fullmatch(pattern, f"linux-headers-{pkgs.release}").group()
    assert pkgs.release == _newest_headers_in_apt(suite, pattern)
    # Every package toa would download exists in apt's index at exactly that version.
    for name in pkgs.all_pkgs:
        shown = _apt_cache(suite, "show", f"{name}={pkgs.version}")
        assert f"Package: {name}\n" in shown
    assert pkgs.headers_pkgs[0] == f"linux-headers-{pkgs.release}"
    assert pkgs.headers_pkgs[1].endswith("-common") and pkgs.headers_pkgs[2].startswith("linux-kbuild-")


@pytest.mark.network
def test_trixie_backports_uses_the_split_image_layout():
    pkgs = debian.resolve_suite("trixie-backports")
    assert pkgs.image_pkg == f"linux-binary-{pkgs.release}"
    assert pkgs.modules_pkg == f"linux-modules-{pkgs.release}"
    assert "~bpo13" in pkgs.version


@pytest.mark.network
def test_find_release_finds_the_suites_kernel(bookworm_packages):
    assert debian.find_release(bookworm_packages.release) == bookworm_packages


@pytest.mark.network
def test_find_release_of_unknown_release_lists_what_is_available(bookworm_packages):
    with pytest.raises(ToaError) as error:
        debian.find_release("6.1.0-9999-amd64")
    message = str(error.value)
    assert "6.1.0-9999-amd64" in message
    bookworm_listed = re.search(r"bookworm: ([^;]*)", message).group(1).split(", ")
    assert bookworm_listed[0] == bookworm_packages.release
    assert "\n" not in message
    assert "--local --headers DIR" in message  # what to do with a kernel that left the mirror
    releases = [release for listed in re.findall(r"[a-z-]+: ([^;]*)", message) for release in listed.split(", ")
                if release != "none"]
    assert len(releases) == len(set(releases)), message  # each once, however many pockets and suites carry it


def test_unknown_suite_lists_the_suites():
    with pytest.raises(ToaError) as error:
        debian.resolve_suite("hamm")
    for suite in debian.suites():
        assert suite in str(error.value)


@pytest.mark.parametrize("release", HOSTILE)
def test_hostile_releases_are_rejected_before_any_command(release, no_subprocess):
    with pytest.raises(ToaError):
        debian.find_release(release)
    pkgs = debian.KernelPackages("bookworm", release, "1.0-1", "linux-image-x", None, ())
    with pytest.raises(ToaError):
        debian.fetch(pkgs)


@pytest.mark.parametrize("suite", HOSTILE_SUITES)
def test_hostile_suites_are_rejected_before_any_command(suite, no_subprocess):
    with pytest.raises(ToaError):
        debian.resolve_suite(suite)


def test_hostile_package_names_from_an_index_never_reach_apt(no_subprocess, tmp_path, monkeypatch):
    monkeypatch.setenv("TOA_CACHE_DIR", str(tmp_path))
    pkgs = debian.KernelPackages("bookworm", "6.1.0-1-amd64", "6.1.1-1", "--option=evil", None, ())
    with pytest.raises(ToaError):
        debian.fetch(pkgs)


# ---------------------------------------------------------------- fetch and the cache


def assert_whole_tree(tree: debian.KernelTree, release: str) -> None:
    """A fetched kernel as the lab and builds use it: bootable image, modules, headers pointing into the cache."""
    assert tree.release == release
    assert tree.vmlinuz.is_file() and tree.vmlinuz.stat().st_size > 1_000_000
    assert tree.vmlinuz.read_bytes()[0x202:0x206] == b"HdrS"  # the x86 boot protocol magic
    assert (tree.modules_dir / "kernel/net/ipv4").is_dir()
    assert (tree.headers_dir / ".config").is_file()
    assert (tree.headers_dir / "scripts/basic/fixdep").is_file()  # kbuild, through the scripts link
    makefile = (tree.headers_dir / "Makefile").read_text()
    include = re.search(r"^include (\S+)$", makefile, re.M).group(1)
    assert Path(include).is_relative_to(debian.cache_dir())
    assert Path(include).is_file()
    assert all(Path(path).is_relative_to(debian.cache_dir()) for path in re.findall(r"(?<=[\s=])/\S+", makefile))
    assert f'"{release}"' in (tree.headers_dir / "include/generated/utsrelease.h").read_text()


@pytest.mark.network
def test_fetch_unpacks_image_modules_and_headers(bookworm_tree, bookworm_packages):
    assert_whole_tree(bookworm_tree, bookworm_packages.release)


@pytest.mark.network
def test_when_the_mirror_moves_a_suite_resolves_to_what_its_index_names_now(monkeypatch):
    """Debian replaces a suite's kernel every few weeks. Here the suite's index is made to name another
    current ABI than the one in the cache (its newest kernel's packages are taken out of the index): asking
    for the suite follows the index, downloads that kernel whole; the cached one stays usable by name."""
    suite, kernels = next(((name, generic) for name in debian.SUITES
                           if len(generic := [k for k in debian.kernels_of_suite(name)
                                              if debian.is_generic_flavour(k.release)]) >= 2), (None, []))
    if suite is None:
        pytest.skip("no suite's index holds two generic kernels today")
    cached, current = kernels[-1], kernels[-2]
    cached_tree = debian.fetch(cached)
    real_indexes = debian._pocket_indexes

    def moved_on(suite_obj):
        indexes = real_indexes(suite_obj)
        if suite_obj.name != suite:
            return indexes
        return {pocket: {name: fields for name, fields in packages.items() if cached.release not in name}
                for pocket, packages in indexes.items()}

    monkeypatch.setattr(debian, "_pocket_indexes", moved_on)
    pkgs, tree = debian.prepare(None, suite)
    assert pkgs == current and tree.release != cached.release
    assert_whole_tree(tree, current.release)
    assert debian.prepare(cached.release, None) == (cached, cached_tree)  # from the cache, without the index


@pytest.mark.network
def test_second_fetch_is_a_cache_hit_without_network(bookworm_tree, bookworm_packages, no_subprocess):
    assert debian.fetch(bookworm_packages) == bookworm_tree


@pytest.mark.network
def test_an_interrupted_fetch_is_redone(bookworm_tree, bookworm_packages):
    target = debian.kernel_dir(bookworm_packages.release)
    (target / ".complete").unlink()
    leftover = target / "root" / "half-written"
    leftover.write_text("interrupted")
    assert debian.fetch(bookworm_packages) == bookworm_tree
    assert not leftover.exists()
    assert (target / ".complete").is_file()


@pytest.mark.network
def test_fetch_of_the_split_layout_finds_vmlinuz_and_modules():
    tree = debian.fetch(debian.resolve_suite("trixie-backports"))
    assert tree.vmlinuz == tree.vmlinuz.parent / "vmlinuz"
    assert tree.vmlinuz.parent.name == tree.release
    assert (tree.modules_dir / "kernel").is_dir()
    makefile = (tree.headers_dir / "Makefile").read_text()
    # 6.16+ headers also name their KBUILD_OUTPUT by absolute path.
    assert f"KBUILD_OUTPUT={tree.headers_dir}" in makefile
    assert all(Path(path).is_relative_to(debian.cache_dir()) for path in re.findall(r"(?<=[\s=])/\S+", makefile))


# ---------------------------------------------------------------- pure parsing


def test_one_line_sources():
    text = (
        "# comment\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://m.example/debian/ bookworm main\n"
        "deb-src http://m.example/debian bookworm main\n"
        "deb http://security.example/debian-security bookworm-security main contrib\n"
    )
    assert debian.parse_one_line_sources(text) == [
        debian.SourceEntry("http://m.example/debian", "bookworm"),
        debian.SourceEntry("http://security.example/debian-security", "bookworm-security"),
    ]


def test_deb822_sources():
    text = (
        "Types: deb deb-src\nURIs: http://m.example/debian\nSuites: bookworm\n bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://other.example/x\nSuites: trixie\nEnabled: no\n\n"
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\nComponents: main\n"
    )
    entries = debian.parse_deb822_sources(text)
    assert entries == [
        debian.SourceEntry("http://m.example/debian", "bookworm"),
        debian.SourceEntry("http://m.example/debian", "bookworm-updates"),
        debian.SourceEntry("http://security.example/debian-security", "bookworm-security"),
    ]
    assert debian.find_mirrors(entries) == {
        "debian": "http://m.example/debian",
        "security": "http://security.example/debian-security",
    }


def test_mirrors_ignore_other_vendors_repositories():
    entries = debian.parse_one_line_sources("deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n")
    assert debian.find_mirrors(entries) == {}


def test_the_system_sources_name_a_debian_mirror():
    assert debian.mirror_for("debian")


VERSIONS = [
    "6.1.192-2", "6.1.192-1", "6.12.117-1~deb12u1", "6.12.117-1", "7.3.4-1~bpo13+1", "7.3.4-1",
    "7.3.4", "1:0.1-1", "6.19.6-2~bpo13+1", "6.19.10-1~bpo13+1", "1.0~rc1-1", "1.0-1", "1.0a-1", "1.0+b1-1",
]


@pytest.mark.parametrize("left", VERSIONS)
def test_version_order_matches_dpkg(left):
    for right in VERSIONS:
        for relation, expected in (("lt", -1), ("eq", 0), ("gt", 1)):
            dpkg_says = subprocess.run(["dpkg", "--compare-versions", left, relation, right]).returncode == 0
            assert (debian.compare_versions(left, right) == expected) == dpkg_says, (left, relation, right)


def test_kernels_in_index_needs_headers_common_and_kbuild_of_the_same_upload():
    index = debian.parse_packages_index(
        "Package: linux-image-6.1.0-9-amd64\nVersion: 6.1.9-1\nDepends: kmod\n\n"
        "Package: linux-headers-6.1.0-9-amd64\nVersion: 6.1.9-1\n"
        "Depends: linux-headers-6.1.0-9-common (= 6.1.9-1), linux-kbuild-6.1 (>= 6.1.9)\n\n"
        "Package: linux-headers-6.1.0-9-common\nVersion: 6.1.9-1\n\n"
        "Package: linux-kbuild-6.1\nVersion: 6.1.9-1\n\n"
        "Package: linux-image-6.1.0-8-amd64\nVersion: 6.1.8-1\nDepends: kmod\n\n"
        "Package: linux-headers-6.1.0-8-amd64\nVersion: 6.1.8-1\n"
        "Depends: linux-headers-6.1.0-8-common (= 6.1.8-1), linux-kbuild-6.1 (>= 6.1.8)\n\n"
        "Package: linux-headers-6.1.0-8-common\nVersion: 6.1.8-1\n"
    )
    kernels = debian.kernels_in_index("bookworm", index)
    # 6.1.0-8's kbuild is not in the index at its version: incomplete, left out.
    assert [k.release for k in kernels] == ["6.1.0-9-amd64"]
    assert kernels[0].modules_pkg is None


def test_mirror_environment_overrides_apt_sources(monkeypatch):
    monkeypatch.setenv("TOA_DEBIAN_MIRROR", "http://mirror.example.org/debian")
    assert debian.mirror_for("debian") == "http://mirror.example.org/debian"
    monkeypatch.setenv("TOA_DEBIAN_SECURITY_MIRROR", "http://x;reboot")
    with pytest.raises(ToaError, match="TOA_DEBIAN_SECURITY_MIRROR='http://x;reboot' is not a mirror URL"):
        debian.mirror_for("security")


@pytest.mark.network
def test_debootstrap_checks_what_it_downloads_against_the_archive_keyring(tmp_path, monkeypatch):
    root = tmp_path / "root"
    debian.debootstrap("bookworm", root)
    assert (root / "etc/debian_version").read_text().startswith("12.")
    # A keyring without the archive's current keys (the ones Debian retired): the Release file is
    # refused, so nothing it lists is installed.
    monkeypatch.setattr(debian, "KEYRING", Path("/usr/share/keyrings/debian-archive-removed-keys.gpg"))
    with pytest.raises(ToaError, match="debootstrap of bullseye failed"):
        debian.debootstrap("bullseye", tmp_path / "refused")
    assert not (tmp_path / "refused" / "etc/debian_version").exists()


@pytest.mark.parametrize("package", ["dkms;reboot", "-odir=/", "dkms=1.0 x", "Dkms", "dkms=$(id)"])
def test_downloads_refuse_what_is_not_a_package_before_reaching_the_mirror(package, tmp_path):
    with pytest.raises(ToaError, match="invalid package"):
        debian.download("bookworm", ["make", package], tmp_path)
    assert list(tmp_path.iterdir()) == []
