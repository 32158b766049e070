"""The container image, built from deploy/container/Dockerfile with buildah (chroot isolation,
no registry: the base images are made with debootstrap, see build-offline.sh), and
`meter --version` run inside it as the image's non-root user."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from meter._version import __version__

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parent.parent


def test_image_builds_and_runs_meter() -> None:
    missing = [t for t in ("buildah", "debootstrap") if shutil.which(t) is None]
    why = ""
    if missing:
        why = f"{', '.join(missing)} not installed (make validate-deploy installs them)"
    elif os.geteuid() != 0:
        why = "buildah with chroot isolation and debootstrap need root here"
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    proc = subprocess.run(
        [str(ROOT / "deploy" / "container" / "build-offline.sh"), "localhost/meter:test"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 0, report
    lines = proc.stdout.splitlines()
    assert f"meter {__version__}" in lines, report
    assert any(line.startswith("compiled parser /opt/meter/lib/python3") for line in lines), report
    assert "10001:10001 [CMD /opt/meter/bin/python -c" in proc.stdout, report  # user and HEALTHCHECK
