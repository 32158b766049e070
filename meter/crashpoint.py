"""Crash injection for the crash tests: the process SIGKILLs itself at a named step of a flush.

``METER_CRASH_AT`` lists steps, each with the probability of dying each time it is passed::

    METER_CRASH_AT="after_file:0.2,after_manifest:0.1"   # 1.0 when the probability is left out

Steps of `meter.stages.write_flush`, in order:

* ``after_intent``: the intent is durable, no data file is written yet;
* ``after_file``: after each data file's rename into place, before the manifest entry
  (so both between two files of one flush and between the last rename and the manifest);
* ``after_manifest``: the manifest entry is durable, its offsets are not committed yet
  (the Committer only sees a flush after `write_flush` returned).

Before dying it writes one line, ``meter: crash injected at STEP ...``, straight to stderr, so
a test can tell injected deaths from its own kills. Unset (production), `at` is one lookup in
an empty dict per step.
"""

from __future__ import annotations

import os
import random
import signal

ENV = "METER_CRASH_AT"
STEPS = ("after_intent", "after_file", "after_manifest")
MARKER = b"meter: crash injected at "


def parse(spec: str) -> dict[str, float]:
    """``"step[:p],..."`` -> {step: p}; raises ValueError on an unknown step or probability."""
    points: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        step, _, p = item.partition(":")
        probability = float(p) if p else 1.0
        if step not in STEPS or not 0 < probability <= 1:
            raise ValueError(f"{ENV}: {item!r}: expected one of {', '.join(STEPS)}, with 0 < p <= 1")
        points[step] = probability
    return points


_POINTS = parse(os.environ.get(ENV, ""))


def at(step: str, what: str = "") -> None:
    """Die here (SIGKILL, no cleanup of any kind) if ``METER_CRASH_AT`` says so."""
    probability = _POINTS.get(step)
    if probability is not None and random.random() < probability:
        os.write(2, MARKER + f"{step} {what}\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)
