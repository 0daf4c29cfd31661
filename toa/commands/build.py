"""Tasks of the build concern: build toa.ko (in containers or --local) and make the Debian images."""

import json as jsonlib
import os
from pathlib import Path

from invoke import Exit, task

from toa.commands.common import print_fields, print_json, print_table, progress, user_errors, verdict
from toa.debian import SUITES as DEBIAN_SUITES
from toa.errors import ToaError


def read_kernels_file(path: str) -> list[str]:
    """Kernel releases from a file: one per line, blank lines and # comments ignored."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ToaError(f"cannot read --kernels-file {path}: {exc.strerror}") from None
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


@task(
    iterable=["kernel", "headers_pkg"],
    help={
        "kernel": "kernel release, as `uname -r` prints it on the host (repeatable); a partial one (3.10.0-693) "
                  "is completed. Default: the running kernel. Debian kernels are fetched, others build in containers/",
        "kernels_file": "a file of kernel releases, one per line (# comments)",
        "suite": f"build for the newest kernel of a Debian suite: {', '.join(DEBIAN_SUITES)}",
        "distro": "the target (e.g. ubuntu-18.04) or distro when --kernel is ambiguous",
        "base_image": "base image for a non-Debian recipe instead of the target's default",
        "registry": "pull base images through this registry mirror (host[:port][/path]); default $TOA_REGISTRY",
        "local": "build on this machine against installed headers, without Docker",
        "headers": "with --local: the headers tree (default /lib/modules/<release>/build)",
        "headers_pkg": "a headers package file (.rpm/.deb) for a container recipe, when the repositories lack it "
                       "(repeatable)",
        "out": "output directory: <out>/<target>/<release>/toa.ko, manifest.json, build.log (default: dist)",
        "force": "rebuild even when the same sources were built for the same kernel and image",
        "dry_run": "print what would be built (target, image, headers package, output) and build nothing",
        "json": "print JSON instead of a table",
    },
    auto_shortflags=False,
)
@user_errors
def build(c, kernel=None, kernels_file=None, suite=None, distro=None, base_image=None, registry=None, local=False,
          headers=None, headers_pkg=None, out="dist", force=False, dry_run=False, json=False):
    """Build toa.ko for kernels, each in a container of its distro release; write them with manifests."""
    from rich.console import Console

    from toa import build as builder

    releases = list(kernel or []) + (read_kernels_file(kernels_file) if kernels_file else [])
    if suite and releases:
        raise ToaError("give --kernel/--kernels-file or --suite, not both")
    if kernels_file and not releases:
        raise ToaError(f"--kernels-file {kernels_file} names no kernel")
    registry = registry or os.environ.get("TOA_REGISTRY") or None
    options = dict(distro=distro, base=base_image, registry=registry, local=local,
                   headers=Path(headers) if headers else None, out_dir=Path(out))
    wanted = releases or [None]
    console = Console(stderr=True)

    if dry_run:
        plans = []
        with progress(console) as step:
            for release in wanted:
                plans.append(builder.plan(release, suite, progress=step, **options).as_dict())
        if json:
            print_json("build", plans, dry_run=True)
        else:
            for one in plans:
                print_fields(f"toa build --dry-run: {one['kernel_release']}", one)
                if one["also_runs_on"]:
                    print(f"{one['kernel_release']} also runs on {', '.join(one['also_runs_on'])}: this builds for "
                          f"{one['target']}; give --distro to build for one of those")
        return

    rows, failed = [], 0
    for release in wanted:
        with progress(console) as step:
            try:
                result = builder.build(release, suite, headers_pkgs=tuple(Path(p) for p in headers_pkg or ()),
                                       force=force, progress=step, **options)
            except ToaError as exc:
                if len(wanted) == 1:
                    raise
                failed += 1
                rows.append({"kernel": release, "status": "failed", "error": str(exc)})
                continue
        manifest = jsonlib.loads(result.manifest.read_text())
        rows.append({"kernel": manifest["kernel_release"], "status": "skipped" if result.skipped else "built",
                     "target": manifest.get("target") or manifest.get("suite"), "ko": str(result.ko),
                     "manifest": str(result.manifest), "sha256": manifest["sha256"],
                     "vermagic": manifest["vermagic"], "srcversion": manifest["srcversion"]})
    if json:
        print_json("build", rows, dry_run=False)
    else:
        _print_builds(rows)
    if failed:
        raise Exit(code=1)


def _print_builds(rows):
    from rich.text import Text

    status = {"built": Text("built", style="green"), "skipped": Text("up to date"),
              "failed": Text("failed", style="bold red")}
    print_table("toa build", ("kernel", "status", "output"),
                [(row["kernel"], status[row["status"]], row.get("ko") or row.get("error")) for row in rows])


@task(iterable=["suite"], help={
    "suite": "Debian suite to make images for (repeatable; default: every suite toa builds in)",
    "json": "print JSON instead of a table"}, auto_shortflags=False)
@user_errors
def images(c, suite=None, json=False):
    """Create the Debian base images toa builds in (debootstrap + import, no registry needed) and list them."""
    from rich.console import Console

    from toa import build as builder
    from toa import debian

    names = list(suite or []) or sorted({s.container for s in DEBIAN_SUITES.values()})
    containers = sorted({debian.check_suite(name).container for name in names})
    client = builder.docker_client()
    with progress(Console(stderr=True)) as step:
        for name in containers:
            builder.base_image(client, name, progress=step)
    listing = [{"tag": tag, "id": image.short_id.split(":")[-1], "created": image.attrs.get("Created", "")[:19],
                "size_mb": round(image.attrs.get("Size", 0) / 1e6)}
               for image in client.images.list() for tag in image.tags
               if tag.startswith(("toa-base:", "toa-build:"))]
    if json:
        print_json("images", sorted(listing, key=lambda row: row["tag"]))
        return
    columns = ("tag", "id", "created", "size_mb")
    print_table("toa images", columns,
                [[row[column] for column in columns] for row in sorted(listing, key=lambda row: row["tag"])])


@task(help={"ko": "the module to check (toa.ko, or any .ko/.ko.xz)",
            "kernel": "the kernel release it must load on (default: the release its vermagic names)",
            "headers": "that kernel's build tree (default: /lib/modules/<release>/build, else a Debian kernel's "
                       "headers fetched into the cache)",
            "json": "print JSON instead of a table"},
      auto_shortflags=False)
@user_errors
def preflight(c, ko, kernel=None, headers=None, json=False):
    """Check a module against what the kernel's loader accepts: vermagic, relocation types, symbol CRCs,
    SUSE's supported tag, forced signatures. Exit status 1 when a check fails."""
    from toa import preflight as checks

    release, results = checks.check_file(Path(ko), kernel, Path(headers) if headers else None)
    refused = checks.refusal(results, release)
    if json:
        print_json("preflight", [{"ko": ko, "kernel": release, "ok": refused is None,
                                  "checks": checks.as_manifest(results)}])
    else:
        print_table(f"toa preflight: {ko} for {release}", ("check", "result", "detail"),
                    [(check.name, verdict(check.ok, passed="pass"), check.detail) for check in results])
    if refused:
        raise Exit(refused if not json else None, code=1)
