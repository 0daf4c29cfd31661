"""invoke tasks for toa: `invoke --list` shows them. The work lives in the `toa` package."""

from toa.tasks import ns  # noqa: F401  (invoke looks for `ns`)
