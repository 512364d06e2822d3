"""Signed tokens: unsubscribe links and reply addresses."""

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
