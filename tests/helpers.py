"""Shared test helpers: composing small configs in-process."""

from modular.config import compose_config


def tiny_cfg(*overrides: str):
    return compose_config(["model=tiny", *overrides])


# -- a new language for vocabulary growth: synthetic Russian beside the embedded sample ------------------------

_RU_WORDS = ["как", "мы", "уже", "говорили", "в", "начале", "этой", "книги", "система", "может", "работать", "без", "сети", "но", "тогда", "пользователь", "должен", "сам", "настроить", "каждый", "пакет", "после", "установки", "программа", "сохраняет", "файлы", "в", "папке", "которую", "администратор", "выбрал", "заранее", "когда", "сервер", "получает", "запрос", "он", "проверяет", "права", "доступа", "и", "отвечает", "клиенту", "первое", "издание", "вышло", "осенью", "и", "было", "переведено", "на", "многие", "языки", "мира"]


def russian_texts(n_docs: int, seed: int) -> list[str]:
    """Deterministic Russian-looking documents (real words, random order): the sample corpus has no Cyrillic."""
    import random

    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(4, 8)):
            words = [rng.choice(_RU_WORDS) for _ in range(rng.randint(5, 12))]
            sentences.append(words[0].capitalize() + " " + " ".join(words[1:]) + rng.choice(".,!?")[0])
        docs.append(" ".join(sentences))
    return docs


def corpora_with_russian(root):
    """A folder for `data=corpora` (MODULAR_CORPORA=root): the embedded sample's domains and synthetic ru."""
    import json
    from pathlib import Path

    from modular.data.config import resolve_path

    root = Path(root)
    for domain in ("en", "de", "fr", "es", "code_py"):
        (root / domain).mkdir(parents=True, exist_ok=True)
        for split in ("train", "val"):
            target = root / domain / f"{split}.jsonl"
            if not target.exists():
                target.symlink_to(resolve_path(f"pkg://modular/data/sample/{domain}/{split}.jsonl"))
    (root / "ru").mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", 160, 0), ("val", 12, 1)):
        lines = [json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in russian_texts(n, seed)]
        (root / "ru" / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
    return root


def english_bpe(folder, vocab_size: int = 400):
    """A byte-level BPE trained on the embedded sample's English (folder/tokenizer.json); returns the folder."""
    import json
    from pathlib import Path

    from modular.data.config import resolve_path
    from modular.data.tokenizer import train_bpe

    folder = Path(folder)
    if not (folder / "tokenizer.json").exists():
        path = resolve_path("pkg://modular/data/sample/en/train.jsonl")
        texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
        train_bpe(texts, vocab_size, folder)
    return folder
