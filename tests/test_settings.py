import dataclasses
from pathlib import Path

import pytest

from tenancy.settings import Settings, load_settings

DOC = Path(__file__).parents[1] / "docs" / "configuration.md"


def test_environment_overrides_file(tmp_path: Path) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text('[tollway]\nport = 9001\nregions = ["a", "b"]\nhost = "0.0.0.0"\n')
    s = load_settings(env={"TOLLWAY_PORT": "9002"}, config_file=cfg)
    assert s.port == 9002
    assert s.regions == ("a", "b")
    assert s.host == "0.0.0.0"


def test_unknown_file_key_is_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text("prot = 1\n")
    with pytest.raises(ValueError, match="unknown setting 'prot'"):
        load_settings(env={}, config_file=cfg)


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ValueError, match="TOLLWAY_PORT"):
        load_settings(env={"TOLLWAY_PORT": "eighty"})


def test_defaults_need_no_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings(env={})
    assert s.effective_database_url.startswith("sqlite:///")
    assert s.redis_url is None and s.clickhouse_url is None


def test_every_setting_is_documented() -> None:
    text = DOC.read_text()
    missing = [f.name for f in dataclasses.fields(Settings) if f"`{f.name}`" not in text]
    assert missing == []
