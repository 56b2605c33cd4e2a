"""Developer tooling beside the operator: the local control plane and `make demo`.

Not part of the `kiln` package (nor its image): the Makefile, the tests and bench/ run it
from the source tree (`python -m kiln_devtools`, with devtools/ on PYTHONPATH).
"""
