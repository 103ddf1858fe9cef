"""Sweeps: one command run once per combination of override alternatives, each member in its own folder.
`modular train|continual -m key=a,b ...` follows hydra's basic sweeper; sweep.json records every member.

The sweep folder is run.dir (default runs/<run.name>-sweep-<hash of the command>, so rerunning the same
command finds it). Members run one after another in this process; a rerun skips finished members and
resumes the others (each member folder resumes like any run folder). A failing member is recorded with
its one-line error and the sweep goes on; the exit code says whether any member failed.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from modular.atomic import atomic_write_json
from modular.errors import ConfigError, UserError

MANIFEST = "sweep.json"
SWEEP_COMMANDS = {"train": "modular.train.run:train_command",
                  "continual": "modular.continual.stream:continual_command"}
INTERRUPTED = (130, 143)  # Ctrl-C / SIGTERM: a run saved its checkpoint and stopped; the sweep stops too


@dataclass
class Member:
    name: str  # its folder inside the sweep folder
    label: str  # how tables name it: its overrides, or a name the caller chose
    overrides: list[str]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def expand_sweep(overrides: list[str]) -> tuple[list[str], list[list[str]]]:
    """(overrides every member shares, one list of overrides per member): the cartesian product of the
    comma-separated alternatives, the first swept key varying slowest (hydra's basic sweeper)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    common, axes = [], []
    for override in overrides:
        try:
            parsed = parser.parse_override(override)
        except Exception as e:  # noqa: BLE001  (hydra's grammar errors come in several types; all are user input)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"Sweep override '{override}' does not parse ({reason}); separate alternatives with "
                              "commas, e.g. continual=naive,replay, and quote a value that holds one: "
                              "key='a,b'.") from None
        if not parsed.is_sweep_override():
            common.append(override)
            continue
        if _key(override) == "run.dir":
            raise ConfigError(f"{override} is not allowed; run.dir is the sweep folder and takes one value.")
        key = parsed.get_key_element()
        try:
            values = list(parsed.sweep_string_iterator())
        except Exception as e:  # noqa: BLE001  (e.g. a malformed range(); hydra raises several types)
            raise ConfigError(f"Sweep override '{override}' does not expand ({str(e).strip().splitlines()[0]}).") \
                from None
        if not values:
            raise ConfigError(f"Sweep override '{override}' lists no values; give at least one.")
        axes.append([f"{key}={value}" for value in values])
    return common, [list(combination) for combination in itertools.product(*axes)]


def folder_name(index: int, label: str) -> str:
    """A member's folder: its index and a readable form of its label that needs no quoting in an override."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", label.replace("=", "-")).strip("-.")[:60].rstrip("-.")
    return f"{index:02d}-{readable}" if readable else f"{index:02d}"


def default_sweep_dir(command: str, common: list[str], members: list[list[str]], run_name: str = "modular") -> Path:
    digest = hashlib.sha1(json.dumps([command, common, members]).encode()).hexdigest()[:8]
    return Path("runs") / f"{run_name}-sweep-{digest}"


def _command(command: str):
    if command not in SWEEP_COMMANDS:
        raise ConfigError(f"modular {command} cannot sweep (-m); sweeps run: {', '.join(SWEEP_COMMANDS)}.")
    module, _, name = SWEEP_COMMANDS[command].partition(":")
    return getattr(importlib.import_module(module), name)


def sweep_command(command: str, overrides: list[str]) -> int:
    """`modular <command> -m overrides...`: expand the alternatives and run the sweep."""
    _command(command)
    common, combos = expand_sweep(overrides)
    run_dirs = [o.split("=", 1)[1] for o in common if _key(o) == "run.dir"]
    common = [o for o in common if _key(o) != "run.dir"]
    run_name = next((o.split("=", 1)[1] for o in reversed(common) if _key(o) == "run.name"), "modular")
    folder = Path(run_dirs[-1]) if run_dirs else default_sweep_dir(command, common, combos, run_name)
    members = [Member("", " ".join(combo) or "(no alternatives)", combo) for combo in combos]
    return run_sweep(command, common, members, folder)


def run_sweep(command: str, common: list[str], members: list[Member], folder: Path | str,
              compare: bool = True) -> int:
    """Run every member not yet done into folder/<member>, recording each in folder/sweep.json.

    Members are matched to a manifest already in the folder by their overrides, so a rerun skips the
    finished ones. Returns 0 when every member finished, 1 when any failed, 130/143 when interrupted.
    """
    run = _command(command)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ConfigError("modular sweeps (-m) run in one process; launch each member with torchrun separately, "
                          "or run the sweep without torchrun.")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"run.dir={folder} is a file, not a folder; choose another sweep folder.")
    manifest = _load_manifest(folder, command, common)
    known = {json.dumps(m["overrides"]): m for m in manifest["members"]}
    chosen = []
    for member in members:
        record = known.get(json.dumps(member.overrides))
        if record is None:
            index = len(manifest["members"])
            record = {"name": member.name or folder_name(index, member.label), "label": member.label,
                      "overrides": list(member.overrides), "status": "pending", "error": None, "exit_code": None,
                      "seconds": None}
            manifest["members"].append(record)
            known[json.dumps(member.overrides)] = record
        chosen.append(record)
    folder.mkdir(parents=True, exist_ok=True)
    _save(folder, manifest)

    code = 0
    for i, record in enumerate(chosen, start=1):
        header = f"[sweep {i}/{len(chosen)}] {record['label']} → {folder / record['name']}"
        if record["status"] == "done":
            print(f"{header}: done before, skipped")
            continue
        print(header, flush=True)
        record.update(status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), error=None, exit_code=None)
        _save(folder, manifest)
        started = time.perf_counter()
        try:
            exit_code = run([*common, *record["overrides"], f"run.dir={folder / record['name']}"])
            error = None if exit_code == 0 else f"exited with code {exit_code}"
        except UserError as e:
            exit_code, error = e.exit_code, str(e)
        except KeyboardInterrupt:
            exit_code, error = 130, "interrupted"
        except Exception as e:  # noqa: BLE001  (a bug in one member must not stop the others; its traceback is printed)
            traceback.print_exc()
            exit_code, error = 1, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        status = "done" if exit_code == 0 else ("interrupted" if exit_code in INTERRUPTED else "failed")
        record.update(status=status, error=error, exit_code=exit_code, seconds=round(time.perf_counter() - started, 1),
                      finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        _save(folder, manifest)
        if status == "failed":
            print(f"error: {record['label']} failed: {error}", file=sys.stderr)
            code = 1
        if status == "interrupted":
            print(f"sweep stopped; rerun the same command to resume {folder}", file=sys.stderr)
            return exit_code
    code = 1 if any(r["status"] == "failed" for r in chosen) else code
    print(summary(folder, chosen))
    if compare:
        from modular.compare import compare_paths

        try:
            compare_paths([folder], out=folder)
        except UserError as e:  # the members' results stand without the comparison
            print(f"error: comparing the sweep failed: {e}", file=sys.stderr)
    return code


def _load_manifest(folder: Path, command: str, common: list[str]) -> dict:
    path = folder / MANIFEST
    if not path.exists():
        return {"command": command, "common": list(common), "members": []}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not a readable sweep manifest ({e}); move it away to start the sweep anew.") \
            from None
    if manifest.get("command") != command or manifest.get("common") != list(common):
        raise ConfigError(f"run.dir={folder} holds a sweep of 'modular {manifest.get('command')}' with the overrides "
                          f"{' '.join(manifest.get('common') or []) or '(none)'}; rerun it with those, or choose "
                          "another run.dir.")
    return manifest


def _save(folder: Path, manifest: dict) -> None:
    atomic_write_json(folder / MANIFEST, manifest)


def summary(folder: Path, records: list[dict]) -> str:
    lines = [f"sweep {folder}:", "| member | status | seconds | error |", "|---|---|---:|---|"]
    for r in records:
        lines.append(f"| {r['label']} | {r['status']} | {r['seconds'] if r['seconds'] is not None else '–'} | "
                     f"{r['error'] or ''} |")
    return "\n".join(lines)


def read_manifest(folder: Path) -> dict | None:
    """The sweep.json of a sweep folder, or None when the folder is not one."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a readable sweep manifest ({e}).") from None
