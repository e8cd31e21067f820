"""SCRAM-SHA-256 exchange as the pooling proxy uses it: client side, server side, ClientKey recovery."""

import base64

import pytest

from dbplane.security.scram import (
    ClientExchange,
    ScramAuthFailed,
    ScramError,
    ServerExchange,
    Verifier,
    parse_verifier,
    verifier,
)

pytestmark = pytest.mark.unit

SALT = b"0123456789abcdef"
VERIFIER = parse_verifier(verifier("secret", salt=SALT, iterations=4096))


def _run(server: ServerExchange, client: ClientExchange) -> bytes:
    server_final = server.final(client.final(server.first(client.first())))
    client.verify(server_final)
    return server_final


def test_parse_verifier():
    assert VERIFIER == Verifier(4096, SALT, VERIFIER.stored_key, VERIFIER.server_key)
    assert len(VERIFIER.stored_key) == len(VERIFIER.server_key) == 32
    for bad in (None, "", "md5" + "0" * 32, "plain", "SCRAM-SHA-256$4096:c2FsdA==$abc:def",
                "SCRAM-SHA-256$x:c2FsdA==$" + "A" * 44 + ":" + "A" * 44):
        assert parse_verifier(bad) is None


def test_round_trip_with_password():
    server, client = ServerExchange(VERIFIER, "alice"), ClientExchange(password="secret")
    first = client.first()
    assert first.startswith(b"n,,n=,r=")  # empty user name, as libpq sends
    _run(server, client)
    assert server.client_key is not None


def test_recovered_client_key_authenticates_to_the_real_server():
    front = ServerExchange(VERIFIER, "alice")
    _run(front, ClientExchange(password="secret"))
    # the proxy logs in upstream as the same user without knowing the password
    upstream = ServerExchange(VERIFIER, "alice")
    _run(upstream, ClientExchange(client_key=front.client_key, server_key=VERIFIER.server_key))
    assert upstream.client_key == front.client_key


def test_wrong_password_fails():
    server, client = ServerExchange(VERIFIER, "alice"), ClientExchange(password="wrong")
    with pytest.raises(ScramAuthFailed):
        server.final(client.final(server.first(client.first())))
    assert server.client_key is None


def test_unknown_user_fake_exchange_is_stable_and_fails():
    def salt_of(user: str) -> bytes:
        server_first = ServerExchange(None, user).first(b"n,,n=,r=abc").decode()
        fields = dict(a.split("=", 1) for a in server_first.split(","))
        assert fields["i"] == "4096"
        return base64.b64decode(fields["s"])

    assert salt_of("ghost") == salt_of("ghost") != salt_of("phantom")
    assert len(salt_of("ghost")) == 16
    server, client = ServerExchange(None, "ghost"), ClientExchange(password="secret")
    with pytest.raises(ScramAuthFailed):
        server.final(client.final(server.first(client.first())))


@pytest.mark.parametrize("msg", [
    b"", b"n,,", b"x,,n=,r=abc", b"n,a=bob,n=,r=abc", b"n,,m=ext,n=,r=abc", b"n,,r=abc", b"n,,n=",
    b"n,,n=,r=", b"n,,n=,r=a,b", b"n,,n=,r=\xff", b"n,,n=,r=ab c",
])
def test_malformed_client_first(msg):
    with pytest.raises(ScramError):
        ServerExchange(VERIFIER).first(msg)


def test_channel_binding_p_refused():
    with pytest.raises(ScramError, match="channel binding"):
        ServerExchange(VERIFIER).first(b"p=tls-server-end-point,,n=,r=abc")


def test_well_formed_extensions_are_accepted():
    server = ServerExchange(VERIFIER)
    server_first = server.first(b"n,,n=,r=abc,x=ext")
    client = ClientExchange(password="secret", _nonce="abc")
    client_final = client.final(server_first + b",y=ext")
    without_proof, proof = client_final.rsplit(b",", 1)
    with pytest.raises(ScramAuthFailed):  # parsed fine; the proof was computed for another AuthMessage
        server.final(without_proof + b",z=ext," + proof)


def test_y_flag_accepted_and_must_be_echoed():
    server = ServerExchange(VERIFIER)
    nonce = server.first(b"y,,n=,r=abc").decode().split(",")[0][2:]
    with pytest.raises(ScramError, match="channel binding"):  # 'biws' is 'n,,', but we got 'y,,'
        server.final(f"c=biws,r={nonce},p={base64.b64encode(bytes(32)).decode()}".encode())
    server = ServerExchange(VERIFIER)
    nonce = server.first(b"y,,n=,r=abc").decode().split(",")[0][2:]
    with pytest.raises(ScramAuthFailed):  # well formed, wrong proof
        server.final(f"c=eSws,r={nonce},p={base64.b64encode(bytes(32)).decode()}".encode())


@pytest.mark.parametrize("final", [
    "", "c=biws", "c=biws,r={n}", "r={n},c=biws,p={p}", "c=biws,r={n},p=!!!", "c=biws,r={n},p=AAAA",
    "c=bad!,r={n},p={p}", "c=biws,r={n}x,p={p}", "c=biws,r=other,p={p}", "c=biws,r={n},junk,p={p}",
])
def test_malformed_client_final_and_nonce_mismatch(final):
    server = ServerExchange(VERIFIER)
    nonce = server.first(b"n,,n=,r=abc").decode().split(",")[0][2:]
    with pytest.raises(ScramError):
        server.final(final.format(n=nonce, p=base64.b64encode(bytes(32)).decode()).encode())


def test_messages_out_of_order():
    server = ServerExchange(VERIFIER)
    with pytest.raises(ScramError):
        server.final(b"c=biws,r=abc,p=AAAA")
    server = ServerExchange(VERIFIER)
    with pytest.raises(ScramError):
        server.first(b"garbage")
    with pytest.raises(ScramError):  # a failed first message ends the exchange
        server.final(b"c=biws,r=abc,p=AAAA")
    with pytest.raises(ScramError):
        ClientExchange(password="x").verify(b"v=AAAA")


def test_client_rejects_server_nonce_that_does_not_extend_ours():
    client = ClientExchange(password="secret")
    ours = client.first().decode().split("r=")[1]
    for server_first in (f"r={ours},s=c2FsdA==,i=4096", f"r=X{ours}Y,s=c2FsdA==,i=4096",
                         f"r={ours}Y,s=c2FsdA==,i=x", f"r={ours}Y,s=!!,i=4096", f"r={ours}Y,s=c2FsdA==",
                         f"r={ours}Y,s=c2FsdA==,i=0", "garbage"):
        with pytest.raises(ScramError):
            ClientExchange(password="secret", _nonce=ours).final(server_first.encode())


def test_server_signature_tamper_detected():
    server, client = ServerExchange(VERIFIER), ClientExchange(password="secret")
    server_final = server.final(client.final(server.first(client.first())))
    sig = bytearray(base64.b64decode(server_final[2:]))
    sig[0] ^= 1
    with pytest.raises(ScramAuthFailed):
        client.verify(b"v=" + base64.b64encode(bytes(sig)))
    with pytest.raises(ScramAuthFailed):
        client.verify(b"e=invalid-proof")
    client.verify(server_final)


def test_client_with_wrong_server_key_rejects_server():
    # an impostor upstream that only has the StoredKey (or a different verifier) is detected
    other = parse_verifier(verifier("other", salt=SALT))
    front = ServerExchange(VERIFIER)
    _run(front, ClientExchange(password="secret"))
    server = ServerExchange(VERIFIER)
    client = ClientExchange(client_key=front.client_key, server_key=other.server_key)
    with pytest.raises(ScramAuthFailed):
        client.verify(server.final(client.final(server.first(client.first()))))


def test_client_requires_password_or_keys():
    for kwargs in ({}, {"client_key": b"k"}, {"password": "p", "client_key": b"k", "server_key": b"s"}):
        with pytest.raises(ValueError):
            ClientExchange(**kwargs)


def test_non_ascii_password_is_saslprepped_like_libpq():
    # U+00A0 NO-BREAK SPACE maps to ' ' and U+212B ANGSTROM SIGN normalises (NFKC) to U+00C5
    server = ServerExchange(parse_verifier(verifier("a b\u00c5", salt=SALT)))
    _run(server, ClientExchange(password="a\u00a0b\u212b"))


def test_rfc7677_test_vector():
    """RFC 7677 section 3, byte for byte (user name 'user' instead of libpq's empty one)."""
    v = parse_verifier(verifier("pencil", salt=base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="), iterations=4096))
    server = ServerExchange(v, "user", _nonce="%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
    client = ClientExchange(password="pencil", _nonce="rOprNGfwEbeRWgbNEkqO", _user="user")
    assert client.first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    server_first = server.first(client.first())
    assert server_first == (b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                            b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    client_final = client.final(server_first)
    assert client_final == (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                            b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    server_final = server.final(client_final)
    assert server_final == b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    client.verify(server_final)
