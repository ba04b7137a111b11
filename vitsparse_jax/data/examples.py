"""An image shipped with the package, so that examples run as written (README.md, docs/api.md)."""
from __future__ import annotations

from pathlib import Path

EXAMPLE_IMAGE = Path(__file__).parents[1] / "assets" / "images" / "grace_hopper.jpg"


def example_image() -> Path:
    """The path of a photograph shipped with the package: Commodore Grace M. Hopper's official U.S. Navy
    portrait (1984; public domain, see vitsparse_jax/assets/images/README.md), RGB, 512 px wide and 600 px
    high. Any model's eval transform (`data.load_images`) resizes and crops it to the model's input."""
    return EXAMPLE_IMAGE
