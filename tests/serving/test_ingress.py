"""The Ingress's request checks on real Starlette requests: the bearer token, as plain text or as its digest."""

import pytest
from starlette.requests import Request

from livetalk_ray.serving.ingress import token_digest, token_ok


def _request(headers: list[tuple[bytes, bytes]] = (), query: bytes = b"") -> Request:
    scope = {"type": "http", "method": "GET", "path": "/v1/portraits", "headers": list(headers), "query_string": query}
    return Request(scope)


@pytest.mark.parametrize("expected", ["s3cret-token", token_digest("s3cret-token")])
def test_token_in_header_or_query_against_the_token_or_its_digest(expected):
    assert token_ok(_request([(b"authorization", b"Bearer s3cret-token")]), expected)
    assert token_ok(_request(query=b"token=s3cret-token"), expected)
    assert not token_ok(_request([(b"authorization", b"Bearer s3cret-tokem")]), expected)
    assert not token_ok(_request(), expected)
    assert not token_ok(_request([(b"authorization", b"Basic s3cret-token")]), expected)
    for raw in (b"Bearer caf\xe9", b"Bearer \xff\xfe\x00", "Bearer ünï".encode()):  # any bytes: a mismatch
        assert not token_ok(_request([(b"authorization", raw)]), expected)
    assert not token_ok(_request(query=b"token=%C3%BC%FF"), expected)


def test_no_token_configured_lets_everyone_in_and_the_digest_hides_the_token():
    assert token_ok(_request(), None)
    digest = token_digest("s3cret-token")
    assert digest.startswith("sha256:") and "s3cret" not in digest and len(digest) == 7 + 64
