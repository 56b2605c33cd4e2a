"""Commands of the `kiln` CLI beyond the operator itself."""
