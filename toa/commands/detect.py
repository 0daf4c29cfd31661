"""`invoke detect` and `invoke headers`: what a machine is, and the headers its kernel needs."""

from invoke import task

from toa.commands.common import SSH_HELP, print_fields, print_json, ssh_connect, user_errors
from toa.errors import ToaError


@task(help={"root": "inspect a root filesystem (image or mounted disk) instead of this machine",
            "json": "print JSON instead of a table", **SSH_HELP}, auto_shortflags=False)
@user_errors
def detect(c, root=None, host=None, json=False, key=None, known_hosts=None, no_host_key_check=False):
    """Show the distro, kernel and build target of this machine, a root directory or an SSH host."""
    from toa import detect as detection

    if root and host:
        raise ToaError("give --root or --host, not both")
    if host:
        with ssh_connect(host, key, known_hosts, no_host_key_check) as conn:
            facts = detection.read_remote(conn)
        where = host
    elif root:
        facts, where = detection.read_root(root), root
    else:
        facts, where = detection.read_local(), "this machine"
    info = detection.identify(facts).as_dict()
    if json:
        print_json("detect", [info])
    else:
        print_fields(f"toa detect: {where}", info)


@task(help={"kernel": "kernel release to install headers for (default: the running kernel)", **SSH_HELP},
      auto_shortflags=False)
@user_errors
def headers(c, kernel=None, host=None, key=None, known_hosts=None, no_host_key_check=False):
    """Install the kernel headers (kernel-devel) matching the running kernel, or --kernel."""
    from toa import detect as detection
    from toa import headers as kernel_headers

    if host:
        with ssh_connect(host, key, known_hosts, no_host_key_check) as conn:
            outcome = kernel_headers.install(conn, detection.identify(detection.read_remote(conn)), kernel)
    else:
        outcome = kernel_headers.install(c, detection.identify(detection.read_local()), kernel)
    verb = "installed" if outcome.installed else "already installed, nothing to do:"
    print(f"{verb} {outcome.package} ({outcome.path})")
