"""The data side of the pipeline: files -> documents -> token shards -> batches, and built-in tasks.

    corpus.py   read .txt/.md/.jsonl/.parquet (and .gz of them) into documents plus a data manifest
    shards.py   tokenize once into a flat memmap (train/val) and sample seeded, resumable batches
    tasks.py    procedurally generated verifiable tasks (addition, countdown, ...) with exact checkers
"""
