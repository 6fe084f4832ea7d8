"""Corpus ingestion: any mix of files and folders -> documents (str) plus a data manifest.

    corpus = Corpus(["books/", "web.jsonl.gz:licence=cc-by-4.0", {"path": "wiki.parquet", "licence": "cc-by-sa-4.0"}])
    for doc in corpus: ...           # one str per document, in a deterministic order
    corpus.manifest                  # JSON-able: every accepted file with bytes, sha256, licence, documents

A `.txt`/`.md` file is one document; a `.jsonl` line and a `.parquet` row are one document each (their
`text` field, or another one named per source or per corpus); `.gz` of any of them is read transparently.
Folders are walked recursively in sorted order (hidden entries left out). A file that is binary, not UTF-8,
empty, corrupt, or an exact duplicate (same sha256) of one already read is skipped and counted by reason,
never a crash: one bad file among a million should not stop a run. A path that does not exist is an error,
since it is almost always a typo. The manifest becomes part of the model card, so that what a model was
trained on (and under which licences) travels with it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from daulat.errors import DaulatError

log = logging.getLogger("daulat.data")

# Suffix (after stripping .gz) -> how the file is read. Inside folders only these are picked up; a file
# named explicitly with another suffix is read as plain text.
FORMATS = {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".parquet": "parquet"}
SOURCE_OPTIONS = ("licence", "text_field")
_OPTIONS_RE = re.compile(r"^\w+=[^,]*(,\w+=[^,]*)*$")


@dataclass(frozen=True)
class Source:
    """One data source as the user named it: a file or folder, the licence of its contents, and (for
    .jsonl/.parquet) the field holding the text when it is not the corpus-wide one."""

    path: str
    licence: str | None = None
    text_field: str | None = None


def parse_source(spec: str | os.PathLike | dict | Source) -> Source:
    """`PATH`, `PATH:licence=cc-by-4.0,text_field=body`, a dict {"path", "licence", "text_field"}, or a Path."""
    if isinstance(spec, Source):
        return spec
    if isinstance(spec, os.PathLike):
        return Source(os.fspath(spec))
    if isinstance(spec, dict):
        spec = dict(spec)
        if "license" in spec:  # both spellings are in common use
            spec["licence"] = spec.pop("license")
        unknown = set(spec) - {"path", *SOURCE_OPTIONS}
        if "path" not in spec or unknown:
            raise DaulatError(f"data source {spec!r}: needs 'path', may have {SOURCE_OPTIONS}, got unknown {sorted(unknown)}")
        return Source(os.fspath(spec["path"]), spec.get("licence"), spec.get("text_field"))
    if not isinstance(spec, str):
        raise DaulatError(f"data source must be a path, 'PATH:licence=...' or a dict, got {type(spec).__name__}")
    path, sep, options = spec.rpartition(":")
    if not sep or not path or not _OPTIONS_RE.match(options):
        return Source(spec)
    fields = dict(option.split("=", 1) for option in options.split(","))
    if "license" in fields:
        fields["licence"] = fields.pop("license")
    unknown = set(fields) - set(SOURCE_OPTIONS)
    if unknown:
        raise DaulatError(f"data source {spec!r}: unknown option(s) {sorted(unknown)}; known: {', '.join(SOURCE_OPTIONS)}")
    return Source(path, fields.get("licence") or None, fields.get("text_field") or None)


def _format(path: Path) -> str | None:
    """'text', 'jsonl', 'parquet' or None (not a corpus file), looking through a .gz suffix."""
    name = path.name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    return FORMATS.get(os.path.splitext(name)[1])


class Corpus:
    """Iterable of documents (str) read from files and folders; `manifest` describes what was accepted.

    Every path is checked when the corpus is made (a missing one is a DaulatError naming it); files are read
    on iteration, each pass in the same order. `manifest` is filled while iterating and is complete once a
    pass has finished; it is reset at the start of each pass.
    """

    def __init__(self, sources: Iterable | str | os.PathLike | dict, text_field: str = "text"):
        if isinstance(sources, (str, os.PathLike, dict, Source)):
            sources = [sources]
        self.sources = [parse_source(s) for s in sources]
        if not self.sources:
            raise DaulatError("no data sources given")
        self.text_field = text_field
        self.files: list[tuple[str, Path, Source]] = []  # (path as shown, path, its source), in reading order
        self.unsupported = 0  # files inside folders with a suffix that is not a corpus format
        for source in self.sources:
            root = Path(source.path)
            if not root.exists():
                raise DaulatError(f"data path not found: {source.path}")
            if not root.is_dir():
                self.files.append((source.path, root, source))
                continue
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                relative = path.relative_to(root)
                if any(part.startswith(".") for part in relative.parts):
                    continue
                if _format(path) is None:
                    self.unsupported += 1
                    continue
                self.files.append(((Path(source.path) / relative).as_posix(), path, source))
        self.manifest: dict = {}

    def __iter__(self) -> Iterator[str]:
        skipped, skipped_records = Counter(), Counter()
        if self.unsupported:
            skipped["unsupported"] = self.unsupported
        files: list[dict] = []
        self.manifest.clear()
        self.manifest.update(
            sources=[{"path": s.path, "licence": s.licence} for s in self.sources],
            text_field=self.text_field,
            files=files, documents=0, bytes=0, skipped=skipped, skipped_records=skipped_records,
        )
        seen: set[str] = set()
        for shown, path, source in self.files:
            raw = path.read_bytes()
            sha256 = hashlib.sha256(raw).hexdigest()
            kind = _format(path) or "text"
            field = source.text_field or self.text_field
            documents, reason = [], None
            if sha256 in seen:
                reason = "duplicate"
            else:
                documents, reason = _read_documents(raw, path.name.lower().endswith(".gz"), kind, field, skipped_records)
            if reason is None and not documents:
                reason = "empty"
            if reason:
                skipped[reason] += 1
                log.info("skipping %s: %s", shown, reason)
                continue
            seen.add(sha256)
            files.append({"path": shown, "bytes": len(raw), "sha256": sha256, "licence": source.licence,
                          "format": kind, "documents": len(documents)})
            self.manifest["documents"] += len(documents)
            self.manifest["bytes"] += len(raw)
            yield from documents
        # Plain dicts from here on, so that the manifest is JSON-able as it is.
        self.manifest["skipped"], self.manifest["skipped_records"] = dict(skipped), dict(skipped_records)
        if skipped or skipped_records:
            log.warning("daulat corpus: %s", self.summary())
        if not files:
            raise DaulatError(f"no usable documents in {', '.join(s.path for s in self.sources)} ({self.summary()})")

    def summary(self) -> str:
        """One line: what was read and what was skipped, by reason (after a full pass)."""
        m = self.manifest
        line = f"{len(m.get('files', []))} files, {m.get('documents', 0)} documents, {m.get('bytes', 0)} bytes"
        for label, counts in (("skipped files", m.get("skipped")), ("skipped records", m.get("skipped_records"))):
            if counts:
                line += f"; {label}: " + ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
        return line


def iter_documents(sources, text_field: str = "text") -> tuple[Iterator[str], dict]:
    """(documents, manifest): one pass over the corpus; the manifest dict is complete once it is exhausted."""
    corpus = Corpus(sources, text_field)
    return iter(corpus), corpus.manifest


def _read_documents(raw: bytes, gzipped: bool, kind: str, field: str, skipped_records: Counter) -> tuple[list[str], str | None]:
    """(documents, None) or ([], reason) for one file's bytes. Record-level problems are counted, not fatal."""
    if gzipped:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error):
            return [], "corrupt"
    if kind == "parquet":
        return _parquet_documents(raw, field, skipped_records)
    if b"\x00" in raw:  # text never holds NUL; images, archives, UTF-16 and executables do
        return [], "binary"
    try:
        text = raw.decode("utf-8-sig")  # -sig: a leading byte-order mark is not part of the text
    except UnicodeDecodeError:
        return [], "not_utf8"
    if kind == "text":
        return ([text] if text.strip() else []), None
    values = []
    for line in text.split("\n"):  # not splitlines(): U+2028 may sit unescaped inside a JSON string
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped_records["bad_json"] += 1
            continue
        values.append(record.get(field) if isinstance(record, dict) else None)
    return _texts(values, skipped_records), None


def _parquet_documents(raw: bytes, field: str, skipped_records: Counter) -> tuple[list[str], str | None]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.ParquetFile(io.BytesIO(raw))
        if field not in table.schema_arrow.names:
            return [], "no_text_field"
        values = [v for batch in table.iter_batches(columns=[field]) for v in batch.column(0).to_pylist()]
    except (pyarrow.ArrowException, OSError):
        return [], "corrupt"
    return _texts(values, skipped_records), None


def _texts(values: list, skipped_records: Counter) -> list[str]:
    """The non-empty strings among a file's record values; the others are counted by reason."""
    documents = []
    for value in values:
        if not isinstance(value, str):
            skipped_records["no_text_field"] += 1
        elif not value.strip():
            skipped_records["empty"] += 1
        else:
            documents.append(value)
    return documents
