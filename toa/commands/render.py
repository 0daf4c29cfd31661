"""`invoke render`: preview the files that load toa.ko at boot on a distro release."""

from pathlib import Path

from invoke import task

from toa.commands.common import module_options, print_json, print_table, user_errors
from toa.errors import ToaError


@task(
    help={
        "distro": "the target (e.g. ubuntu-22.04, centos-7) or distro; optional when --kernel names one",
        "kernel": "kernel release of the host, as `uname -r` prints it (a partial one is completed)",
        "init": "the host's init: systemd (default), sysv or other, as `invoke detect` reports it",
        "option": "a module option NAME=VALUE, e.g. trusted=100.64.0.0/10 or kinds=254,253 (repeatable)",
        "out": "directory to write the files into, laid out as on the host (DIR/etc/...)",
        "json": "print the files (path, mode, kind, content) as JSON instead of a table",
    },
    iterable=["option"],
    auto_shortflags=False,
)
@user_errors
def render(c, kernel=None, distro=None, init="systemd", option=None, out=None, json=False):
    """Write the boot-time autoload files for a distro release and kernel into --out, to preview them."""
    from toa import kernel as kernels
    from toa import render as rendering

    if not kernel:
        raise ToaError("give --kernel RELEASE (as `uname -r` prints it on the host)")
    if not out:
        raise ToaError("give --out DIR: the directory to write the files into")
    options = module_options(option)
    resolution = kernels.resolve(kernel, distro)
    release, target = resolution.kernel.release, resolution.target
    files = rendering.autoload_files(target, release, init=init, options=options) + rendering.hook_sources(target)
    written = rendering.write_tree(files, Path(out))
    if json:
        print_json("render", [{
            "target": target.id, "kernel": release, "init": init,
            "module": rendering.module_path(target, release),
            "files": [{**entry.as_dict(), "written": str(path)} for entry, path in zip(files, written)],
        }])
        return
    _print_table(target.id, release, rendering.module_path(target, release), files, out)


def _print_table(target_id, release, module, files, out):
    kinds = {"lines": "lines to merge"}
    print_table(f"toa render: {target_id}, kernel {release}", ("path on the host", "mode", "kind"),
                [(entry.path, None if entry.kind == "symlink" else f"{entry.mode:04o}",
                  f"symlink to {entry.content}" if entry.kind == "symlink" else kinds.get(entry.kind, "file"))
                 for entry in files],
                caption=f"module: {module}; written under {out}")
