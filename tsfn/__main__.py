"""`python -m tsfn`: the demo, whose code lives in the private module `tsfn._demo`."""

from ._demo import cli

cli()
