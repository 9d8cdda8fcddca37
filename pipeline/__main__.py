"""`python -m pipeline` is the same as `pact`."""

from pipeline.cli import main

main()
