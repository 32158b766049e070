"""The release build: `python -m build` makes an sdist and a wheel (from the sdist, so the
sdist is complete), and the wheel, installed into a fresh venv far from the source tree,
runs: `meter --version`, `meter validate`, and the compiled parser from site-packages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from meter._version import __version__

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parent.parent
EVENTS = [
    b'{"event_id":"e1","ts":"2026-11-29T10:00:00Z","user":"ada","model":"claude-sonnet-4-5",'
    b'"input_tokens":1200,"output_tokens":80}',
    b'{"event_id":"e2","ts":"2026-11-29T10:00:01Z","user":"bob","model":"claude-sonnet-4-5",'
    b'"input_tokens":-1,"output_tokens":80}',
    b"not json",
]


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, f"$ {' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("build", reason="`build` comes with meter's ops extra")
    tree = tmp_path_factory.mktemp("tree")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        rel = Path(os.fsdecode(name))
        if rel.parts[0] in ("build", "dist") or not (ROOT / rel).is_file():
            continue
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes((ROOT / rel).read_bytes())
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--outdir", str(out), str(tree)], cwd=tree)
    return out


def test_sdist_and_wheel(dist: Path) -> None:
    sdists = list(dist.glob(f"meter-{__version__}.tar.gz"))
    wheels = list(dist.glob(f"meter-{__version__}-cp3*-*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in dist.iterdir())
    with tarfile.open(sdists[0]) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    assert {"pyproject.toml", "setup.py", "ext/_parser.pyx", "meter/_version.py", "README.md"} <= names
    assert not any(n.endswith(".so") for n in names)
    with zipfile.ZipFile(wheels[0]) as wheel:
        inside = set(wheel.namelist())
    assert any(n.startswith("meter/_parser.") and n.endswith(".so") for n in inside), sorted(inside)
    assert {"meter/py.typed", "meter/_parser.pyi"} <= inside
    assert any(n.startswith("meter/catalog/") and n.endswith(".toml") for n in inside)


def test_wheel_in_a_fresh_venv(dist: Path, tmp_path: Path) -> None:
    wheel = next(dist.glob("meter-*.whl"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    py, meter = venv / "bin" / "python", venv / "bin" / "meter"
    run([str(py), "-m", "pip", "install", "--quiet", str(wheel)], cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "METER_PURE_PYTHON")}
    assert run([str(meter), "--version"], cwd=tmp_path, env=env).strip() == f"meter {__version__}"
    events = tmp_path / "events.ndjson"
    events.write_bytes(b"\n".join(EVENTS) + b"\n")
    summary = json.loads(
        run(
            [str(meter), "validate", str(events), "--json", "--catalog", "--now", "2026-11-29T11:00:00Z"],
            cwd=tmp_path,
            env=env,
        )
    )
    assert summary["events"] == 1 and summary["rejected"] == 2, summary
    assert summary["rejects"] == {"invalid_json": 1, "out_of_range": 1}, summary
    assert summary["cost_usd"] == "0.004800000000", summary  # 1200 x $3/M + 80 x $15/M
    where = run(
        [
            str(py),
            "-c",
            "import meter, meter.parser, meter._parser as p; assert meter.parser.COMPILED; print(p.__file__)",
        ],
        cwd=tmp_path,
        env=env,
    ).strip()
    assert where.startswith(str(venv)) and "site-packages" in where, where
    assert not where.startswith(str(ROOT))
