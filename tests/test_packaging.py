"""The wheel carries what an installed `modular` needs at run time: config presets and the sample corpus."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_an_installed_wheel_composes_configs_and_finds_the_sample_corpus(tmp_path):
    wheels, target, source = tmp_path / "wheels", tmp_path / "site", tmp_path / "source"
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources it builds.
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(wheels)], check=True, capture_output=True)
    wheel = next(wheels.glob("modular_moe-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "modular/configs/config.yaml" in names and "modular/configs/continual/add_freeze.yaml" in names
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    # Run from an empty folder with the installed copy first on the path, not this checkout.
    code = ("import modular, modular.config as c; from modular.data.config import resolve_path;"
            "cfg = c.compose_config(['continual=add_freeze_merge']);"
            "sample = resolve_path(cfg.data.domains.en.train); assert sample.stat().st_size > 0;"
            "print(modular.__file__); print(c.CONFIG_DIR); print(sample)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    module_file, config_dir, sample = out.stdout.split()
    assert all(path.startswith(str(target)) for path in (module_file, config_dir, sample))
