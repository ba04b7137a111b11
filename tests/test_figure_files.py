"""Figure files (Workdir.save_figure): PNG at 150 dpi by default, PDF on request (config.figures or
$VITSPARSE_JAX_FIGURE_FORMATS), one log line per figure and around report.html."""
import logging

import pytest

from vitsparse_jax.runtime.workdir import (
    FIGURE_DPI_ENV,
    FIGURE_FORMATS_ENV,
    Workdir,
    figure_dpi,
    figure_formats,
    figure_options,
)


def small_figure():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    return fig


def png_width(path) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return im.size[0]


@pytest.fixture
def no_figure_env(monkeypatch):
    monkeypatch.delenv(FIGURE_DPI_ENV, raising=False)        # tests render at 60 dpi (conftest): undo it here
    monkeypatch.delenv(FIGURE_FORMATS_ENV, raising=False)


def test_by_default_a_figure_is_one_png_at_150_dpi(tmp_path, no_figure_env):
    assert (figure_formats(), figure_dpi()) == (("png",), 150)
    paths = Workdir(tmp_path / "default").save_figure(small_figure(), "f")
    assert [p.name for p in paths] == ["f.png"] and sorted(p.name for p in (tmp_path / "default").iterdir()) == ["f.png"]
    with figure_options(dpi=300):
        (print_png,) = Workdir(tmp_path / "print").save_figure(small_figure(), "f")
    assert abs(png_width(print_png) / png_width(paths[0]) - 2) < 0.1     # the dpi reaches the PNG


def test_pdf_on_request_from_the_config_or_the_environment(tmp_path, no_figure_env, monkeypatch):
    with figure_options("png,pdf"):
        png, pdf = Workdir(tmp_path / "config").save_figure(small_figure(), "f")
    assert pdf.name == "f.pdf" and pdf.read_bytes().startswith(b"%PDF") and png.stat().st_size > 0
    monkeypatch.setenv(FIGURE_FORMATS_ENV, "png,pdf")
    assert [p.suffix for p in Workdir(tmp_path / "env").save_figure(small_figure(), "f")] == [".png", ".pdf"]
    with figure_options("png"):                                          # the config's value wins over the env
        assert [p.suffix for p in Workdir(tmp_path / "both").save_figure(small_figure(), "f")] == [".png"]
    assert figure_formats() == ("png", "pdf")                            # and only while its block runs


@pytest.mark.parametrize("formats, dpi, message", [
    ("pdf", 0, "config.figures='pdf': expected 'png' or 'png,pdf'"),
    ("png,svg", 0, "config.figures='png,svg'"),
    ("", 5, "config.figure_dpi=5: expected a whole number of dots per inch >= 10"),
])
def test_bad_figure_settings_are_refused_with_what_to_write(formats, dpi, message):
    with pytest.raises(ValueError, match=message):
        with figure_options(formats, dpi):
            pass


def test_bad_environment_values_are_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv(FIGURE_DPI_ENV, "high")
    with pytest.raises(ValueError, match="VITSPARSE_JAX_FIGURE_DPI='high'"):
        figure_dpi()
    monkeypatch.setenv(FIGURE_FORMATS_ENV, "jpg")
    with pytest.raises(ValueError, match="VITSPARSE_JAX_FIGURE_FORMATS='jpg'"):
        figure_formats()


def test_a_run_writes_figures_as_its_config_says(tmp_path, no_figure_env):
    """The session of a run applies config.figures and config.figure_dpi while the run writes."""
    from vitsparse_jax.runtime.config_defaults import base_config
    from vitsparse_jax.runtime.session import Session

    config = base_config("sparsity")
    config.workdir = str(tmp_path)
    config.figures, config.figure_dpi = "png,pdf", 72
    with Session(config, Workdir(tmp_path)):
        assert (figure_formats(), figure_dpi()) == (("png", "pdf"), 72)
    assert (figure_formats(), figure_dpi()) == (("png",), 150)


def test_a_bad_figure_setting_on_the_command_line_is_a_user_error(tmp_path, capsys):
    from vitsparse_jax.main import cli

    status = cli(["vitsparse_jax.main", "--config=configs/sparsity.py", f"--config.workdir={tmp_path / 'run'}",
                  "--config.progress=False", "--config.figures=pdf"])
    err = capsys.readouterr().err
    assert status == 2 and "error: config.figures='pdf': expected 'png' or 'png,pdf'" in err
    assert "Traceback" not in err and not (tmp_path / "run" / "results.json").exists()


def test_each_figure_and_report_html_log_a_progress_line(tmp_path, caplog):
    from vitsparse_jax.report_html import write_report_html

    wd = Workdir(tmp_path)
    with caplog.at_level(logging.INFO):
        wd.save_figure(small_figure(), "first")
        wd.save_figure(small_figure(), "second")
        write_report_html(wd, "t", "text", [("first", ""), ("second", "")])
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" (")[0] for line in lines if line.startswith("figure")] == [
        "figure first written", "figure second written"]
    assert any(line.startswith("writing") and "report.html (2 figures" in line for line in lines)
    assert any(line.startswith("report.html written") for line in lines)
