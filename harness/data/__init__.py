"""Data preparation: text -> sentencepiece tokens -> memory-mapped shards with a manifest."""
