"""Data: tokenizer, token shards, demo corpus, preparation and the training loader."""
