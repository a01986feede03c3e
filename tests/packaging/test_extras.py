"""The wheel as a user gets it: what it ships, and each extra installed alone into a fresh venv.

The wheel is built once from a copy of the source tree (a stale ``build/`` cannot leak into it).
The agent and fleet extras are installed from the package registry into clean virtualenvs
(no system site-packages) and their programs run there; the converter extra (TensorFlow, about
600 MB) is checked in the wheel's metadata instead of being installed.

Installing takes about 50 s per extra with a warm pip cache, so those two tests run with
``make test-packaging`` (EDGEFLEET_PACKAGING=1); the wheel's contents are checked in every run,
and tests/packaging/test_imports_declared.py checks the declarations from the source in seconds.
"""

from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IGNORE = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                ".ruff_cache", "bench", "demo-out", "tests")
PIP_TIMEOUT = 900
installs = pytest.mark.skipif(os.environ.get("EDGEFLEET_PACKAGING") != "1",
                              reason="installs extras from the registry (~2 min): make test-packaging")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src") / "edgefleet"
    shutil.copytree(REPO, src, symlinks=True, ignore=IGNORE)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
                           "-q", str(src), "-w", str(out)], capture_output=True, text=True, timeout=PIP_TIMEOUT,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (built,) = out.glob("edgefleet-*.whl")
    return built


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(zf.read(name))


def _requires(wheel: Path, extra: str | None) -> dict[str, str]:
    """distribution -> requirement text, for the core (``None``) or one extra."""
    out = {}
    for req in _metadata(wheel).get_all("Requires-Dist") or []:
        marker_extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
        if (marker_extra.group(1) if marker_extra else None) == extra:
            name = re.match(r"[A-Za-z0-9._-]+", req)
            assert name
            out[re.sub(r"[-_.]+", "-", name.group(0)).lower()] = req
    return out


def test_the_wheel_ships_the_units_the_examples_the_profiles_and_the_license(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for shipped, source in [("edgefleet/data/edge-agent.service", "deploy/edge-agent.service"),
                                ("edgefleet/data/edge-fleet-controller.service", "deploy/edge-fleet-controller.service"),
                                ("edgefleet/data/agent.yaml", "deploy/agent.yaml"),
                                ("edgefleet/data/mosquitto/acl", "docs/mosquitto/acl"),
                                ("edgefleet/data/mosquitto/mosquitto.conf", "docs/mosquitto/mosquitto.conf")]:
            assert shipped in names, shipped
            assert zf.read(shipped) == (REPO / source).read_bytes(), f"{shipped} differs from {source}"
        for profile in sorted((REPO / "device_profiles").glob("*.yaml")):
            assert f"device_profiles/{profile.name}" in names, profile.name
        for migration in sorted((REPO / "fleet" / "migrations").glob("*.sql")):
            assert f"fleet/migrations/{migration.name}" in names, migration.name
        (license_file,) = [n for n in names if re.search(r"\.dist-info/licenses/LICENSE$", n)]
        text = zf.read(license_file).decode()
        assert "Apache License" in text and "Version 2.0, January 2004" in text
        assert "END OF TERMS AND CONDITIONS" in text, "the full license text, not a stub"
        unit = zf.read("edgefleet/data/edge-agent.service").decode()
        assert "ExecStart=edge-agent run " in unit and "/home/" not in unit and "/work/" not in unit
        assert not any(n.startswith(("tests/", "build/", "scripts/")) for n in names)
    assert _metadata(wheel)["License-Expression"] == "Apache-2.0"


def test_the_converter_extra_declares_tensorflow_keras_tqdm_and_pillow_without_installing_them(wheel: Path) -> None:
    req = _requires(wheel, "converter")
    for dist in ("tensorflow", "tensorflow-cpu", "keras", "h5py", "tqdm", "pillow", "ai-edge-litert"):
        assert dist in req, f"[converter] does not declare {dist}: {sorted(req)}"
    assert "platform_machine" in req["tensorflow-cpu"] and "platform_machine" in req["tensorflow"]


def test_the_core_floors_are_satisfied_by_debian_bookworm_where_it_can_be(wheel: Path) -> None:
    core = _requires(wheel, None)
    assert core["cryptography"].endswith(">=38"), core["cryptography"]  # bookworm: python3-cryptography 38
    assert ">=6" in core["pyyaml"] and ">=1.23" in core["numpy"]  # bookworm: 6.0, 1.24
    agent = _requires(wheel, "agent")
    assert ">=9.4" in agent["pillow"] and ">=5.9" in agent["psutil"]  # bookworm: 9.4, 5.9
    assert ">=2.0" in agent["paho-mqtt"] and ">=2.5" in core["pydantic"]  # bookworm's 1.6 and 1.10 are too old


def _fresh_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True).create(path)
    return path / "bin"


def _install(bin_dir: Path, requirement: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}
    proc = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                           requirement], capture_output=True, text=True, timeout=PIP_TIMEOUT, check=False, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _run(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True, timeout=120,
                          check=False, cwd=cwd, env=env)  # cwd outside the checkout: the installed copy runs


def _import_every_module(bin_dir: Path, package: str, cwd: Path) -> None:
    code = ("import importlib, pkgutil, sys\n"
            f"import {package}\n"
            f"names = [m.name for m in pkgutil.walk_packages({package}.__path__, '{package}.')]\n"
            "for n in names: importlib.import_module(n)\n"
            f"assert '{REPO}' not in {package}.__file__, {package}.__file__\n"
            "print(len(names))\n")
    proc = _run(bin_dir, "python", "-c", code, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@installs
def test_the_agent_extra_alone_runs_edge_agent_without_tensorflow(wheel: Path, tmp_path: Path) -> None:
    from edgefleet import __version__

    bin_dir = _fresh_venv(tmp_path / "venv")
    _install(bin_dir, f"{wheel}[agent]")
    version = _run(bin_dir, "edge-agent", "--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"edge-agent {__version__}", version
    profile = _run(bin_dir, "edge-agent", "profile", "rpi4", cwd=tmp_path)
    assert profile.returncode == 0 and profile.stdout.startswith("rpi4"), profile.stderr
    _import_every_module(bin_dir, "agent", tmp_path)
    runtime = _run(bin_dir, "python", "-c", "from agent.runtime import get_runtime; print(get_runtime().name)",
                   cwd=tmp_path)
    assert runtime.stdout.strip() == "ai-edge-litert", runtime.stderr
    no_tf = _run(bin_dir, "python", "-c", "import tensorflow", cwd=tmp_path)
    assert no_tf.returncode != 0, "the agent extra must not pull in TensorFlow"
    files = _run(bin_dir, "python", "-m", "edgefleet.data", cwd=tmp_path)
    assert files.returncode == 0 and files.stdout.count("\n") == 5, files.stderr
    assert all(Path(line).is_file() for line in files.stdout.split()), files.stdout


@pytest.mark.slow
@installs
def test_the_fleet_extra_alone_runs_edge_fleet_and_migrates_a_state_database(wheel: Path, tmp_path: Path) -> None:
    from edgefleet import __version__

    bin_dir = _fresh_venv(tmp_path / "venv")
    _install(bin_dir, f"{wheel}[fleet]")
    version = _run(bin_dir, "edge-fleet", "--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"edge-fleet {__version__}", version
    _import_every_module(bin_dir, "fleet", tmp_path)
    migrate = _run(bin_dir, "edge-fleet", "migrate", "--state", f"sqlite:///{tmp_path / 'fleet.db'}", cwd=tmp_path)
    assert migrate.returncode == 0, migrate.stderr  # the schema files ship in the wheel
    keys = _run(bin_dir, "edge-fleet", "keygen", "--out", str(tmp_path / "keys"), cwd=tmp_path)
    assert keys.returncode == 0 and (tmp_path / "keys" / "signing.pub").is_file(), keys.stderr
