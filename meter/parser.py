"""The parser's public face: the compiled parser, or its pure-Python twin when
METER_PURE_PYTHON=1 (or when the extension is not built)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from meter import _pyparser

if TYPE_CHECKING or os.environ.get("METER_PURE_PYTHON", "") not in ("", "0"):
    parse_batch = _pyparser.parse_batch
    COMPILED = False
else:
    try:
        from meter._parser import parse_batch
    except ImportError as error:  # pragma: no cover - a source tree without `make`
        raise ImportError(
            "meter's compiled parser is not built; run `make` (or `pip install -e .`), "
            "or set METER_PURE_PYTHON=1 to use the pure-Python parser"
        ) from error
    COMPILED = True

py_parse_batch = _pyparser.parse_batch

__all__ = ["COMPILED", "parse_batch", "py_parse_batch"]
