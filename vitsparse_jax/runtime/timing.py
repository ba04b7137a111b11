"""Where a run's wall time goes: start-up, its phases, XLA compilation, the pass (results.json's `timing`).

The driver marks its phases (`phase('loading')`, `phase('pass')`, ...); JAX reports every tracing, lowering and
XLA compilation through its public monitoring API (`jax.monitoring`: the `/jax/core/compile/*` events, with
their time spans), and every persistent-cache hit. Compilation is counted apart: a phase's seconds exclude the
compilations inside it, and `compilation` is the union of their spans (nested traces counted once). The fixed
cost of a run is its wall time (from the process's start) less the pass.

    timing.start_run()                  # the driver, as a run starts
    with timing.phase("loading"): ...   # phases may nest: the inner one's time is not the outer's
    timing.summary()                    # {'wall_s', 'startup_s', 'phases_s', 'compilation', 'pass', 'fixed_s', ...}
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from typing import Any, Iterator

log = logging.getLogger(__name__)

# jax's monitoring events of one jit compilation (jax._src.dispatch names them; stable since jax 0.4.x)
COMPILE_PREFIX = "/jax/core/compile/"
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"   # one per program (XLA, or the cache's copy)
CACHE_HIT = "/jax/compilation_cache/cache_hits"
PHASES = ("checks", "loading", "pass", "extras", "results", "figures", "report_html")   # in the log's order

_lock = threading.Lock()
_run: dict[str, Any] | None = None
_first_run = True


def process_start() -> float | None:
    """The wall-clock time this process started (Linux: /proc), or None where it cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])   # field 22: start time, clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def start_run() -> None:
    """Starts recording a run (its phases and compilations); the process's first run also counts its start-up
    (interpreter, imports, flags) from the process's start."""
    global _run, _first_run
    now = time.time()
    started = process_start() if _first_run else None
    _first_run = False
    with _lock:
        _run = {"start": now, "process_start": started, "intervals": [], "stack": [], "spans": [],
                "programs": collections.Counter(), "phases": collections.Counter(), "backend_s": 0.0,
                "cache_hits": 0, "pass": None}


def end_run() -> None:
    """Stops recording (phases and compilations after it are not counted anywhere)."""
    global _run
    _run = None


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Counts the block's wall time (less the compilations in it) as phase `name`; an enclosing phase pauses."""
    run = _run
    if run is None:
        yield
        return
    stack = run["stack"]
    now = time.time()
    if stack:   # the enclosing phase's interval ends here
        outer, since = stack[-1]
        run["intervals"].append((outer, since, now))
    stack.append((name, now))
    try:
        yield
    finally:
        end = time.time()
        _, since = stack.pop()
        run["intervals"].append((name, since, end))
        if stack:
            stack[-1] = (stack[-1][0], end)


def note_pass(**figures: float) -> None:
    """Adds to the passes' own figures: `images`, `seconds` (wall, its compilation included), `data_s` (waiting
    for the next batch from the data pipeline: decoding did not keep ahead), `wait_s` (the host waiting for the
    device's results and copying this process's rows), `host_s` (this process's host step)."""
    run = _run
    if run is None:
        return
    p = run["pass"] or {"images": 0, "seconds": 0.0, "data_s": 0.0, "wait_s": 0.0, "host_s": 0.0}
    run["pass"] = {k: p.get(k, 0) + figures.get(k, 0) for k in {**p, **figures}}


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def _overlap(lo: float, hi: float, spans: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(hi, b) - max(lo, a)) for a, b in spans)


def summary() -> dict[str, Any]:
    """The run so far: wall time (from the process's start on its first run), start-up, each phase's seconds
    less its compilations, the compilations (programs, from the persistent cache, seconds), the pass, the fixed
    cost (wall less the pass) and what no phase covers (`other_s`)."""
    run = _run
    if run is None:
        return {}
    now = time.time()
    with _lock:
        spans = _union([(a, b) for a, b in run["spans"] if b > run["start"]])
        programs = dict(run["programs"].most_common())
        by_phase = dict(run["phases"])
        backend_s, hits = run["backend_s"], run["cache_hits"]
    intervals = list(run["intervals"]) + [(name, since, now) for name, since in run["stack"][-1:]]
    phases: dict[str, float] = {}
    for name, lo, hi in intervals:
        phases[name] = phases.get(name, 0.0) + (hi - lo) - _overlap(lo, hi, spans)
    compile_s = _overlap(run["start"], now, spans)
    startup = run["start"] - run["process_start"] if run["process_start"] else 0.0
    wall = now - run["start"] + startup
    passed = phases.get("pass", 0.0)
    return {"wall_s": round(wall, 3), "startup_s": round(startup, 3),
            "phases_s": {k: round(phases[k], 3) for k in sorted(phases, key=_order)},
            "compilation": {"programs": sum(programs.values()), "from_cache": hits, "seconds": round(compile_s, 3),
                            "xla_s": round(backend_s, 3), "by_program": programs,
                            "by_phase": {k: by_phase[k] for k in sorted(by_phase, key=_order)}},
            "other_s": round(wall - startup - sum(phases.values()) - compile_s, 3),
            "pass": run["pass"], "fixed_s": round(wall - passed, 3)}


def _order(name: str) -> tuple[int, str]:
    return (PHASES.index(name) if name in PHASES else len(PHASES), name)


def describe(t: dict[str, Any]) -> str:
    """One log line: where the run's time went."""
    if not t:
        return ""
    c = t["compilation"]
    parts = [f"start-up {t['startup_s']:.1f}"] + [f"{k.replace('_', '.')} {v:.1f}" for k, v in t["phases_s"].items()]
    parts.insert(min(len(parts), 3),
                 f"compilation {c['seconds']:.1f} ({c['programs']} programs, {c['from_cache']} from the cache)")
    return (f"time: {t['wall_s']:.1f} s = {' + '.join(parts)} + other {t['other_s']:.1f}; fixed cost (all but the "
            f"pass) {t['fixed_s']:.1f} s")


def _on_duration(event: str, duration: float, **kw: Any) -> None:
    run = _run
    if run is not None and event == BACKEND_COMPILE:
        with _lock:
            run["programs"][str(kw.get("fun_name", "?"))] += 1
            run["phases"][run["stack"][-1][0] if run["stack"] else "other"] += 1
            run["backend_s"] += duration


def _on_span(event: str, start: float, end: float, **kw: Any) -> None:
    run = _run
    if run is not None and event.startswith(COMPILE_PREFIX):
        with _lock:
            run["spans"].append((start, end))


def _on_event(event: str, **kw: Any) -> None:
    run = _run
    if run is not None and event == CACHE_HIT:
        with _lock:
            run["cache_hits"] += 1


def _register() -> None:
    from jax import monitoring

    monitoring.register_event_duration_secs_listener(_on_duration)
    monitoring.register_event_time_span_listener(_on_span)
    monitoring.register_event_listener(_on_event)


_register()
