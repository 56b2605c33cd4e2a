"""Fakes of external services (ARM, Entra ID) that the real client libraries talk to in tests."""
