"""Settings: environment over .env file, unknown keys and bad values named, secrets hidden."""

from __future__ import annotations

from pathlib import Path

import pytest

from companion.settings import Settings, SettingsError, env_example


def test_env_file_then_environment(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text(
        "# comment\nCTRLABLE_API_TOKEN='from-file'\nCTRLABLE_LISTEN_PORT=9000\n"
        'export CTRLABLE_SITE_ID="site-x"\n'
    )
    settings = Settings.load({"CTRLABLE_LISTEN_PORT": "9100", "HOME": "/root"}, env)
    assert settings.api_token.get_secret_value() == "from-file"
    assert settings.listen_port == 9100
    assert settings.site_id == "site-x"
    assert "from-file" not in repr(settings)


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"CTRLABLE_API_TOKEN": "t", "CTRLABLE_LISTEN_PORT": "http"}, "CTRLABLE_LISTEN_PORT"),
        ({"CTRLABLE_API_TOKEN": "t", "CTRLABLE_NOPE": "1"}, "CTRLABLE_NOPE: unknown setting"),
        ({}, "CTRLABLE_API_TOKEN"),
        ({"CTRLABLE_API_TOKEN": "t", "CTRLABLE_PVE_TOKEN_ID": "root"}, "CTRLABLE_PVE_TOKEN_ID"),
    ],
)
def test_bad_settings_name_the_variable(environ: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.load(environ)


def test_env_example_documents_every_setting() -> None:
    example = Path(__file__).resolve().parents[2] / ".env.example"
    text = example.read_text()
    assert text == env_example(), "regenerate: python -m companion.settings > .env.example"
    keys = {line.split("=", 1)[0].lstrip("# ").strip() for line in text.splitlines() if "=" in line}
    missing = set(Settings.field_env_names().values()) - keys
    assert not missing, f".env.example lacks {sorted(missing)}"
    unknown = {k for k in keys if k.startswith("CTRLABLE_")} - set(
        Settings.field_env_names().values()
    )
    assert not unknown, f".env.example documents unknown keys {sorted(unknown)}"
