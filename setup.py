"""Declares the Cython extension; everything else lives in pyproject.toml.

Build flags come from the environment:
  METER_DEBUG=1  Cython bounds/wraparound checks, C asserts on, -O0 -g
  METER_ASAN=1   AddressSanitizer and UBSan (run with libasan preloaded)
  METER_NATIVE=1 -march=native (local benchmarking only; never for wheels)
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


debug = _flag("METER_DEBUG") or _flag("METER_ASAN")
compile_args = ["-O0", "-g", "-UNDEBUG"] if debug else ["-O3", "-DNDEBUG"]
link_args: list[str] = []
if _flag("METER_ASAN"):
    sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    compile_args += sanitize
    link_args += sanitize
if _flag("METER_NATIVE"):
    compile_args.append("-march=native")

directives = {
    "language_level": "3",
    "boundscheck": debug,
    "wraparound": debug,
    "initializedcheck": debug,
    "cdivision": True,  # C division everywhere: the parser divides only non-negative values
    "embedsignature": True,
}

extensions = [
    Extension(
        "meter._parser",
        ["ext/_parser.pyx"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    ),
    Extension(
        "meter._verify",
        ["ext/_verify.pyx"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    ),
    Extension(
        "meter._dedup",
        ["ext/_dedup.pyx"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        compile_time_env={"DEBUG_BUILD": debug},
        force=True,
    )
)
