"""Sign built modules for kernels that check signatures (Secure Boot, module.sig_enforce=1).

The kernel's own scripts/sign-file does the signing, from the headers toa.debian fetched. It is linked
against its release's libcrypto, so it runs in that suite's build container. The signature is
appended to toa.ko (a PKCS#7 blob, a struct module_signature, then a magic string); the manifest
records who signed it.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from toa import artifacts, debian
from toa import build as builder
from toa.artifacts import Artifact
from toa.errors import ToaError
from toa.ko import SIGNATURE_MAGIC

# struct module_signature: algo, hash, id_type, signer_len, key_id_len, 3 pad bytes, sig_len (big endian).
SIGNATURE_INFO = struct.Struct(">BBBBB3xI")
PKEY_ID_PKCS7 = 2
SIG_HASH_RE = re.compile(r'^CONFIG_MODULE_SIG_HASH="([a-z0-9-]+)"$', re.M)


@dataclass(frozen=True)
class AppendedSignature:
    id_type: int
    length: int  # bytes of the signature blob
    total: int  # bytes appended to the module: blob, info and magic


def appended_signature(data: bytes) -> AppendedSignature | None:
    """The signature appended to a module's bytes, or None when it carries none."""
    if not data.endswith(SIGNATURE_MAGIC) or len(data) < len(SIGNATURE_MAGIC) + SIGNATURE_INFO.size:
        return None
    info_start = len(data) - len(SIGNATURE_MAGIC) - SIGNATURE_INFO.size
    _, _, id_type, _, _, length = SIGNATURE_INFO.unpack_from(data, info_start)
    if length > info_start:
        raise ToaError("the module's signature trailer claims more bytes than the file has: rebuild the module")
    return AppendedSignature(id_type, length, length + SIGNATURE_INFO.size + len(SIGNATURE_MAGIC))


def unsigned_bytes(data: bytes) -> bytes:
    """The module without its appended signature (re-signing replaces the old one)."""
    signature = appended_signature(data)
    return data[: len(data) - signature.total] if signature else data


@dataclass(frozen=True)
class SigningIdentity:
    """A private key and the X.509 certificate that goes with it, ready for sign-file."""

    key_pem: bytes
    cert_der: bytes
    signer: str  # the certificate subject's common name
    issuer: str  # what modinfo shows as signer: the issuer's common name
    serial: str  # what modinfo shows as sig_key

    @property
    def cert_sha256(self) -> str:
        return hashlib.sha256(self.cert_der).hexdigest()


def _common_name(name: x509.Name) -> str:
    names = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else name.rfc4514_string()


# The passphrase of an encrypted signing key, where the kernel's own sign-file looks for it.
PASSPHRASE_ENV = "KBUILD_SIGN_PIN"


def read_passphrase(passphrase_file: Path | None) -> bytes | None:
    """The signing key's passphrase: the first line of PASSPHRASE_FILE, else $KBUILD_SIGN_PIN, else None."""
    if passphrase_file is None:
        pin = os.environ.get(PASSPHRASE_ENV)
        return pin.encode() if pin else None
    path = Path(passphrase_file)
    if not path.is_file():
        raise ToaError(f"passphrase file {path} not found: give --key-passphrase-file a file holding the passphrase")
    lines = path.read_bytes().splitlines()
    if not lines or not lines[0]:
        raise ToaError(f"passphrase file {path} is empty: put the key's passphrase on its first line")
    return lines[0]


def _warn_if_readable_by_others(key: Path) -> None:
    mode = key.stat().st_mode & 0o777
    if mode & 0o077:
        print(f"toa: warning: signing key {key} is readable by group or others (mode {mode:04o}): chmod 600 {key}",
              file=sys.stderr)


def load_identity(key: Path, cert: Path, passphrase: bytes | None = None) -> SigningIdentity:
    """Read and check a signing key (unencrypted, or encrypted with PASSPHRASE) and its certificate
    (PEM or DER)."""
    key, cert = Path(key), Path(cert)
    for path, what in ((key, "key"), (cert, "certificate")):
        if not path.is_file():
            raise ToaError(f"signing {what} {path} not found: pass --key and --cert files")
    _warn_if_readable_by_others(key)
    cert_bytes = cert.read_bytes()
    try:
        certificate = (x509.load_pem_x509_certificate(cert_bytes) if b"-----BEGIN" in cert_bytes
                       else x509.load_der_x509_certificate(cert_bytes))
    except ValueError:
        raise ToaError(f"{cert} is not an X.509 certificate (PEM or DER): pass the certificate of the signing key") from None
    key_bytes = key.read_bytes()
    load = serialization.load_pem_private_key if b"-----BEGIN" in key_bytes else serialization.load_der_private_key
    try:
        private_key = load(key_bytes, password=None)
    except TypeError:  # encrypted
        if passphrase is None:
            raise ToaError(f"{key} is encrypted: give its passphrase with --key-passphrase-file FILE "
                           f"or ${PASSPHRASE_ENV}") from None
        try:
            private_key = load(key_bytes, password=passphrase)
        except ValueError:
            raise ToaError(f"the passphrase does not open {key}: check --key-passphrase-file or ${PASSPHRASE_ENV}") from None
    except ValueError:
        raise ToaError(f"{key} is not a private key (PEM or DER): pass the key the certificate was made for") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (private_key.public_key().public_bytes(serialization.Encoding.DER, public)
            != certificate.public_key().public_bytes(serialization.Encoding.DER, public)):
        raise ToaError(f"{key} is not the key of {cert}: pass the matching pair")
    serial = f"{certificate.serial_number:x}"
    return SigningIdentity(
        key_pem=private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()),
        cert_der=certificate.public_bytes(serialization.Encoding.DER),
        signer=_common_name(certificate.subject),
        issuer=_common_name(certificate.issuer),
        serial=":".join(re.findall("..", serial.zfill(len(serial) + len(serial) % 2))).upper(),
    )


def signature_hash(headers_dir: Path) -> str:
    """The hash the kernel signs its own modules with (CONFIG_MODULE_SIG_HASH)."""
    config = Path(headers_dir) / ".config"
    text = config.read_text() if config.is_file() else ""
    if "CONFIG_MODULE_SIG=y" not in text.splitlines():
        raise ToaError(f"the kernel of {headers_dir} is built without module signing (no CONFIG_MODULE_SIG): "
                       "it neither needs nor checks signatures")
    match = SIG_HASH_RE.search(text)
    return match.group(1) if match else "sha256"


def _sign_file_in_container(client, image, sign_file: Path, mount_root: Path, hash_name: str,
                            identity: SigningIdentity, module: bytes) -> bytes:
    """Run the kernel's sign-file on MODULE in IMAGE (offline, as the invoking user); the signed bytes."""
    with tempfile.TemporaryDirectory(prefix="toa-sign-") as scratch_name:
        scratch = Path(scratch_name)
        (scratch / "signing.key").write_bytes(identity.key_pem)
        (scratch / "signing.key").chmod(0o600)
        (scratch / "signing.crt").write_bytes(identity.cert_der)
        (scratch / "toa.ko").write_bytes(module)
        container = client.containers.run(
            image.id,
            [str(sign_file), hash_name, "/sign/signing.key", "/sign/signing.crt", "/sign/toa.ko"],
            detach=True, network_disabled=True, user=f"{os.getuid()}:{os.getgid()}",
            volumes={str(mount_root): {"bind": str(mount_root), "mode": "ro"},
                     str(scratch): {"bind": "/sign", "mode": "rw"}},
        )
        try:
            status = container.wait().get("StatusCode", 1)
            log = container.logs(stdout=True, stderr=True).decode(errors="replace")
        finally:
            container.remove(force=True)
        if status != 0:
            tail = " | ".join(log.strip().splitlines()[-3:]) or "no output"
            raise ToaError(f"sign-file failed (exit {status}): {tail}")
        return (scratch / "toa.ko").read_bytes()


def sign_artifact(artifact: Artifact, identity: SigningIdentity,
                  progress: Callable[[str], None] | None = None) -> dict:
    """Sign one built module with its kernel's sign-file; rewrite toa.ko and its manifest; the manifest."""
    say = progress or (lambda message: None)
    release, suite = artifact.release, artifact.manifest.get("suite")
    if not suite:
        raise ToaError(f"{artifact.ko} was not built for a Debian kernel: toa signs with the sign-file of the "
                       "Debian headers it fetches; sign other kernels' modules with their own scripts/sign-file")
    _, tree = debian.prepare(release, None, progress=say)
    sign_file = (tree.headers_dir / "scripts" / "sign-file").resolve()
    mount_root = debian.kernel_dir(release) / "root"
    if not sign_file.is_file() or mount_root.resolve() not in sign_file.parents:
        raise ToaError(f"no scripts/sign-file in the headers of {release}: remove {debian.kernel_dir(release)} to fetch them again")
    hash_name = signature_hash(tree.headers_dir)
    client = builder.docker_client()
    container_suite = debian.check_suite(suite).container
    image = builder.build_image(client, container_suite,
                                builder.compiler_package(builder.headers_compiler(tree.headers_dir)), say)
    unsigned = unsigned_bytes(artifact.ko.read_bytes())
    say(f"signing {artifact.ko} with {release}'s sign-file ({hash_name}) in toa-build:debian-{container_suite}")
    signed = _sign_file_in_container(client, image, sign_file, mount_root.resolve(), hash_name, identity, unsigned)
    signature = appended_signature(signed)
    if signature is None or signature.id_type != PKEY_ID_PKCS7 or signed[: len(signed) - signature.total] != unsigned:
        raise ToaError(f"sign-file of {release} left no PKCS#7 signature on toa.ko: check the key and certificate")
    artifact.verify_module(signed)  # signing appends a signature; vermagic and srcversion stay the manifest's
    manifest = {
        **artifact.manifest,
        "unsigned_sha256": hashlib.sha256(unsigned).hexdigest(),
        "signature": {
            "signer": identity.signer,
            "issuer": identity.issuer,
            "serial": identity.serial,
            "hash": hash_name,
            "certificate_sha256": identity.cert_sha256,
            "signed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }
    return artifacts.write(artifact.ko.parent, signed, manifest).manifest  # sha256 and size: the signed file's


def sign_modules(key: Path, cert: Path, dist: Path = Path("dist"), kernels: list[str] | None = None,
                 progress: Callable[[str], None] | None = None,
                 passphrase: bytes | None = None) -> list[tuple[Artifact, dict]]:
    """Sign the modules built under DIST for KERNELS (default: all of them) with KEY (opened with
    PASSPHRASE when encrypted) and CERT."""
    identity = load_identity(key, cert, passphrase)
    return [(artifact, sign_artifact(artifact, identity, progress)) for artifact in artifacts.find_all(dist, kernels)]
