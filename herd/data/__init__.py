"""Data: corpora readers now; the curation pipeline, token shards and the loader later."""
