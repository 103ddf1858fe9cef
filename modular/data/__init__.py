"""Data for training and evaluation: corpus readers, tokenizers, cached token shards and domain mixtures.
Import from the modules: config (DataConfig), corpus, split, tokenizer, shards (TokenShard), loader (batches).
"""
