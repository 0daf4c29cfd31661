"""Roll toa.ko (or the eBPF engine) out to hosts over SSH and keep it running across reboots.

Shaped like pyinfra: a *fact* is one shell command whose output a pure function parses (tested
offline on recorded output); the *plan* compares what a host has with what it should have and lists
only the steps that close the gap, so a second run finds nothing to do and says so. Per host, over
one SSH connection: one request for the facts, then, for the module, one for the apply (the eBPF
engine's deploy still sends a command per step).

One file per job; each imports only the ones above it in this list:

- facts.py: what a host has: the one facts command (root or sudo, platform, module and eBPF engine
  state, other kernels' toa.ko, the preflight's reading of the kernel's tree) and its pure parsers.
- plan.py: what should change: the engine choice, the wanted parameters, the module's and the eBPF
  engine's plans, toa.ko for the other kernels. Pure.
- host.py: one host of a run: what the run asks (DeployOptions) and reports (HostResult), and the
  connection (Host: sudo, the time limits, the one reconnect).
- builds.py: what a host gets installed: the toa.ko artifact for its kernel and the eBPF engine's
  build (built with --build-missing, one build at a time), and the preflight before an upload.
- apply.py: the apply script (one per host, its rollback inside), its outcome, the one way a file is
  written, the load and its check, the undo steps.
- bpf.py: the eBPF engine's deploy, a command each from here, and its check.
- fleet.py: a host's deploy (deploy_host), the fleet (run_fleet, deploy) and status.
"""
