"""toa: build, prove and deploy the TOA (TCP Option Address) kernel module."""

__version__ = "0.1.0"
