"""`modular <command> [overrides]`: a thin command line over the packages; overrides are hydra's.

User errors (bad config, missing data, corrupt checkpoints) print one line and exit non-zero;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

from modular.errors import UserError

USAGE = """usage: modular <command> [key=value ...]

Commands:
  info      print the composed model: layers, experts per bank, router, parameters, FLOPs per token
            (with run.dir=DIR also writes DIR/model.json)
  train     train the composed model on data= (default: the embedded sample corpus); resumes run.dir
  continual run a stream of domains (continual.stream=[en,de,code_py]): grow, freeze, merge experts;
            writes report.json, report.md and plots to run.dir
  export    write run.dir's latest checkpoint for Hugging Face: export.format=llama-dense (merged,
            export.merge=frequency|uniform|concat|task_arithmetic|ties) | mixtral | qwen2-moe | moe;
            domain-routed runs: export.domain=NAME (one domain's route), export.peft=true (base + PEFT adapters)
  generate  continue a prompt with run.dir's latest checkpoint: prompt="..." (generate.max_new_tokens,
            temperature, top_k, seed, domain); prints the route it chose, then the text
  upcycle   turn a dense Llama (HF folder or .gguf: upcycle.source=PATH) into an MoE run folder
            (upcycle.num_experts=E run.dir=RUN) that modular train / continual continue
  eval      print per-domain validation loss, perplexity and bits per byte of run.dir's latest checkpoint
  tokenizer train   train a byte-level BPE tokenizer on data= (tokenizer.vocab_size=N tokenizer.out=DIR)
  compare   RUN_OR_SWEEP... [--out DIR]: the runs' key figures side by side; writes compare.md, compare.png

Overrides select presets (model=tiny experts=lowrank routing=expert_choice) and set values
(experts.num_experts=16 routing.top_k=1). Presets live in configs/<group>/*.yaml.
Add a domain: +data.domains.NAME.train=PATH (.val, .weight, .text_field), then continual.stream=[...,NAME].

Options (before or among the overrides):
  --config-dir DIR  a folder of your own config groups/presets, searched before the packaged ones
                    (repeatable; also MODULAR_CONFIG_PATH=DIR1:DIR2)
  -m, --multirun    train / continual: run every combination of comma-separated values (key=a,b)
                    into one sweep folder (run.dir), resumable; then compare the members
  --cfg job|all     print the composed, validated config as YAML and exit (all: also the presets chosen)
Run `modular <command> --help` for a command's groups and presets.
"""


def cmd_info(overrides: list[str]) -> int:
    from modular.atomic import atomic_write_json
    from modular.config import compose_config, to_dict
    from modular.models import build_model
    from modular.models.summary import format_summary, summarize
    from modular.run.budget import check_budget
    from modular.run.setup import claimed_run_folder

    cfg = compose_config(overrides)
    check_budget(cfg, "build")
    model = build_model(cfg)
    summary = summarize(model)
    print(format_summary(summary, cfg))
    if cfg.run.dir:
        with claimed_run_folder(Path(cfg.run.dir), "info") as establish:
            establish()
            out = Path(cfg.run.dir) / "model.json"
            atomic_write_json(out, {**summary, "config": to_dict(cfg)})
        print(f"wrote {out}")
    return 0


def cmd_train(overrides: list[str]) -> int:
    from modular.train.run import train_command

    return train_command(overrides)


def cmd_eval(overrides: list[str]) -> int:
    from modular.train.run import eval_command

    return eval_command(overrides)


def cmd_tokenizer(args: list[str]) -> int:
    """`modular tokenizer train [data=...] tokenizer.vocab_size=N tokenizer.out=DIR`."""
    from modular.config import compose_config
    from modular.data.tokenizer import tokenizer_train_command
    from modular.errors import ConfigError

    if not args or args[0] != "train":
        raise ConfigError("modular tokenizer needs a subcommand: modular tokenizer train tokenizer.vocab_size=N tokenizer.out=DIR.")
    options = {"tokenizer.vocab_size": None, "tokenizer.out": None}
    overrides = []
    for a in args[1:]:
        key = a.split("=", 1)[0]
        if key in options and "=" in a:
            options[key] = a.split("=", 1)[1]
        else:
            overrides.append(a)
    if options["tokenizer.out"] is None:
        raise ConfigError("tokenizer.out is required: the folder to write tokenizer.json to.")
    try:
        vocab_size = int(options["tokenizer.vocab_size"] or 8192)
    except ValueError:
        raise ConfigError(f"tokenizer.vocab_size={options['tokenizer.vocab_size']} is not allowed; it must be an integer.") from None
    cfg = compose_config(overrides)
    from modular.run.budget import check_tokenizer_budget

    check_tokenizer_budget(vocab_size)
    return tokenizer_train_command(cfg.data, vocab_size, options["tokenizer.out"])


def cmd_continual(overrides: list[str]) -> int:
    from modular.continual.stream import continual_command

    return continual_command(overrides)


def cmd_export(overrides: list[str]) -> int:
    from modular.export.command import export_command

    return export_command(overrides)


def cmd_generate(args: list[str]) -> int:
    from modular.generate.sampling import generate_command

    return generate_command(args)


def cmd_upcycle(overrides: list[str]) -> int:
    from modular.export.command import upcycle_command

    return upcycle_command(overrides)


def cmd_compare(args: list[str]) -> int:
    from modular.compare import compare_command

    return compare_command(args)


COMMANDS = {"info": cmd_info, "train": cmd_train, "continual": cmd_continual, "export": cmd_export,
            "generate": cmd_generate, "upcycle": cmd_upcycle, "eval": cmd_eval, "tokenizer": cmd_tokenizer,
            "compare": cmd_compare}
NO_CONFIG = ("compare",)  # commands that compose no config: their arguments pass through untouched


def command_help(name: str) -> str:
    from modular.config import GROUP_SCHEMAS, group_presets
    from modular.config_path import user_config_dirs

    if name in NO_CONFIG:
        from modular.compare import USAGE as compare_usage
        from modular.compare import __doc__ as doc

        return f"{compare_usage}\n\n{doc}"
    lines = [f"usage: modular {name} [--config-dir DIR] [-m] [--cfg job|all] [key=value ...]", "",
             "Config groups and their presets:"]
    for group in GROUP_SCHEMAS:
        lines.append(f"  {group:<10} {', '.join(group_presets(group))}")
    folders = user_config_dirs()
    if folders:
        lines += ["", "Your config folders (searched first): " + ", ".join(str(f) for f in folders)]
    return "\n".join(lines)


def split_options(args: list[str]) -> tuple[dict, list[str]]:
    """The options --config-dir DIR, -m/--multirun and --cfg job|all, and the overrides around them."""
    from modular.errors import ConfigError

    options: dict = {"config_dirs": [], "multirun": False, "cfg": None}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, inline = arg.partition("=")
        if name in ("--config-dir", "-cd", "--cfg", "-c") and arg.startswith("-"):
            if not eq:
                if i + 1 >= len(args):
                    raise ConfigError(f"{name} needs a value, e.g. {name} {'DIR' if name in ('--config-dir', '-cd') else 'job'}.")
                inline, i = args[i + 1], i + 1
            if name in ("--config-dir", "-cd"):
                options["config_dirs"].append(inline)
            elif inline not in ("job", "all"):
                raise ConfigError(f"--cfg {inline} is not allowed; use --cfg job (the config) or --cfg all (with the "
                                  "presets chosen).")
            else:
                options["cfg"] = inline
        elif arg in ("-m", "--multirun"):
            options["multirun"] = True
        elif arg.startswith("-"):
            raise ConfigError(f"Unknown option '{arg}'; options are --config-dir DIR, -m/--multirun and --cfg job|all.")
        else:
            rest.append(arg)
        i += 1
    return options, rest


def composed_config(name: str, overrides: list[str]):
    """The config a command would run with, validated as the command validates it (for --cfg)."""
    from modular.config import compose_config

    if name == "generate":  # the prompt is free text, not an override
        overrides = [o for o in overrides if o.partition("=")[0].lstrip("+") not in ("prompt", "generate.prompt")]
    if name in ("train", "continual", "eval", "export", "generate"):
        from modular.train.run import compose_run

        cfg = compose_run(overrides)[0]
        if name == "continual":
            from modular.continual.stream import validate_continual

            validate_continual(cfg)
        return cfg
    if name == "tokenizer":  # its own options are not config keys
        overrides = [o for o in overrides if o != "train" and not o.startswith("tokenizer.")]
    return compose_config(overrides)


def print_config(name: str, overrides: list[str], which: str, multirun: bool = False) -> int:
    """`--cfg job|all`: the composed config as YAML (each member's, for a sweep), and nothing is run."""
    from omegaconf import OmegaConf

    from modular.config import composition_record

    runs = [("", overrides)]
    if multirun:
        from modular.sweep import expand_sweep

        common, combos = expand_sweep(overrides)
        runs = [(f"# member {i}: {' '.join(combo)}\n", [*common, *combo]) for i, combo in enumerate(combos)]
    for header, member in runs:
        cfg = composed_config(name, member)
        print(header + OmegaConf.to_yaml(cfg), end="")
        if which == "all":
            print(OmegaConf.to_yaml({"hydra": composition_record(member)}), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'; commands are: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    try:
        return _run(name, rest)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk wherever it strikes (logs, run files): one sentence, exit 1
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: the disk is full ({exc.strerror}{f' writing {exc.filename}' if exc.filename else ''}); "
              "free some space and run the command again.", file=sys.stderr)
        return 1


def _run(name: str, args: list[str]) -> int:
    from modular.config_path import use_config_dirs

    if name in NO_CONFIG:
        if any(a in ("-h", "--help") for a in args):
            print(command_help(name))
            return 0
        return COMMANDS[name](args)
    options, overrides = split_options([a for a in args if a not in ("-h", "--help")])
    with use_config_dirs(options["config_dirs"]):
        if any(a in ("-h", "--help") for a in args):
            print(command_help(name))
            return 0
        if options["cfg"]:
            return print_config(name, overrides, options["cfg"], options["multirun"])
        if options["multirun"]:
            from modular.sweep import sweep_command

            return sweep_command(name, overrides)
        return COMMANDS[name](overrides)


if __name__ == "__main__":
    sys.exit(main())
