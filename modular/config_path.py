"""The config search path: your config folders (--config-dir, MODULAR_CONFIG_PATH) before the packaged presets.
Hydra searches them in order, so a preset in a user folder adds to its group or replaces ours of the same name.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from modular.errors import ConfigError

_cli_config_dirs: list[str] = []  # `--config-dir DIR` options of the running command (modular.cli)


def user_config_dirs() -> list[Path]:
    """User config folders, first match wins: --config-dir folders in the order given, then MODULAR_CONFIG_PATH's."""
    entries = [(d, "--config-dir") for d in _cli_config_dirs]
    entries += [(d, "MODULAR_CONFIG_PATH") for d in os.environ.get("MODULAR_CONFIG_PATH", "").split(os.pathsep) if d]
    folders: list[Path] = []
    for entry, source in entries:
        folder = Path(entry).expanduser().absolute()
        if not folder.is_dir():
            raise ConfigError(f"Config folder '{entry}' (from {source}) does not exist; give a folder that holds "
                              "config groups such as data/ or model/.")
        if folder not in folders:
            folders.append(folder)
    return folders


def config_search_path(packaged: Path) -> list[Path]:
    """Every config folder in the order hydra searches them: user folders first, then `packaged`."""
    return [*user_config_dirs(), Path(packaged)]


@contextmanager
def use_config_dirs(folders: list[str]):
    """Add user config folders (the CLI's --config-dir) for the duration of a command."""
    global _cli_config_dirs
    saved = _cli_config_dirs
    _cli_config_dirs = [*saved, *[str(f) for f in folders]]
    try:
        yield
    finally:
        _cli_config_dirs = saved


@contextmanager
def hydra_with_search_path(packaged: Path):
    """Like hydra's initialize_config_dir(packaged), with the user folders searched before it."""
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra

    version.setbase("1.3")
    search_path = create_config_search_path(str(packaged))
    for folder in reversed(user_config_dirs()):  # each goes right after hydra's own configs, before ours
        search_path.append("modular-user", str(folder), anchor="hydra")
    GlobalHydra.instance().clear()
    Hydra.create_main_hydra2(task_name="modular", config_search_path=search_path)
    try:
        yield
    finally:
        GlobalHydra.instance().clear()
