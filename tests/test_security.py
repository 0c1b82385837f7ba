"""Security basics that a code scan can show: model loading never unpickles (safetensors only)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNPICKLING = re.compile(r"\btorch\.load\(|\bpickle\.loads?\(|\bimport pickle\b|\bcloudpickle\b|weights_only\s*=\s*False")


def test_no_unpickling_in_the_product_code():
    offenders = []
    for folder in ("model_shards", "cluster", "kernels"):
        for path in (ROOT / folder).rglob("*.py"):
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                if UNPICKLING.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not offenders, offenders


def test_checkpoints_are_read_only_through_safetensors():
    text = (ROOT / "model_shards" / "checkpoint.py").read_text()
    assert "from safetensors import" in text and ".bin" not in text and ".pt\"" not in text
