"""The leak hunt of the whole-run tests finds secrets however they are wrapped."""

from __future__ import annotations

import base64
import json

from secretscan import leaks

KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n-----END"
PASSWORD = "Kiln!Passw0rd-7f3a"


def token_around(secret: str) -> str:
    """Like an azure-core continuation token: base64 JSON holding a base64 body."""
    body = base64.b64encode(json.dumps({"adminPassword": secret}).encode()).decode()
    return base64.b64encode(json.dumps({"response": {"content": body}}).encode()).decode()


def test_plain_base64_and_nested_leaks_are_found() -> None:
    assert leaks({PASSWORD}, status=f"message: {PASSWORD}") == ["status holds Kiln!Passw0r..."]
    assert leaks({PASSWORD}, status=token_around(PASSWORD))
    assert leaks({KEY}, log="b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ")  # one line of it


def test_clean_texts_and_short_values_are_not_leaks() -> None:
    assert leaks({PASSWORD, KEY}, status=token_around("nothing"), log="ssh packer@host") == []
    assert leaks({"pfx"}, status="dataType pfx") == []
