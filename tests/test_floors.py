"""The floors (README, Layout) hold: the import-linter contracts in pyproject.toml pass on the package, and
they fail when a module imports upward or two modules import each other (so the check can catch a change)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = str(Path(sys.executable).with_name("lint-imports"))


def lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [LINT, "--no-logo", "--no-cache", str(cwd / "pyproject.toml")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def copy_of_package(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(ROOT / "feather_grpc", tmp_path / "feather_grpc", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_the_package_keeps_every_floor_contract() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_floors(tmp_path: Path) -> None:
    root = copy_of_package(tmp_path)
    errors = root / "feather_grpc" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\nfrom feather_grpc.engine import validation  # noqa\n")
    result = lint(root)
    assert result.returncode == 1
    assert "feather_grpc.core.errors -> feather_grpc.engine.validation" in result.stdout


def test_a_sibling_import_cycle_breaks_the_floors(tmp_path: Path) -> None:
    root = copy_of_package(tmp_path)
    pricing = root / "feather_grpc" / "core" / "pricing.py"
    breaker = root / "feather_grpc" / "core" / "breaker.py"
    pricing.write_text(pricing.read_text() + "\nfrom feather_grpc.core import breaker  # noqa\n")
    breaker.write_text(breaker.read_text() + "\nfrom feather_grpc.core import pricing  # noqa\n")
    result = lint(root)
    assert result.returncode == 1
    assert "No cycles are allowed in feather_grpc.core" in result.stdout


def test_the_engine_importing_a_concrete_store_breaks_the_floors(tmp_path: Path) -> None:
    """The engine gets its ledger, limiter, budgets, circuits and cache from the assembly, as interfaces."""
    root = copy_of_package(tmp_path)
    gateway = root / "feather_grpc" / "engine" / "gateway.py"
    gateway.write_text(
        gateway.read_text() + "\nfrom feather_grpc.state.memory_circuits import MemoryCircuitStore  # noqa\n"
    )
    result = lint(root)
    assert result.returncode == 1
    assert "feather_grpc.engine.gateway -> feather_grpc.state.memory_circuits" in result.stdout


def test_an_import_for_type_hints_alone_counts_too(tmp_path: Path) -> None:
    """`if TYPE_CHECKING:` imports are no exemption: a floor that names a type from above, or two modules that
    name each other's types, are tangled all the same (a small Protocol on the lower module is the way out)."""
    root = copy_of_package(tmp_path)
    errors = root / "feather_grpc" / "core" / "errors.py"
    errors.write_text(
        errors.read_text()
        + "\nfrom typing import TYPE_CHECKING  # noqa\n"
        + "if TYPE_CHECKING:\n    from feather_grpc.engine import validation  # noqa\n"
    )
    response = root / "feather_grpc" / "providers" / "transport" / "response.py"
    response.write_text(
        response.read_text()
        + "\nfrom typing import TYPE_CHECKING  # noqa\n"
        + "if TYPE_CHECKING:\n    from feather_grpc.providers.transport.connection import Connection  # noqa\n"
    )
    result = lint(root)
    assert result.returncode == 1
    assert "feather_grpc.core.errors -> feather_grpc.engine.validation" in result.stdout
    assert "No cycles are allowed in feather_grpc.providers.transport" in result.stdout


def test_the_wheel_ships_the_embedded_default_config(tmp_path: Path) -> None:
    """The embedded default is a data file (config/default.json): the wheel must carry it, or
    `feather-grpc serve` without a config file fails once installed."""
    src = copy_of_package(tmp_path / "src")
    out = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("feather_grpc-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = z.read("feather_grpc/config/default.json")
    assert shipped == (ROOT / "feather_grpc" / "config" / "default.json").read_bytes()
