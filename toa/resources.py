"""Where toa's own files live: all inside the package, so a checkout and an installed wheel find them
the same way (pyproject's package-data ships each folder named here)."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
MODULE_SOURCE = PACKAGE_DIR / "module"  # the kernel module's sources (toa.c, Kbuild, probes/)
BPF_SOURCE = PACKAGE_DIR / "bpf"  # the eBPF engine's sources
GUEST_DIR = PACKAGE_DIR / "guest"  # the QEMU lab's /init templates and test peer
TEMPLATES_DIR = PACKAGE_DIR / "templates"  # every file toa writes on a host
PACKAGE_TEMPLATES_DIR = TEMPLATES_DIR / "package"  # .deb/.rpm/DKMS metadata and scripts
ANSIBLE_TEMPLATES_DIR = TEMPLATES_DIR / "ansible"  # the exported role's static files
CONTAINERS_DIR = PACKAGE_DIR / "containers"  # the build recipes, one Dockerfile per distro family
