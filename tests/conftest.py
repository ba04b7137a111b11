"""Test setup: 4 fake CPU devices (sharding tests), deterministic float32 numerics."""
import os
import tempfile

# Must happen before jax is imported anywhere: sharded code is tested on 4 fake CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")
# One persistent XLA compilation cache for the whole run: xdist workers and the CLI subprocesses the tests
# start compile the same small programs many times (about a third of a small run's CPU time is compiling).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "vitsparse_jax_tests_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Figures are drawn in full but their PNGs rendered at 60 dpi: 300 dpi PNGs are half of a small run's time.
os.environ.setdefault("VITSPARSE_JAX_FIGURE_DPI", "60")
# Figures drawn in the test's own process (test_figure_pool.py starts worker processes itself): a worker per run
# would add an interpreter's start-up to every end-to-end test.
os.environ.setdefault("VITSPARSE_JAX_FIGURE_WORKERS", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# Browser fixtures for report.html (headless system Chromium via playwright; see tests/browser.py).
from tests.browser import browser_context, open_report  # noqa: E402, F401
# Finished tiny runs (sparsity, ablation, receptive fields, locality) shared by the session; see tests/shared_runs.py.
from tests.shared_runs import finished_runs  # noqa: E402, F401


# The summed test time (setup + call + teardown of every test, over all xdist workers) under the summary, beside
# pytest's wall time: CI stays under 15 minutes of wall time on an idle 2-core machine (.ci/run).
_SUMMED = {"seconds": 0.0, "tests": 0}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _SUMMED["seconds"] += report.duration
    _SUMMED["tests"] += report.when == "call"


def pytest_terminal_summary(terminalreporter) -> None:
    if _SUMMED["tests"]:
        terminalreporter.write_line(f"summed test time: {_SUMMED['seconds']:.0f} s over {_SUMMED['tests']} tests "
                                    "(setup + call + teardown, all workers)")
