"""Tokenizer files for an exported folder: tokenizer.json + tokenizer_config.json that AutoTokenizer loads offline.

Our byte tokenizer becomes a byte-level BPE without merges whose ids are the raw bytes; HF tokenizers pass through.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from modular.data.tokenizer import bytes_to_unicode
from modular.errors import ConfigError, DataError
from modular.export.writer import write_json, write_text

BYTE_SPECIALS = {"<pad>": 256, "<bos>": 257, "<eos>": 258}  # modular.data.tokenizer.ByteTokenizer's ids


def byte_level_tokenizer():
    """A `tokenizers.Tokenizer` that encodes text to its UTF-8 bytes (ids 0..255) plus <pad>/<bos>/<eos>.

    HF's ByteLevel pre-tokenizer maps every byte to a printable character (GPT-2's table); giving that
    character the byte's value as id, with no merges, makes encode(text) == list(text.encode('utf-8')).
    `use_regex=False`: no word splitting, which could not change the ids anyway but costs time.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    byte_to_char = bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in BYTE_SPECIALS])
    tok.post_processor = _bos_template("<bos>", BYTE_SPECIALS["<bos>"])
    return tok


def _bos_template(bos: str, bos_id: int):
    # Our data pipeline packs every document as [bos] + text + [eos]; HF's `tokenizer(text)` adds the
    # same BOS (as Llama tokenizers do), `add_special_tokens=False` gives exactly our encode(text).
    from tokenizers import processors

    return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])


def rust_tokenizer(tokenizer):
    """(tokenizers.Tokenizer, bos_id, eos_id, pad_id, split_special_tokens) for a modular Tokenizer,
    a `tokenizers.Tokenizer` or a path.

    split_special_tokens says whether text that spells a special token ("<eos>") encodes as plain text:
    always for the byte tokenizer (its encode is the raw bytes), never for HF tokenizers (HFTokenizer
    matches special tokens in text, and the exported file must encode the same way).
    """
    from tokenizers import Tokenizer as RustTokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        from modular.data.tokenizer import HFTokenizer

        tokenizer = HFTokenizer(tokenizer)
    if isinstance(tokenizer, RustTokenizer):
        return tokenizer, None, None, None, False
    kind = getattr(tokenizer, "kind", None)
    if kind == "byte":
        return byte_level_tokenizer(), tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, True
    if kind == "hf":
        backend = getattr(tokenizer, "backend", None) or getattr(tokenizer, "_tok", None)
        if backend is None:
            raise DataError("the hf tokenizer exposes no tokenizers.Tokenizer to export.")
        # A copy, so that adding a post-processor below cannot change the caller's tokenizer.
        return (RustTokenizer.from_str(backend.to_str()), tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id,
                bool(backend.encode_special_tokens))
    raise ConfigError(
        f"tokenizer {type(tokenizer).__name__} cannot be exported; pass a modular ByteTokenizer or HFTokenizer, "
        "a tokenizers.Tokenizer, or the path of a tokenizer.json."
    )


def write_tokenizer_files(tokenizer, folder: Path, model_vocab_size: int, model_max_length: int) -> dict:
    """Write tokenizer.json and tokenizer_config.json into `folder`; returns the special token ids."""
    tok, bos_id, eos_id, pad_id, split_special = rust_tokenizer(tokenizer)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    if vocab_size > model_vocab_size:
        raise ConfigError(
            f"the tokenizer has {vocab_size} tokens but the model's vocabulary holds {model_vocab_size}; "
            "export with the tokenizer the model was trained with."
        )
    if bos_id is not None and tok.post_processor is None:
        tok.post_processor = _bos_template(tok.id_to_token(bos_id), bos_id)
    write_text(folder / "tokenizer.json", tok.to_str(pretty=True))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": int(model_max_length),
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": split_special,
    }
    special = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    for key, token_id in (("bos_token", bos_id), ("eos_token", eos_id), ("pad_token", pad_id)):
        if token_id is not None:
            config[key] = tok.id_to_token(token_id)
    source_config = _source_tokenizer_config(tokenizer)
    if "chat_template" in source_config:
        config["chat_template"] = source_config["chat_template"]
    write_json(folder / "tokenizer_config.json", config)
    return special


def _source_tokenizer_config(tokenizer) -> dict:
    path = getattr(tokenizer, "path", None)
    if path is None or not Path(path).is_dir() or not (Path(path) / "tokenizer_config.json").is_file():
        return {}
    try:
        return json.loads((Path(path) / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
