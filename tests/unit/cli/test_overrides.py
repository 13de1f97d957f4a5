"""Command-line overrides (``serve --port`` ...) keep every secret of the file as it was.

``_load`` re-validates the dumped settings with the overrides applied; the secrets
pass through that round trip as ``SecretStr``, with nothing to unwrap.
"""

from __future__ import annotations

from pathlib import Path

from proxy.cli.main import _load

SECRETS = """
[store]
kind = "redis"
url = "redis://127.0.0.1:1/0"
password = "store-pass"
sentinel_password = "sentinel-pass"

[log]
session_hash_key = "hash-key"

[admin]
token = "0123456789abcdef0123456789abcdef"

[sessions.pin_token]
keys = { k1 = "pin-token-key-0123456789abcdef0123" }
sign_with = "k1"
"""


def test_overrides_keep_every_secret_and_apply_their_fields(tmp_path: Path) -> None:
    path = tmp_path / "pinproxy.toml"
    path.write_text(SECRETS)
    plain = _load(path, {})
    overridden = _load(path, {"listen": {"port": 9999, "workers": 2}})
    assert (overridden.listen.port, overridden.listen.workers) == (9999, 2)
    assert plain.listen.port != 9999
    for settings in (plain, overridden):
        store, token = settings.store, settings.sessions.pin_token
        assert store.password is not None
        assert store.sentinel_password is not None
        assert settings.admin.token is not None
        assert settings.log.session_hash_key is not None
        assert token is not None
        assert (store.password.get_secret_value(), store.sentinel_password.get_secret_value(),
                settings.admin.token.get_secret_value(),
                settings.log.session_hash_key.get_secret_value(),
                token.keys["k1"].get_secret_value()) == (
            "store-pass", "sentinel-pass", "0123456789abcdef0123456789abcdef", "hash-key",
            "pin-token-key-0123456789abcdef0123")
    assert overridden.masked() == {**plain.masked(), "listen": overridden.masked()["listen"]}
