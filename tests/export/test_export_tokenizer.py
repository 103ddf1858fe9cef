"""Exported tokenizer files: AutoTokenizer loads them offline and encodes exactly like our tokenizers."""

import pytest

from modular.data.tokenizer import ByteTokenizer, HFTokenizer, train_bpe
from modular.errors import ConfigError
from modular.export.hf_tokenizer import write_tokenizer_files

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Grüße aus München: Äpfel, Öl und Übermut — schön!",
    "emoji 🚀🎉, 日本語, combining e\u0301, tabs\tand\r\nnewlines  double  spaces ",
    "text that spells <eos> or <bos> or <pad> is just text",
    "",
    " leading space",
]


def load(folder):
    return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def test_byte_tokenizer_round_trips_through_auto_tokenizer(tmp_path):
    ours = ByteTokenizer()
    special = write_tokenizer_files(ours, tmp_path, model_vocab_size=259, model_max_length=256)
    assert special == {"bos_token_id": 257, "eos_token_id": 258, "pad_token_id": 256}
    hf = load(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (257, 258, 256)
    assert len(hf) == 259
    for text in TEXTS:
        assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
        assert hf(text)["input_ids"] == [257] + ours.encode(text)  # BOS, as our documents are packed
        assert hf.decode(hf(text)["input_ids"], skip_special_tokens=True) == text


def test_hf_tokenizer_passes_through(tmp_path):
    path = train_bpe(TEXTS * 5, 300, tmp_path / "bpe")
    ours = HFTokenizer(path)
    out = tmp_path / "export"
    out.mkdir()
    special = write_tokenizer_files(ours, out, model_vocab_size=ours.vocab_size, model_max_length=128)
    hf = load(out)
    assert hf.eos_token_id == ours.eos_id == special["eos_token_id"]
    for text in TEXTS:
        assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="259 tokens but the model's vocabulary holds 258"):
        write_tokenizer_files(ByteTokenizer(), tmp_path, model_vocab_size=258, model_max_length=8)
