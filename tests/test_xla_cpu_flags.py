"""The XLA:CPU defaults set on import: added once, never over a user's choice, never an unknown flag."""
import os

import pytest

from vitsparse_jax.runtime import xla_cpu_flags


def test_adds_the_flag_after_existing_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xla_cpu_flags, "jaxlib_knows", lambda name: True)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    assert xla_cpu_flags.set_cpu_defaults(env)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4 " + xla_cpu_flags.YNN_OFF
    assert not xla_cpu_flags.set_cpu_defaults(env)   # idempotent
    assert env["XLA_FLAGS"].count(xla_cpu_flags.YNN_FLAG_NAME) == 1


@pytest.mark.parametrize("env", [
    {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"},   # the user's own setting wins
    {xla_cpu_flags.OPT_OUT_ENV: "1"},
])
def test_leaves_user_choices_alone(env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xla_cpu_flags, "jaxlib_knows", lambda name: True)
    before = dict(env)
    assert not xla_cpu_flags.set_cpu_defaults(env)
    assert env == before


def test_never_sets_a_flag_jaxlib_does_not_know(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not xla_cpu_flags.jaxlib_knows("xla_no_such_flag_in_any_jaxlib_0123456789")
    monkeypatch.setattr(xla_cpu_flags, "jaxlib_knows", lambda name: False)
    env: dict = {}
    assert not xla_cpu_flags.set_cpu_defaults(env)
    assert env == {}


def test_importing_the_package_set_it_for_this_process() -> None:
    if os.environ.get(xla_cpu_flags.OPT_OUT_ENV, "") not in ("", "0") or not xla_cpu_flags.jaxlib_knows(
            xla_cpu_flags.YNN_FLAG_NAME):
        pytest.skip("opted out, or this jaxlib has no such flag")
    assert xla_cpu_flags.YNN_FLAG_NAME in os.environ["XLA_FLAGS"]
