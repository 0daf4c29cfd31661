"""Offline checks of the lab's pieces: the guest peer's case generator, the serial-log parser,
the initramfs writer and the bzImage release reader. No kernel is booted here."""

from __future__ import annotations

import gzip
import ipaddress
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from toa import lab
from toa.errors import ToaError

# ---------------------------------------------------------------- the peer's fuzz generator


@pytest.fixture(scope="module")
def peer(tmp_path_factory) -> Path:
    """The real guest peer, compiled exactly as the lab compiles it (-Wall -Werror, static)."""
    return lab.build_peer(tmp_path_factory.mktemp("peer"))


def first_broken_option(opts: bytes) -> int:
    """Bytes left from the first option the walk rejects (what the kernel's own check sees), 0 if none."""
    i = 0
    while i < len(opts):
        if opts[i] == 0:
            return 0
        if opts[i] == 1:
            i += 1
            continue
        if i + 1 >= len(opts) or not 2 <= opts[i + 1] <= len(opts) - i:
            return len(opts) - i
        i += opts[i + 1]
    return 0


def reference_verdict(opts: bytes, kinds: set[int]):
    """The TOA option rules, written out independently of the C generator.

    Returns ("absent"|"malformed", None, None) or ("v4"|"v6", address, port).
    """
    found = []
    i = 0
    while i < len(opts):
        kind = opts[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(opts):
            return "malformed", None, None
        length = opts[i + 1]
        if length < 2 or length > len(opts) - i:
            return "malformed", None, None
        if kind in kinds:
            found.append(opts[i : i + length])
        i += length
    if not found:
        return "absent", None, None
    if len(found) > 1 or len(found[0]) not in (8, 20):
        return "malformed", None, None
    option = found[0]
    port = int.from_bytes(option[2:4], "big")
    address = ipaddress.ip_address(option[4:])
    if port == 0 or not usable(address):
        return "malformed", None, None
    return ("v4" if len(option) == 8 else "v6"), address, port


def usable(address) -> bool:
    """What a balancer can send as a client: not unspecified, loopback (v4-mapped too), multicast or broadcast."""
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None and mapped.is_loopback:
        return False
    return not (address.is_unspecified or address.is_loopback or address.is_multicast
                or address == ipaddress.IPv4Address("255.255.255.255"))


@pytest.mark.parametrize("kinds,refused_from", [("254,253", 0), ("254,253,200", 0), ("254,253", 18), ("254,253", 5)])
def test_generated_cases_match_the_rules(peer, kinds, refused_from):
    accepted = {int(k) for k in kinds.split(",")}
    argv = [str(peer), "cases", "12345", "3000", kinds, str(refused_from)]
    rows = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(rows) == 3000
    categories = set()
    lengths = set()
    refused = 0
    for row in rows:
        category, listener, outcome, address, port, malformed, bad_rem, kernel_refuses, opts_hex = row.split()
        opts = b"" if opts_hex == "-" else bytes.fromhex(opts_hex)
        categories.add(category)
        lengths.add(len(opts))
        assert len(opts) % 4 == 0 and len(opts) <= 40, row
        assert int(bad_rem) == first_broken_option(opts), row
        assert kernel_refuses == ("1" if refused_from and int(bad_rem) >= refused_from else "0"), row
        refused += kernel_refuses == "1"
        verdict, want_address, want_port = reference_verdict(opts, accepted)
        if outcome == "real":
            assert verdict == ("malformed" if malformed == "1" else "absent"), row
        else:
            assert malformed == "0", row
            assert verdict == {"toa_v4": "v4", "toa_v6": "v6"}[outcome], row
            assert ipaddress.ip_address(address) == want_address and int(port) == want_port, row
        if listener == "mapped":
            assert outcome != "toa_v6", row  # no rule covers an IPv6 TOA on a v4-mapped connection
    assert categories == {"valid_v4", "valid_v6", "wrong_length", "truncated", "repeated", "zero",
                          "not_accepted", "after_eol", "bad_other", "no_toa", "unroutable"}
    assert {0, 4, 8, 20, 40} <= lengths
    if refused_from:
        assert 0 < refused < 3000 / 5  # cases the kernel drops are there, but most are not


def test_same_seed_same_cases(peer):
    def cases(seed):
        return subprocess.run([str(peer), "cases", seed, "50", "254,253", "0"], capture_output=True, check=True).stdout

    first, again, other = cases("99"), cases("99"), cases("100")
    assert first == again != other


def test_peer_rejects_bad_arguments(peer):
    for argv in (["fuzz"], ["cases", "1", "5", "254,999", "0"], ["nonsense"], ["trust-flip", "10.0.0.0/16"],
                 ["trust-race", "300"], ["many"], ["basic", "trusted", "extra"]):
        result = subprocess.run([str(peer), *argv], capture_output=True, text=True)
        assert result.returncode == 2 and "usage" in result.stderr


def test_reference_rules_on_known_lists():
    kinds = {254, 253}
    v4 = bytes([254, 8, 0x9C, 0x41, 203, 0, 113, 7])
    assert reference_verdict(v4, kinds) == ("v4", ipaddress.ip_address("203.0.113.7"), 40001)
    assert reference_verdict(bytes([1, 1, 1, 254]), kinds)[0] == "malformed"
    assert reference_verdict(v4 + v4, kinds)[0] == "malformed"
    assert reference_verdict(bytes([0]) + v4[:3], kinds)[0] == "absent"
    assert reference_verdict(bytes([200]) + v4[1:], kinds)[0] == "absent"
    for claimed in ([127, 0, 0, 1], [224, 0, 0, 251], [255, 255, 255, 255], [0, 0, 0, 0]):
        assert reference_verdict(v4[:4] + bytes(claimed), kinds)[0] == "malformed", claimed
    for claimed in ("::1", "ff02::1", "::ffff:127.0.0.1", "::"):
        option = bytes([253, 20, 0x9C, 0x41]) + ipaddress.IPv6Address(claimed).packed
        assert reference_verdict(option, kinds)[0] == "malformed", claimed
    assert reference_verdict(bytes([1, 1, 254, 2]), kinds)[0] == "malformed"  # length 2 at the end
    assert first_broken_option(bytes([1, 1, 1, 254])) == 1
    assert first_broken_option(bytes([2, 4, 5, 0xB4, 76, 0, 1, 1])) == 4
    assert first_broken_option(v4 + bytes([0, 76, 0, 0])) == 0


# ---------------------------------------------------------------- reading the serial console

FULL_RUN = dict(fuzz=10, cycles=2)


def good_console() -> list[str]:
    lines = ["[    0.000000] Linux version 6.1.0", "TOA-LAB BEGIN release=6.1.0-56-amd64"]
    lines += [f"CASE {name} PASS detail=1" for name in lab.required_cases(**FULL_RUN)]
    lines += ["TOA-LAB TAINTED 12288", "TOA-LAB DMESG BEGIN", "[    2.5] TOA: toa loaded",
              "[    3.1] TOA: toa unloaded", "TOA-LAB DMESG END", "TOA-LAB END", "[    4.0] reboot: Power down"]
    return lines


def by_name(checks):
    return {check.name: check for check in checks}


def test_complete_console_passes():
    checks = lab.parse_serial(good_console(), **FULL_RUN)
    assert all(check.passed for check in checks), [c for c in checks if not c.passed]
    names = by_name(checks)
    assert {"guest-booted", "all-steps-ran", "kernel-log-clean", "kernel-not-tainted-by-fault",
            "guest-finished"} <= set(names)


def test_failed_case_keeps_its_detail():
    lines = ["CASE insmod FAIL rc=1 params=none" if line.startswith("CASE insmod ") else line
             for line in good_console()]
    insmod = by_name(lab.parse_serial(lines, **FULL_RUN))["insmod"]
    assert not insmod.passed and insmod.detail == "rc=1 params=none"


def test_missing_step_fails():
    lines = [line for line in good_console() if not line.startswith("CASE cycles ")]
    check = by_name(lab.parse_serial(lines, **FULL_RUN))["all-steps-ran"]
    assert not check.passed and "cycles" in check.detail


@pytest.mark.parametrize("fault", [
    "[    3.2] WARNING: CPU: 0 PID: 77 at net/ipv4/tcp.c:100 tcp_foo+0x1/0x2",
    "[    3.2] BUG: kernel NULL pointer dereference, address: 0000000000000008",
    "[    3.2] Oops: 0000 [#1] PREEMPT SMP NOPTI",
    "[    3.2] Call Trace:",
])
def test_kernel_faults_fail_the_log_check(fault):
    lines = good_console()
    lines.insert(lines.index("TOA-LAB DMESG END"), fault)
    check = by_name(lab.parse_serial(lines, **FULL_RUN))["kernel-log-clean"]
    assert not check.passed and fault[:40] in check.detail


def test_unexpected_taint_fails():
    lines = [line.replace("TAINTED 12288", "TAINTED 12800") for line in good_console()]  # + W (512)
    check = by_name(lab.parse_serial(lines, **FULL_RUN))["kernel-not-tainted-by-fault"]
    assert not check.passed and "unexpected_bits=512" in check.detail


def test_crashed_guest_has_no_end():
    lines = good_console()[:5]
    checks = by_name(lab.parse_serial(lines, **FULL_RUN))
    assert not checks["guest-finished"].passed
    assert not checks["kernel-log-clean"].passed
    assert not checks["all-steps-ran"].passed


def test_case_lines_inside_kernel_noise_still_count():
    lines = good_console()
    lines.append("[    5.0] random: crng init done\rCASE extra-check FAIL why=noise")
    assert not by_name(lab.parse_serial(lines, **FULL_RUN))["extra-check"].passed


# ---------------------------------------------------------------- initramfs and init


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs the cpio tool")
def test_initramfs_is_a_newc_archive_cpio_can_list(tmp_path):
    busybox = tmp_path / "busybox"
    peer_bin = tmp_path / "toa_peer"
    busybox.write_bytes(b"\x7fELF busybox")
    peer_bin.write_bytes(b"\x7fELF peer")
    path = tmp_path / "initrd.gz"
    lab.build_initramfs(path, init="#!/bin/busybox sh\n", busybox=busybox, peer=peer_bin, ko=b"ko-bytes",
                        modules=[("tun.ko", b"tun-bytes")])
    archive = gzip.decompress(path.read_bytes())
    listing = subprocess.run(["cpio", "-itv"], input=archive, capture_output=True, check=True).stdout.decode()
    names = [line.split()[-1] for line in listing.splitlines()]
    assert names == ["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules", "init", "bin/busybox",
                     "bin/toa_peer", "lib/toa.ko", "lib/modules/tun.ko"]
    init_line = next(line for line in listing.splitlines() if line.endswith(" init"))
    assert init_line.startswith("-rwxr-xr-x")
    extract = tmp_path / "x"
    extract.mkdir()
    subprocess.run(["cpio", "-id"], input=archive, cwd=extract, capture_output=True, check=True)
    assert (extract / "lib/modules/tun.ko").read_bytes() == b"tun-bytes"
    assert (extract / "lib/toa.ko").read_bytes() == b"ko-bytes"


def test_init_loads_modules_in_order_and_passes_counts():
    init = lab.render_init(tun_modules=["dep.ko", "tun.ko"], seed=42, fuzz=1000, cycles=100)
    assert init.index("insmod /lib/modules/dep.ko") < init.index("insmod /lib/modules/tun.ko")
    assert 'toa_peer fuzz 42 1000 254,253 "${refused_from:-0}"' in init
    assert 'toa_peer fuzz 43 250 254,253,200 "${refused_from:-0}"' in init
    assert 'toa_peer cycles 100 "$TOA_KO" "trusted=$PEER_TRUSTED"' in init
    assert init.rstrip().endswith("poweroff -f")
    bare = lab.render_init(tun_modules=[], seed=1, fuzz=0, cycles=0)
    assert "toa_peer fuzz" not in bare and "toa_peer cycles" not in bare


def init_variable(init: str, name: str) -> str:
    return re.search(rf"^{name}=(\S+)$", init, re.M).group(1)


def test_trusted_ranges_cover_the_peer_and_only_it():
    """PEER_TRUSTED must hold every source the peer sends from (10.0.N.2 and fd00:N::2, the subnets
    net_up is called with) and OTHER_TRUSTED none, or the trusted= checks prove nothing."""
    init = lab.render_init(tun_modules=[], seed=1, fuzz=10, cycles=2)
    peer_trusted = [ipaddress.ip_network(entry) for entry in init_variable(init, "PEER_TRUSTED").split(",")]
    other_trusted = [ipaddress.ip_network(entry) for entry in init_variable(init, "OTHER_TRUSTED").split(",")]
    source = lab.PEER_SOURCE.read_text()
    subnets = {int(n) for n in re.findall(r"net_up\(&n, (\d+)\)", source)}
    assert subnets == {0, 1}
    assert "n->local4[0] = 10, n->local4[2] = (uint8_t)subnet" in source and "n->peer4[3] = 2;" in source
    assert "lab_v6(n->peer6, subnet, 2);" in source
    for subnet in subnets:
        for address in (ipaddress.ip_address(f"10.0.{subnet}.2"), ipaddress.ip_address(f"fd00:{subnet}::2")):
            assert any(address in network for network in peer_trusted), address
            assert not any(address in network for network in other_trusted), address
    assert {network.version for network in peer_trusted} == {network.version for network in other_trusted} == {4, 6}


def test_init_runs_every_trusted_step():
    init = lab.render_init(tun_modules=[], seed=1, fuzz=10, cycles=2)
    for step in ("toa_peer basic\n", "toa_peer basic trusted", "toa_peer basic untrusted", "toa_peer tfo",
                 "toa_peer netns", 'toa_peer trust-flip "$PEER_TRUSTED" "$OTHER_TRUSTED"', "toa_peer trust-bad",
                 'toa_peer trust-race 300 "$PEER_TRUSTED" "$OTHER_TRUSTED"', "toa_peer many 300",
                 "load insmod-trusted trusted=$PEER_TRUSTED", "load insmod-untrusted trusted=$OTHER_TRUSTED",
                 "load insmod-table8 table_bits=8"):
        assert step in init, step
    source = lab.PEER_SOURCE.read_text()
    for label in lab.TRUST_BAD_VALUES:  # each required trusted-bad-* case is one the peer prints
        assert f'{{ "{label}", ' in source, label
    names = lab.required_cases(fuzz=10, cycles=2)
    assert len(names) == len(set(names))


# ---------------------------------------------------------------- kernel image header


def fake_bzimage(path: Path, banner: bytes) -> Path:
    image = bytearray(0x1000)
    image[0x202:0x206] = b"HdrS"
    image[0x20E:0x210] = (0x400).to_bytes(2, "little")
    image[0x600 : 0x600 + len(banner)] = banner
    path.write_bytes(bytes(image))
    return path


def test_release_from_bzimage_header(tmp_path):
    image = fake_bzimage(tmp_path / "vmlinuz", b"6.8.0-45-generic (buildd@lcy02) #45-Ubuntu SMP\0")
    assert lab.kernel_release(image) == "6.8.0-45-generic"


def test_not_a_bzimage(tmp_path):
    other = tmp_path / "file"
    other.write_bytes(b"\0" * 4096)
    with pytest.raises(ToaError, match="not an x86 bzImage"):
        lab.kernel_release(other)
    hostile = fake_bzimage(tmp_path / "hostile", b"; rm -rf / #\0")
    with pytest.raises(ToaError, match="names no kernel release"):
        lab.kernel_release(hostile)


# ---------------------------------------------------------------- the verify task's own errors

REPO = Path(__file__).resolve().parent.parent


def run_verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", "verify", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("args,expected", [
    (["--suite", "nosuch"], "use one of bullseye, bookworm"),
    ([], "give one of --suite SUITE, --kernel RELEASE or --vmlinuz PATH"),
    (["--suite", "bookworm", "--kernel", "6.1.0-56-amd64"], "give one of"),
    (["--vmlinuz", "/nonexistent/vmlinuz"], "give --ko PATH"),
    (["--vmlinuz", "/nonexistent/vmlinuz", "--ko", "x.ko"], "kernel image /nonexistent/vmlinuz not found"),
    (["--suite", "bookworm", "--seed", "12; rm -rf /"], "--seed must be a whole number"),
])
def test_verify_task_argument_errors(args, expected):
    result = run_verify(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("toa: error: ") and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
