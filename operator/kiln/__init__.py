"""Kiln: a Kubernetes operator that builds VM images the way Azure VM Image Builder does."""

GROUP = "kiln.dev"
VERSION = "v1alpha1"
