"""Tasks that hand toa.ko to package managers and Secure Boot: `package` and `sign`."""

from pathlib import Path

from invoke import task

from toa.commands.common import module_options, print_fields, print_json, progress, user_errors
from toa.errors import ToaError


@task(iterable=["kernel", "option"],
      help={"format": "dkms (source package that rebuilds on kernel upgrades), deb or rpm (per-kernel kmod packages; "
                      "SUSE kernels' as KMPs, toa-kmp-<flavor>)",
            "kernel": "with deb/rpm: package the module built for this kernel release (repeatable; "
                      "default: every module under --dist)",
            "dist": "where `invoke build` put the modules: <dist>/<target>/<release>/ (default: dist)",
            "out": "where the packages go (default: <dist>/packages)",
            "option": "with deb/rpm: a module option NAME=VALUE the package's /etc/modprobe.d/toa.conf sets, "
                      "e.g. trusted=100.64.0.0/10 (repeatable)",
            "engine": "module (default) or bpf: with deb/rpm, one toa-bpf package of the eBPF engine built in "
                      "<dist>/bpf (its loader and toa-bpf.service), for every kernel from 5.10",
            "json": "print the package paths as JSON"}, auto_shortflags=False)
@user_errors
def package(c, format=None, kernel=None, dist="dist", out=None, option=None, json=False, engine="module"):
    """Package toa for package managers: a DKMS package, kmod .deb/.rpm packages of built modules, or the
    eBPF engine's toa-bpf .deb/.rpm."""
    from rich.console import Console

    from toa import package as packaging

    if not format:
        raise ToaError(f"give --format: one of {', '.join(packaging.FORMATS)}")
    with progress(Console(stderr=True)) as step:
        paths = packaging.build_packages(format, Path(dist), kernel or None, Path(out) if out else None, progress=step,
                                         options=module_options(option) or None, engine=engine)
    if json:
        print_json("package", [{"format": format, "package": str(path)} for path in paths])
    else:
        print_fields(f"toa package: {format}", {path.name: str(path.parent) for path in paths})


@task(iterable=["kernel"], auto_shortflags=False,
      help={"key": "the signing private key (PEM or DER; encrypted: see --key-passphrase-file)",
            "key_passphrase_file": "a file whose first line is the key's passphrase (default: $KBUILD_SIGN_PIN, "
                                   "as the kernel's sign-file reads it)",
            "cert": "the X.509 certificate of that key (PEM or DER); the kernel must trust it to load the module",
            "kernel": "sign the module built for this kernel release (repeatable; default: every module under --dist)",
            "dist": "where `invoke build` put the modules: <dist>/<target>/<release>/ (default: dist)",
            "json": "print the updated manifests as JSON"})
@user_errors
def sign(c, key=None, cert=None, kernel=None, dist="dist", key_passphrase_file=None, json=False):
    """Sign built modules with the kernel's own sign-file; the manifest records the signer."""
    from rich.console import Console

    from toa import sign as signing

    if not key or not cert:
        raise ToaError("give --key KEY and --cert CERT (the signing key and its X.509 certificate)")
    with progress(Console(stderr=True)) as step:
        passphrase = signing.read_passphrase(Path(key_passphrase_file) if key_passphrase_file else None)
        signed = signing.sign_modules(Path(key), Path(cert), Path(dist), kernel or None, progress=step,
                                      passphrase=passphrase)
    if json:
        print_json("sign", [{**manifest, "ko": str(artifact.ko)} for artifact, manifest in signed])
        return
    for artifact, manifest in signed:
        signature = manifest["signature"]
        print_fields(f"toa sign: {artifact.release}", {
            "path": str(artifact.ko),
            "signer": signature["signer"],
            "key serial": signature["serial"],
            "hash": signature["hash"],
            "sha256": manifest["sha256"][:16] + "…",
        })
