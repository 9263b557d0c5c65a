"""API key text: ids are prefixes, only digests are stored, comparison is exact."""

from __future__ import annotations

import pytest

from modelyard.platform import keys


def test_a_new_key_carries_its_id_and_only_its_digest_is_kept() -> None:
    created = keys.new_key()
    assert created.text.startswith(f"sk-my-{created.id}-")
    assert len(created.id) == keys.ID_LENGTH
    assert keys.key_id_of(created.text) == created.id
    assert created.text not in created.digest
    assert len(created.digest) == 64
    assert keys.matches(created.text, created.digest)
    assert len(created.text) > 50


def test_keys_are_unique() -> None:
    made = {keys.new_key().text for _ in range(200)}
    assert len(made) == 200


def test_a_key_differing_anywhere_does_not_match() -> None:
    created = keys.new_key()
    for position in (0, 10, len(created.text) - 1):
        changed = created.text[:position] + ("x" if created.text[position] != "x" else "y") \
            + created.text[position + 1:]
        assert not keys.matches(changed, created.digest)
    assert not keys.matches(created.text + "x", created.digest)


@pytest.mark.parametrize("text", [
    "", "sk-my-", "sk-my-abc", "sk-my-0123456789ab", "sk-my-0123456789abX",
    "sk-my-0123456789AB-secret", "sk-my-zzzzzzzzzzzz-secret", "test-key", "sk-0123456789ab-x",
])
def test_text_that_cannot_be_a_key_has_no_id(text: str) -> None:
    assert keys.key_id_of(text) is None


@pytest.mark.parametrize(("header", "token"), [
    (None, None), ("", None), ("Bearer", None), ("Bearer ", None), ("Basic abc", None),
    ("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("BEARER sk-my-x", "sk-my-x"),
])
def test_bearer_tokens(header: str | None, token: str | None) -> None:
    assert keys.bearer_token(header) == token
