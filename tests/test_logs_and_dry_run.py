"""What a run says: log lines above the progress bar (not inside it) with a short prefix, under `python -m` and
in-process `main.cli` alike, seen on a terminal; the last line names report.html first; and a dry run on a
finished workdir says that nothing would run."""
from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import textwrap
from pathlib import Path

import pytest

from vitsparse_jax import main
from vitsparse_jax.runtime.workdir import Workdir

# A pass's progress bar with a log line and a warning in the middle, after logging is set up as `python -m`
# (app.run, then main's setup_logging) or main.cli (no logging set up by the caller) set it up.
BAR_SCRIPT = textwrap.dedent('''
    import logging, sys, time
    from tqdm import tqdm
    from vitsparse_jax import main

    def bar():
        log = logging.getLogger("vitsparse_jax.check")
        with tqdm(total=20, desc="pass", unit="img", dynamic_ncols=True, mininterval=0) as progress:
            for i in range(20):
                time.sleep(0.005)
                progress.update(1)
                if i == 9:
                    log.info("state saved at %d", i + 1)
                if i == 14:
                    log.warning("a warning at %d", i + 1)

    if sys.argv[1] == "cli":
        assert main.cli(["vitsparse_jax.main", "--config=ablate", "--show_config"]) == 0
        bar()
    else:
        from absl import app

        def run(argv):
            main.setup_logging()
            bar()

        app.run(run, argv=["check"])
''')


def _screen(raw: str) -> list[str]:
    """The lines a terminal shows for `raw` (carriage returns overwrite; other escapes are ignored)."""
    lines, row, col = [[]], 0, 0
    for ch in re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", raw):
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append([])
        else:
            line = lines[row]
            line.extend(" " * (col - len(line)))
            line[col:col + 1] = [ch]
            col += 1
    return [text for text in ("".join(line).rstrip() for line in lines) if text]


def _on_a_terminal(args: list[str], cwd: Path) -> str:
    """stderr of `args` run on a pseudo-terminal of 100 columns (stdout discarded)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            proc.kill()
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:   # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=60) == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("mode", ["python -m", "cli"])
def test_log_lines_sit_above_the_progress_bar_with_a_short_prefix(mode, tmp_path):
    script = tmp_path / "bar.py"
    script.write_text(BAR_SCRIPT)
    screen = _screen(_on_a_terminal([sys.executable, str(script), mode], tmp_path))
    text = "\n".join(screen)
    assert re.search(r"^I \d\d:\d\d:\d\d state saved at 10$", text, re.M), text   # seen, whole, short prefix
    assert re.search(r"^W \d\d:\d\d:\d\d a warning at 15$", text, re.M), text
    bars = [line for line in screen if line.startswith("pass:")]
    assert len(bars) == 1 and screen[-1] == bars[0] and re.search(r"100%\|.*\| 20/20 ", bars[0]), text


def test_the_last_line_names_report_html_first_with_full_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workdir = Workdir("runs/x")                       # relative: under the current folder
    (tmp_path / "runs" / "x").mkdir(parents=True)
    for name in ("report.md", "results.csv", "results.json"):
        (tmp_path / "runs" / "x" / name).write_text("")
    where = tmp_path / "runs" / "x"
    assert main.finished_line(workdir, ("results.json", "results.csv", "tables.md")) == \
        f"report: {where}/report.md; results: {where}/results.json, results.csv"
    (where / "report.html").write_text("")
    assert main.finished_line(workdir, ("results.json",)).startswith(f"report: {where}/report.html, report.md; ")


def test_a_dry_run_on_a_finished_workdir_says_nothing_would_run(finished_runs, capsys):
    workdir = finished_runs.path("ablate")
    marker = (workdir / "COMPLETE.json").read_bytes()
    assert main.cli(finished_runs.argv("ablate", None, "--dry_run")) == 0
    out = capsys.readouterr().out
    assert f"nothing would run: already complete: {workdir} holds the results of this config" in out, out
    assert "total:" not in out                        # no plan of passes: none would run
    # another setting: the run would compute, and the dry run says what
    assert main.cli(finished_runs.argv("ablate", None, "--config.ablation.draws=2", "--dry_run")) == 0
    out = capsys.readouterr().out
    assert "nothing would run" not in out and "total:" in out
    assert (workdir / "COMPLETE.json").read_bytes() == marker
