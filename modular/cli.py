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
            export.merge=frequency|uniform|concat|task_arithmetic|ties) | mixtral | qwen2-moe | moe
  upcycle   turn a dense Llama (HF folder or .gguf: upcycle.source=PATH) into an MoE run folder
            (upcycle.num_experts=E run.dir=RUN) that modular train / continual continue
  eval      print per-domain validation loss, perplexity and bits per byte of run.dir's latest checkpoint
  tokenizer train   train a byte-level BPE tokenizer on data= (tokenizer.vocab_size=N tokenizer.out=DIR)

Overrides select presets (model=tiny experts=lowrank routing=expert_choice) and set values
(experts.num_experts=16 routing.top_k=1). Presets live in configs/<group>/*.yaml.
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


def cmd_upcycle(overrides: list[str]) -> int:
    from modular.export.command import upcycle_command

    return upcycle_command(overrides)


COMMANDS = {"info": cmd_info, "train": cmd_train, "continual": cmd_continual, "export": cmd_export,
            "upcycle": cmd_upcycle, "eval": cmd_eval, "tokenizer": cmd_tokenizer}


def command_help(name: str) -> str:
    from modular.config import GROUP_SCHEMAS, group_presets

    lines = [f"usage: modular {name} [key=value ...]", "", "Config groups and their presets:"]
    for group in GROUP_SCHEMAS:
        lines.append(f"  {group:<10} {', '.join(group_presets(group))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'; commands are: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in rest):
        print(command_help(name))
        return 0
    try:
        return COMMANDS[name](rest)
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


if __name__ == "__main__":
    sys.exit(main())
