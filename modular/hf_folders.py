"""Loading Hugging Face model and tokenizer folders: local files only, and never code from the folder.

Every transformers load in modular goes through here (a test keeps it so). A folder whose config asks for
its own Python code (`auto_map`, the hook behind `trust_remote_code`) is refused before transformers sees it,
so no prompt appears and nothing in the folder runs, interactive or not.
"""

from __future__ import annotations

import json
from pathlib import Path

from modular.errors import CheckpointError, DataError

# What every load passes: the files on disk, no download, no code from the folder.
LOCAL_ONLY = {"local_files_only": True, "trust_remote_code": False}
_CONFIG_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")


def refuse_custom_code(folder: str | Path, error=CheckpointError) -> None:
    """Raise `error` when a file of `folder` maps a class to Python code shipped with it (`auto_map`)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for name in _CONFIG_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not ours to judge here: the loader reports an unreadable file itself
        auto_map = config.get("auto_map") if isinstance(config, dict) else None
        if auto_map:
            first = next(iter(auto_map.values())) if isinstance(auto_map, dict) else auto_map
            first = first[0] if isinstance(first, (list, tuple)) and first else first
            raise error(f"{folder} asks to run its own Python code ({name} maps {first!r} through auto_map); modular "
                        "never runs code from a model or tokenizer folder: use a folder without custom code.")


def auto_tokenizer(folder: str | Path, **kwargs):
    """transformers.AutoTokenizer from a local folder, no custom code."""
    from transformers import AutoTokenizer

    refuse_custom_code(folder, DataError)
    return AutoTokenizer.from_pretrained(str(folder), **LOCAL_ONLY, **kwargs)


def auto_config(folder: str | Path, **kwargs):
    """transformers.AutoConfig from a local folder (or a GGUF file in it), no custom code."""
    from transformers import AutoConfig

    refuse_custom_code(folder)
    return AutoConfig.from_pretrained(str(folder), **LOCAL_ONLY, **kwargs)


def auto_causal_lm(folder: str | Path, **kwargs):
    """transformers.AutoModelForCausalLM from a local folder (or a GGUF file in it), no custom code."""
    from transformers import AutoModelForCausalLM

    refuse_custom_code(folder)
    return AutoModelForCausalLM.from_pretrained(str(folder), **LOCAL_ONLY, **kwargs)


def peft_adapter(base_model, folder: str | Path):
    """peft.PeftModel: a local PEFT adapter folder on `base_model`, offline, for inference."""
    from peft import PeftModel

    refuse_custom_code(folder)
    return PeftModel.from_pretrained(base_model, str(folder), is_trainable=False, local_files_only=True)
