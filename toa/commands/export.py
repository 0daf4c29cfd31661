"""`invoke export kmm|ansible`: hand the built modules to Kubernetes KMM or to Ansible."""

from pathlib import Path

from invoke import task

from toa.commands.common import module_options, print_fields, print_json, progress, user_errors
from toa.errors import ToaError

ENGINES = ("kmm", "ansible")


@task(positional=["engine"], iterable=["kernel", "option", "selector"], auto_shortflags=False,
      help={"engine": "kmm (kmod images and a KMM Module manifest) or ansible (a role and a playbook)",
            "out": "the directory to write into",
            "dist": "where `invoke build` put the modules: <dist>/<target>/<release>/ (default: dist)",
            "kernel": "export the module built for this kernel release (repeatable; default: every one under --dist)",
            "option": "a module option NAME=VALUE, e.g. trusted=100.64.0.0/10 (repeatable)",
            "registry": "kmm: the registry the cluster pulls from, host[:port][/path]; images are tagged "
                        "<registry>/toa-kmod:<release> (pushing them is yours to do)",
            "namespace": "kmm: the Module's namespace (default: default)",
            "selector": "kmm: a node label KEY=VALUE the Module selects (repeatable; default: kubernetes.io/os=linux)",
            "sign_key_secret": "kmm: the Secret holding the signing key (as for `invoke sign`): KMM signs in the "
                               "cluster; needs --sign-cert-secret",
            "sign_cert_secret": "kmm: the Secret holding the signing certificate",
            "json": "print what was written as JSON"})
@user_errors
def export(c, engine=None, out=None, dist="dist", kernel=None, option=None, registry=None, namespace="default",
           selector=None, sign_key_secret=None, sign_cert_secret=None, json=False):
    """Hand the modules under dist/ to Kubernetes KMM (kmod images, Module manifest) or Ansible (a role)."""
    from rich.console import Console

    from toa import export as exporting

    if engine in ("-h", "--help"):  # a positional argument takes the word invoke would read as --help
        from toa.cli import program

        program.run(["toa", "--help", "export"], exit=False)
        return
    if engine not in ENGINES:
        raise ToaError(f"give the engine to export to: `invoke export kmm` or `invoke export ansible`, not {engine!r}")
    if not out:
        raise ToaError("give --out DIR: the directory to write into")
    options = module_options(option) or None
    if engine == "kmm":
        if not registry:
            raise ToaError("give --registry HOST[/PATH]: the registry your cluster pulls the kmod images from")
        if bool(sign_key_secret) != bool(sign_cert_secret):
            raise ToaError("give both --sign-key-secret and --sign-cert-secret, or neither")
        secrets = (sign_key_secret, sign_cert_secret) if sign_key_secret else None
        with progress(Console(stderr=True)) as step:
            manifest, images = exporting.kmm(Path(dist), Path(out), registry, kernels=kernel or None, options=options,
                                             namespace=namespace, selector=exporting.parse_selector(selector),
                                             sign_secrets=secrets, progress=step)
        if json:
            print_json("export", [{"engine": "kmm", "manifest": str(manifest),
                                   "images": [{"kernel": i.release, "image": i.reference, "sha256": i.sha256}
                                              for i in images]}])
        else:
            print_fields(f"toa export kmm: {manifest}", {image.release: image.reference for image in images})
        return
    with progress(Console(stderr=True)) as step:
        role = exporting.ansible(Path(dist), Path(out), kernels=kernel or None, options=options, progress=step)
    if json:
        print_json("export", [{"engine": "ansible", "role": str(role.role), "playbook": str(role.playbook),
                               "kernels": role.kernels}])
    else:
        print_fields(f"toa export ansible: {role.role}", {"playbook": str(role.playbook),
                                                         "kernels": role.kernels})
