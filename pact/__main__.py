"""`python -m pact` is the same as `pact`."""

from pact.pipeline.cli import main

main()
