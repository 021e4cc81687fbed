"""Settings come from RALPH_* variables and fail with a line that names the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ralph.config import SettingsError, check_serve_settings, load_settings

pytestmark = pytest.mark.usefixtures("clean_env")


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8200
    assert settings.api_token is None
    assert settings.effective_database_url == (
        f"sqlite+aiosqlite:///{(tmp_path / 'data' / 'ralph.db').resolve()}"
    )


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RALPH_PORT", "9001")
    monkeypatch.setenv("RALPH_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("RALPH_API_TOKEN", "s3cret")
    settings = load_settings()
    assert settings.port == 9001
    assert settings.data_dir == tmp_path
    assert settings.api_token is not None
    assert settings.api_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


def test_dotenv_file_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("RALPH_PORT=8555\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings().port == 8555


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RALPH_PORT", "not-a-port"),
        ("RALPH_PORT", "70000"),
        ("RALPH_DATABASE_URL", "postgres://x/y"),
        ("RALPH_MODEL_PROVIDER", "skynet"),
        ("RALPH_MAX_REQUEST_BYTES", "5"),
        ("RALPH_WEBHOOK_URL", "ftp://hooks.example"),
        ("RALPH_MEMORY_VERSIONING", "git"),
    ],
)
def test_invalid_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value).startswith(f"{variable}:")
    assert "\n" not in str(caught.value)


def test_cli_reports_invalid_settings_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ralph.cli", "migrate"],
        env={"RALPH_PORT": "eighty", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "RALPH_PORT" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("token", [None, "", "   ", "short-token-15c"])
def test_serve_refuses_public_host_without_a_strong_token(
    tmp_path: Path, token: str | None
) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "RALPH_DATA_DIR": str(tmp_path)}
    if token is not None:
        env["RALPH_API_TOKEN"] = token
    result = subprocess.run(
        [sys.executable, "-m", "ralph.cli", "serve", "--host", "0.0.0.0"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: invalid settings: RALPH_API_TOKEN:")


@pytest.mark.parametrize("blank", ["", "  ", "\t"])
def test_blank_token_counts_as_none(monkeypatch: pytest.MonkeyPatch, blank: str) -> None:
    monkeypatch.setenv("RALPH_API_TOKEN", blank)
    assert load_settings().api_token is None


def test_short_token_is_fine_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RALPH_API_TOKEN", "short")
    check_serve_settings(load_settings(host="127.0.0.1"))
    check_serve_settings(load_settings(host="::1"))
    check_serve_settings(load_settings(host="0.0.0.0", api_token="x" * 16))
    with pytest.raises(SettingsError, match="at least 16"):
        check_serve_settings(load_settings(host="0.0.0.0"))


def test_named_reviewers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RALPH_API_TOKEN", "the-operators-token")
    monkeypatch.setenv("RALPH_REVIEWERS", " alice:alices-token-123456 , bob_2:bobs-token-1234567,")
    reviewers = load_settings().reviewers
    assert {n: t.get_secret_value() for n, t in reviewers.items()} == {
        "alice": "alices-token-123456",
        "bob_2": "bobs-token-1234567",
    }
    assert "alices-token" not in repr(load_settings())
    with pytest.raises(SettingsError, match="bob's token must be at least 16"):
        check_serve_settings(load_settings(host="0.0.0.0", reviewers="bob:short"))
    refused = [
        ("alice", "RALPH_REVIEWERS: .*entry 1: expected name:token"),
        ("alice:tok-a,b@d:tok-b", "entry 2: expected name:token"),
        ("alice:tok-a,alice:tok-b", "reviewer 'alice' is named twice"),
        ("alice:the-operators-token", "need tokens of their own"),
        ("alice:same-token,bob:same-token", "need tokens of their own"),
    ]
    for value, words in refused:
        monkeypatch.setenv("RALPH_REVIEWERS", value)
        with pytest.raises(SettingsError, match=words) as caught:
            load_settings()
        for secret in ("tok-", "same-token", "operators-token"):
            assert secret not in str(caught.value)  # a token is never repeated
    monkeypatch.delenv("RALPH_API_TOKEN")
    monkeypatch.setenv("RALPH_REVIEWERS", "alice:alices-token-123456")
    with pytest.raises(SettingsError, match="RALPH_REVIEWERS needs RALPH_API_TOKEN"):
        load_settings()
