"""The serving stack's access control: where the shared secret comes from, how it is
checked, the UI's users file, and its refusals naming the file and line."""

from __future__ import annotations

import asyncio

import pytest

from feallm_llava.integration import access

SECRET = "k" * 24


def test_the_secret_comes_from_the_environment_or_a_file_never_elsewhere(tmp_path):
    assert access.read_secret({}) is None  # none set: no access control
    assert access.read_secret({access.SECRET_ENV: f" {SECRET}\n"}) == SECRET
    path = tmp_path / "secret"
    path.write_text(SECRET + "\nignored second line\n")
    assert access.read_secret({access.SECRET_FILE_ENV: str(path)}) == SECRET
    assert access.read_secret({access.SECRET_ENV: "x" * 30}, secret_file=path) == SECRET  # an explicit file wins


@pytest.mark.parametrize("text, why", [("short", "the secret has 5 characters"), ("", "the secret has 0 characters"),
                                       ("two words here, long enough", "white space")])
def test_a_weak_or_malformed_secret_is_refused_naming_its_file(tmp_path, text, why):
    path = tmp_path / "secret"
    path.write_text(text)
    with pytest.raises(access.AccessError, match=why) as err:
        access.read_secret({access.SECRET_FILE_ENV: str(path)})
    assert f"secret file {path} (line 1)" in str(err.value)
    with pytest.raises(access.AccessError, match="cannot read it"):
        access.read_secret({access.SECRET_FILE_ENV: str(tmp_path / "nowhere")})


def test_only_the_exact_bearer_secret_is_authorized():
    assert access.authorized(f"Bearer {SECRET}", SECRET) and access.authorized(f"bearer {SECRET}", SECRET)
    for header in (None, "", SECRET, f"Basic {SECRET}", f"Bearer {SECRET}x", f"Bearer {SECRET[:-1]}"):
        assert not access.authorized(header, SECRET), header


def _call(app, headers, kind="http"):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app({"type": kind, "headers": headers}, receive, send))
    return sent


def test_the_middleware_answers_401_without_the_secret_and_passes_it_through():
    reached = []

    async def inner(scope, receive, send):
        reached.append(scope["type"])

    app = access.RequireSecret(inner, SECRET)
    refused = _call(app, [(b"authorization", b"Bearer wrong")])
    assert refused[0]["status"] == 401 and not reached
    assert (b"www-authenticate", b'Bearer realm="feallm"') in refused[0]["headers"]
    assert _call(app, [], "websocket") == [{"type": "websocket.close", "code": 1008}] and not reached
    assert _call(app, [(b"Authorization", f"Bearer {SECRET}".encode())]) == [] and reached == ["http"]
    _call(app, [], "lifespan")
    assert reached == ["http", "lifespan"]


def test_users_file_holds_scrypt_hashes_and_checks_passwords(tmp_path):
    users = tmp_path / "users"
    access.add_user(users, "ana", "a long password")
    access.add_user(users, "bo", "another password")
    access.add_user(users, "ana", "a new password")  # replaced, not added
    text = users.read_text()
    assert "password" not in text and text.count("ana:scrypt$") == 1 and oct(users.stat().st_mode)[-3:] == "600"
    check = access.UserCheck(users)
    assert check("ana", "a new password") and check("bo", "another password")
    assert not check("ana", "a long password") and not check("nobody", "a new password") and not check("bo", "")


def test_a_malformed_users_file_is_refused_naming_its_line(tmp_path):
    users = tmp_path / "users"
    access.add_user(users, "ana", "a long password")
    users.write_text(users.read_text() + "# a comment\nbo:plain-text-password\n")
    with pytest.raises(access.AccessError, match=rf"users file {users}, line 3: expected NAME:scrypt"):
        access.read_users(users)
    (tmp_path / "empty").write_text("# nobody\n")
    with pytest.raises(access.AccessError, match="no users"):
        access.read_users(tmp_path / "empty")
    with pytest.raises(access.AccessError, match="at least 8 characters"):
        access.add_user(users, "cy", "short")
