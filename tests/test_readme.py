"""The README's Python example runs as written (on the built-in model and a digit image)."""
import re
from pathlib import Path

import numpy as np
from PIL import Image

from vitsparse_jax.data import DigitsSource, decode_image

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_attention_example_runs(tmp_path, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    digit = decode_image(DigitsSource("test").read(0).data)
    Image.fromarray(np.asarray(digit)).save(tmp_path / "digit.png")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.count("top-3 patch columns") == 6 and "predicted class:" in out
