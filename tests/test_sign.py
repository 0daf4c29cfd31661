"""toa.sign: real modules signed with the kernel's own sign-file, read back by kmod's modinfo, and
refused with the cause named by a real kernel booted with module.sig_enforce=1."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.cli import assert_one_line_error, json_items, toa as run_toa
from toa import build, debian, lab, sign
from toa.errors import ToaError
from toa.ko import SIGNATURE_MAGIC

SIGNER = "toa test signing key"
# The kernel's own certs/default_x509.genkey, which makes the key a kernel build signs with.
X509_GENKEY = """[ req ]
default_bits = 2048
distinguished_name = req_distinguished_name
prompt = no
string_mask = utf8only
x509_extensions = myexts

[ req_distinguished_name ]
O = toa tests
CN = {cn}

[ myexts ]
basicConstraints=critical,CA:FALSE
keyUsage=digitalSignature
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
"""


def make_key(folder: Path, cn: str = SIGNER) -> tuple[Path, Path]:
    """A signing key and self-signed certificate made with openssl, as for a kernel build."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "x509.genkey"
    config.write_text(X509_GENKEY.format(cn=cn))
    key, cert = folder / "signing_key.pem", folder / "signing_key.x509"
    subprocess.run(["openssl", "req", "-new", "-nodes", "-utf8", "-sha256", "-days", "30", "-batch", "-x509",
                    "-config", str(config), "-outform", "DER", "-out", str(cert), "-keyout", str(key)],
                   capture_output=True, check=True)
    return key, cert


def modinfo_field(module: Path, field: str) -> str:
    """kmod's own modinfo: it parses the PKCS#7 signature independently of toa."""
    return subprocess.run(["modinfo", "-F", field, str(module)], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def bookworm_kernel() -> debian.KernelTree:
    return debian.prepare(None, "bookworm")[1]


@pytest.fixture(scope="module")
def unsigned_dist(tmp_path_factory, bookworm_kernel) -> Path:
    out = tmp_path_factory.mktemp("dist")
    build.build_kernel(bookworm_kernel.release, out_dir=out)
    return out


@pytest.fixture
def dist(unsigned_dist, tmp_path) -> Path:
    """A copy of the built dist/, each test signing its own."""
    copy = tmp_path / "dist"
    shutil.copytree(unsigned_dist, copy)
    return copy


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    return make_key(tmp_path_factory.mktemp("keys"))


@pytest.mark.docker
@pytest.mark.network
def test_sign_task_signs_with_the_kernels_sign_file_and_records_the_signer(dist, keys, bookworm_kernel):
    release = bookworm_kernel.release
    [ko] = dist.glob(f"*/{release}/toa.ko")
    unsigned = ko.read_bytes()
    assert sign.appended_signature(unsigned) is None
    key, cert = keys

    result = run_toa("sign", "--key", str(key), "--cert", str(cert), "--dist", str(dist), "--kernel", release, "--json")
    assert result.returncode == 0, result.stderr
    [printed] = json_items(result, "sign")

    signed = ko.read_bytes()
    assert modinfo_field(ko, "signer") == SIGNER
    assert modinfo_field(ko, "sig_hashalgo") == "sha256"  # CONFIG_MODULE_SIG_HASH of Debian's kernels
    assert modinfo_field(ko, "sig_id") == "PKCS#7"
    assert modinfo_field(ko, "vermagic").split()[0] == release
    signature = sign.appended_signature(signed)
    assert signature.id_type == sign.PKEY_ID_PKCS7 and signed[: len(signed) - signature.total] == unsigned

    manifest = json.loads(ko.with_name("manifest.json").read_text())
    assert manifest == {key: value for key, value in printed.items() if key != "ko"}
    assert manifest["signature"]["signer"] == SIGNER
    assert manifest["signature"]["serial"] == modinfo_field(ko, "sig_key")
    assert manifest["sha256"] == hashlib.sha256(signed).hexdigest()
    assert manifest["unsigned_sha256"] == hashlib.sha256(unsigned).hexdigest()
    assert manifest["size"] == len(signed)

    # Signing again with another key replaces the signature instead of stacking a second one.
    other_key, other_cert = make_key(dist.parent / "other", cn="another signer")
    sign.sign_modules(other_key, other_cert, dist, [release])
    assert modinfo_field(ko, "signer") == "another signer"
    assert sign.unsigned_bytes(ko.read_bytes()) == unsigned
    assert json.loads(ko.with_name("manifest.json").read_text())["unsigned_sha256"] == manifest["unsigned_sha256"]


@pytest.mark.docker
@pytest.mark.network
def test_a_key_that_does_not_match_the_certificate_is_refused_before_signing(dist, keys, tmp_path):
    other_key, _ = make_key(tmp_path / "other")
    [ko] = dist.glob("*/*/toa.ko")
    before = ko.read_bytes()
    result = run_toa("sign", "--key", str(other_key), "--cert", str(keys[1]), "--dist", str(dist))
    assert_one_line_error(result, "is not the key of")
    assert ko.read_bytes() == before


@pytest.mark.parametrize("what, fragment", [
    ("missing", "not found"),
    ("not-a-cert", "is not an X.509 certificate"),
    ("encrypted", "is encrypted"),
])
def test_bad_signing_material_is_one_line(what, fragment, keys, tmp_path):
    key, cert = keys
    if what == "missing":
        cert = tmp_path / "nothing.x509"
    elif what == "not-a-cert":
        cert = tmp_path / "junk.x509"
        cert.write_bytes(b"not a certificate")
    else:
        encrypted = tmp_path / "encrypted.pem"
        subprocess.run(["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:secret", "-out", str(encrypted)],
                       check=True, capture_output=True)
        key = encrypted
    assert_one_line_error(run_toa("sign", "--key", str(key), "--cert", str(cert), "--dist", str(tmp_path)), fragment)


def encrypted_copy(key: Path, folder: Path, passphrase: str) -> Path:
    encrypted = folder / "encrypted.pem"
    subprocess.run(["openssl", "pkey", "-in", str(key), "-aes256", "-passout", f"pass:{passphrase}", "-out", str(encrypted)],
                   check=True, capture_output=True)
    encrypted.chmod(0o600)
    return encrypted


@pytest.mark.docker
@pytest.mark.network
def test_an_encrypted_key_signs_with_its_passphrase_from_a_file_or_the_environment(dist, keys, tmp_path):
    import os

    key, cert = keys
    encrypted = encrypted_copy(key, tmp_path, "correct horse")
    [ko] = dist.glob("*/*/toa.ko")
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("correct horse\n")
    result = run_toa("sign", "--key", str(encrypted), "--cert", str(cert), "--dist", str(dist),
                     "--key-passphrase-file", str(passphrase))
    assert result.returncode == 0, result.stderr
    assert modinfo_field(ko, "signer") == SIGNER
    other_key, other_cert = make_key(tmp_path / "other", cn="another signer")
    other = encrypted_copy(other_key, tmp_path / "other", "battery staple")
    result = run_toa("sign", "--key", str(other), "--cert", str(other_cert), "--dist", str(dist),
                     env={**os.environ, "KBUILD_SIGN_PIN": "battery staple"})
    assert result.returncode == 0, result.stderr
    assert modinfo_field(ko, "signer") == "another signer"


@pytest.mark.parametrize("how, fragment", [
    ("none", "is encrypted: give its passphrase with --key-passphrase-file"),
    ("wrong", "the passphrase does not open"),
    ("empty", "is empty"),
    ("missing", "passphrase file"),
])
def test_a_passphrase_problem_is_one_line(how, fragment, keys, tmp_path):
    key, cert = keys
    encrypted = encrypted_copy(key, tmp_path, "secret")
    passphrase = tmp_path / "passphrase"
    passphrase.write_text({"wrong": "not it\n", "empty": ""}.get(how, "secret"))
    args = ["--key-passphrase-file", str(tmp_path / "absent" if how == "missing" else passphrase)] if how != "none" else []
    result = run_toa("sign", "--key", str(encrypted), "--cert", str(cert), "--dist", str(tmp_path / "dist"), *args)
    assert_one_line_error(result, fragment)


def test_a_key_others_can_read_is_warned_about(keys, tmp_path, capsys):
    key, cert = keys
    shared = tmp_path / "shared.pem"
    shutil.copyfile(key, shared)
    shared.chmod(0o640)
    assert sign.load_identity(shared, cert).signer == SIGNER
    assert f"signing key {shared} is readable by group or others (mode 0640): chmod 600" in capsys.readouterr().err
    shared.chmod(0o600)
    sign.load_identity(shared, cert)
    assert capsys.readouterr().err == ""


def test_sign_task_needs_key_and_cert(tmp_path):
    assert_one_line_error(run_toa("sign", "--dist", str(tmp_path)), "give --key KEY and --cert CERT")


def test_the_signature_trailer_parser_on_a_hand_made_trailer():
    blob = b"S" * 300
    module = b"\x7fELF module bytes"
    trailer = bytes([0, 0, sign.PKEY_ID_PKCS7, 0, 0, 0, 0, 0]) + len(blob).to_bytes(4, "big") + SIGNATURE_MAGIC
    parsed = sign.appended_signature(module + blob + trailer)
    assert parsed == sign.AppendedSignature(sign.PKEY_ID_PKCS7, 300, 300 + 12 + len(SIGNATURE_MAGIC))
    assert sign.unsigned_bytes(module + blob + trailer) == module
    assert sign.appended_signature(module) is None
    broken = bytes(8) + (10**6).to_bytes(4, "big") + SIGNATURE_MAGIC
    with pytest.raises(ToaError, match="claims more bytes"):
        sign.appended_signature(module + broken)


def test_a_kernel_without_module_signing_is_named(tmp_path):
    (tmp_path / ".config").write_text("CONFIG_MODULES=y\n# CONFIG_MODULE_SIG is not set\n")
    with pytest.raises(ToaError, match="built without module signing"):
        sign.signature_hash(tmp_path)


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.network
def test_sig_enforce_refuses_an_untrusted_signer_with_the_cause_named(dist, keys, bookworm_kernel, tmp_path):
    release = bookworm_kernel.release
    sign.sign_modules(*keys, dist, [release])
    [ko] = dist.glob(f"*/{release}/toa.ko")
    result = run_toa("verify", "--kernel", release, "--ko", str(ko), "--sig-enforce", "--fuzz", "0", "--cycles", "0",
                     "--timeout", "300", "--log-dir", str(tmp_path / "lab"), "--json")
    assert result.returncode != 0, result.stdout
    [report] = json_items(result, "verify")
    [check] = [check for check in report["checks"] if check["name"] == "module-signature"]
    assert not check["passed"]
    assert check["detail"].startswith(f"{lab.KEY_REJECTED} (Loading of module with unavailable key is rejected)")


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.network
def test_sig_enforce_refuses_an_unsigned_module_with_the_same_cause(unsigned_dist, bookworm_kernel, tmp_path):
    [ko] = unsigned_dist.glob(f"*/{bookworm_kernel.release}/toa.ko")
    report = lab.verify(bookworm_kernel.vmlinuz, ko, bookworm_kernel.release, bookworm_kernel.modules_dir,
                        log_dir=tmp_path, timeout=300, cycles=0, fuzz=0, sig_enforce=True)
    assert not report.ok
    [check] = [check for check in report.checks if check.name == "module-signature"]
    assert not check.passed
    assert check.detail.startswith(f"{lab.KEY_REJECTED} (Loading of unsigned module is rejected)")
    assert "insmod" in [failed.name for failed in report.failed]


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.network
def test_a_locked_down_kernel_refuses_the_unsigned_module_and_gets_toa_from_the_bpf_engine(
        unsigned_dist, bookworm_kernel, tmp_path):
    """module.sig_enforce=1 lockdown=integrity: no unsigned toa.ko, and the eBPF engine proves every rule."""
    from toa import engine_bpf

    [ko] = unsigned_dist.glob(f"*/{bookworm_kernel.release}/toa.ko")
    bpf = engine_bpf.build(tmp_path / "bpf")
    report = lab.verify(bookworm_kernel.vmlinuz, ko, bookworm_kernel.release, bookworm_kernel.modules_dir,
                        log_dir=tmp_path / "lab", timeout=600, cycles=5, fuzz=200, sig_enforce=True,
                        engine="bpf", bpf=bpf)
    checks = {check.name: check for check in report.checks}
    assert report.ok, [(check.name, check.detail) for check in report.failed]
    assert checks["lockdown-integrity"].passed and "[integrity]" in checks["lockdown-integrity"].detail
    assert checks["module-refused"].passed and "key_rejected=1" in checks["module-refused"].detail
    for name in ("v4", "v6-kind253", "v4-mapped", "trusted-basic", "fuzz-kinds2", "cycles", "hold-after-unload"):
        assert checks[name].passed, name
    serial = report.serial_log.read_text()
    assert f"{lab.SIG_ENFORCE_CMDLINE} {lab.LOCKDOWN_CMDLINE}" in serial  # the kernel's command line, as booted
    assert "Loading of unsigned module is rejected" in serial
