"""Data: corpora readers, the curation pipeline (`pipeline`, `steps/`, executors, report), the
held-out split, token shards and the packing loader.

Submodules are imported where used (`from herd.data.shards import ...`); importing `herd.data`
alone loads none of them, so the pipeline's optional dependencies stay unloaded.
"""
