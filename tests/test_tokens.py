"""Signed tokens: unsubscribe links and reply addresses."""

from itsdangerous import URLSafeSerializer

from campaigns.config import get_settings
from campaigns.tokens import read_reply_token, read_unsubscribe_token, reply_address, unsubscribe_token


def test_reply_address_round_trip_survives_case_folding_and_refuses_tampering():
    key = "0123456789abcdef0123456789abcdef"
    addr = reply_address(key, "in.example.com")
    local = addr.split("@")[0]
    assert local.startswith("reply+") and addr.endswith("@in.example.com")
    token = local[len("reply+"):]
    assert read_reply_token(token) == key
    assert read_reply_token(token.upper()) == key  # some servers fold local parts
    assert read_reply_token(token[:-1] + ("0" if token[-1] != "0" else "1")) is None
    assert read_reply_token("ffff" + token[4:]) is None
    assert read_reply_token("") is None and read_reply_token("nodot") is None


def test_unsubscribe_token_round_trip():
    token = unsubscribe_token(7, "a@example.com", "k1")
    assert read_unsubscribe_token(token) == (7, "a@example.com", "k1")
    assert read_unsubscribe_token(token + "x") is None
    assert read_unsubscribe_token("garbage") is None


def test_unsubscribe_tokens_are_itsdangerous_tokens_and_links_made_before_still_work():
    """The fast signer writes the same format as ``URLSafeSerializer.dumps`` (what earlier links
    were made with): byte for byte when that would not compress the payload; a compressed (older)
    token still reads; a token signed with another secret or salt does not."""

    serializer = URLSafeSerializer(get_settings().secret_key, salt="herald.unsubscribe")
    cases = [(7, "a@example.com", "k1"), (1, "ünï@exämple.com", None), (99, "x@y.z", "k7Hd9sQ2xLmP0aZ3vB8nR1tY")]
    for ws, email, key in cases:
        assert unsubscribe_token(ws, email, key) == serializer.dumps([ws, email, key or ""])
        assert read_unsubscribe_token(unsubscribe_token(ws, email, key)) == (ws, email, key)
    long_email = "a" * 200 + "@example.com"
    older = serializer.dumps([3, long_email, "k"])  # zlib made it shorter: a leading "."
    assert older.startswith(".") and read_unsubscribe_token(older) == (3, long_email, "k")
    assert read_unsubscribe_token(unsubscribe_token(3, long_email, "k")) == (3, long_email, "k")
    assert read_unsubscribe_token(URLSafeSerializer("another-secret-0123456789", salt="herald.unsubscribe")
                                  .dumps([7, "a@example.com", "k1"])) is None
    assert read_unsubscribe_token(URLSafeSerializer(get_settings().secret_key, salt="other")
                                  .dumps([7, "a@example.com", "k1"])) is None
