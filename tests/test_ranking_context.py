"""benchmarks/ranking_context.py reads a world caption's colour, shape and background in every
caption template (the words are disjoint sets, so word order does not matter)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from diffusion_attribution.data.shapes import CAPTION_TEMPLATES

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ranking_context.py"


def test_caption_attributes_in_every_template() -> None:
    spec = importlib.util.spec_from_file_location("ranking_context", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for template in CAPTION_TEMPLATES:
        caption = template.format(desc="striped yellow triangle", background="white")
        assert module.caption_attributes(caption) == {
            "colour": "yellow",
            "shape": "triangle",
            "background": "white",
        }
    assert module.caption_attributes("a <new1> on a gray background")["shape"] is None
