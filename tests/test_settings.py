"""The KLV_* switches: one reader, one spelling of 'on', every switch documented in the README."""
import pathlib
import re

import pytest

from kontext_lowvram.optimizations import settings

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(settings.SWITCHES))
def test_each_switch_reads_the_same_way(monkeypatch, name):
    monkeypatch.delenv(name, raising=False)
    assert settings.switch(name) is False
    for value in ("1", "true", "YES", " on "):
        monkeypatch.setenv(name, value)
        assert settings.switch(name) is True, value
    for value in ("", "0", "false", "no", "off", "2"):
        monkeypatch.setenv(name, value)
        assert settings.switch(name) is False, value


def test_unknown_switch_is_a_typo():
    with pytest.raises(KeyError, match="KLV_NO_TRITONN"):
        settings.switch("KLV_NO_TRITONN")


def test_switches_are_read_only_through_settings_and_documented():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in settings.SWITCHES:
        assert f"`{name}" in readme, f"{name} is not in README.md"
    for path in ROOT.glob("optimizations/**/*.py"):
        if path.name == "settings.py":
            continue
        src = path.read_text(encoding="utf-8")
        assert not re.search(r"os\.environ|os\.getenv", src), f"{path} reads the environment itself"
