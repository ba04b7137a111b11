"""The persistent XLA compilation cache a run turns on (runtime/xla_cache.py)."""
import logging
import os

import jax
import pytest

from vitsparse_jax.runtime import xla_cache


@pytest.fixture
def restore_jax_cache_config():
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    yield
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


def test_auto_keeps_jax_own_setting(restore_jax_cache_config):
    assert jax.config.jax_compilation_cache_dir            # the tests' cache (conftest)
    assert xla_cache.enable("auto") == jax.config.jax_compilation_cache_dir


def test_a_folder_of_the_config_is_used(tmp_path, monkeypatch, restore_jax_cache_config):
    monkeypatch.delenv(xla_cache.MIN_COMPILE_TIME_ENV, raising=False)
    assert xla_cache.enable(str(tmp_path / "xla")) == str(tmp_path / "xla") == jax.config.jax_compilation_cache_dir
    assert (tmp_path / "xla").is_dir() and jax.config.jax_persistent_cache_min_compile_time_secs == 0


def test_off_and_unwritable(tmp_path, caplog, restore_jax_cache_config):
    before = jax.config.jax_compilation_cache_dir
    assert xla_cache.enable("") is None
    blocked = tmp_path / "file"
    blocked.write_text("")
    with caplog.at_level(logging.WARNING):
        assert xla_cache.enable(str(blocked / "xla")) is None
    assert "cannot be used" in caplog.text and "--config.xla_cache" in caplog.text
    assert jax.config.jax_compilation_cache_dir == before


def test_the_default_folder_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert xla_cache.default_folder() == tmp_path / "vitsparse_jax" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert str(xla_cache.default_folder()) == os.path.join(os.path.expanduser("~"), ".cache", "vitsparse_jax", "xla")
