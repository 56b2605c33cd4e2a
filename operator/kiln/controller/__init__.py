"""kopf handlers. Importing this package registers them all."""

from kiln.controller import runs, setup, templates

__all__ = ["runs", "setup", "templates"]
