"""Corpus ingestion: any mix of files and folders -> documents (str) plus a data manifest.

    corpus = Corpus(["books/", "web.jsonl.gz:licence=cc-by-4.0", {"path": "wiki.parquet", "licence": "cc-by-sa-4.0"}])
    for doc in corpus: ...           # one str per document, in a deterministic order
    corpus.manifest                  # JSON-able: every accepted file with bytes, sha256, licence, documents

A `.txt`/`.md` file, and a file without a suffix (`README`, `copyright`, `changelog`), is one document; a `.jsonl` line and a `.parquet` row are one document each (their
`text` field, or another one named per source or per corpus); `.gz` of any of them is read transparently.
Folders are walked in sorted order (hidden entries left out). A file that is binary, not UTF-8, empty,
corrupt, or an exact duplicate (same sha256) of one already read is skipped and counted by reason, never a
crash: one bad file among a million should not stop a run. A path that does not exist is an error, since it
is almost always a typo. The manifest becomes part of the model card, so that what a model was trained on
(and under which licences) travels with it; its paths are relative to each source's root, so a card does not
reveal the folders of the machine it was made on.

Untrusted files are read the way a careful server reads a request body (see `ReadLimits`):

- every file is streamed, decompressed included, with a cap on the bytes read from one file and on one
  document (a text file, a JSONL line, a Parquet value); what exceeds a cap is skipped and counted, so a
  1 MB `.gz` of 1 GiB stops costing memory at the first block (NUL bytes: binary) or at the cap;
- a file is scanned once (sha256, binary, UTF-8, caps) before any of its documents is given out, so a
  skipped file contributes nothing; nothing is read whole to learn that it is binary;
- only regular files are read: a FIFO, a socket or a device (`/dev/zero`) is skipped, never opened for
  reading, so it cannot hang or flood the run;
- folders are walked with an explicit stack (no recursion limit); a folder or file that cannot be read is
  skipped and counted, not fatal; a JSONL line nested too deeply is a skipped record;
- symbolic links are followed only while their target stays inside the source's root (a `passwd.txt ->
  /etc/passwd` link is skipped as `symlink_outside_root`) unless `follow_links` is set; each folder is
  walked once, so a link loop ends. A path named explicitly as a source is the user's choice and followed.

Skip reasons, in the manifest's `skipped` (files) and `skipped_records` (records): unsupported, binary,
not_utf8, empty, duplicate, corrupt, file_too_large, document_too_large, not_regular_file,
symlink_outside_root, broken_symlink, already_walked, unreadable, unreadable_folder; bad_json,
no_text_field. Hidden entries (names starting with a dot, such as `.git`) are left out by design and not
counted.
"""

from __future__ import annotations

import codecs
import fnmatch
import gzip
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Iterable, Iterator

from daulat.data.documents import document_format, extract_file
from daulat.data.reading import (BLOCK, ReadLimits, Skipped, chunks, inflated, open_regular, ordered_map, progress,
                                 worker_count)
from daulat.errors import DaulatError

__all__ = ["Corpus", "ReadLimits", "Skipped", "Source", "iter_documents", "parse_source", "published_name", "walk_folder"]

log = logging.getLogger("daulat.data")

# Suffix (after stripping .gz) -> how the file is read. Inside folders only these are picked up; a file
# named explicitly with another suffix is read as plain text.
FORMATS = {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".parquet": "parquet"}
SOURCE_OPTIONS = ("licence", "text_field")
_OPTIONS_RE = re.compile(r"^\w+=[^,]*(,\w+=[^,]*)*$")
_BOM = codecs.BOM_UTF8
MAX_LISTED = 1000  # skipped files listed by path in the manifest (all are counted)


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


def published_name(path: str) -> str:
    """How a source is named in the manifest (and so in model cards): as the user wrote it when that is a
    relative path inside the working folder, else only its last component (`/home/ana/docs` -> `docs`)."""
    pure = PurePath(path)
    if not pure.is_absolute() and ".." not in pure.parts and not path.startswith("~") and pure.parts:
        return pure.as_posix()
    return pure.name or Path(os.path.realpath(path)).name or "source"


def _format(path: Path) -> str | None:
    """'text', 'jsonl', 'parquet', 'document' (PDF, Office, HTML... through daulat.data.documents) or None
    (not a corpus file), looking through a .gz suffix."""
    name = path.name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    suffix = os.path.splitext(name)[1]
    if not suffix:  # README, copyright, changelog: text by convention; a binary one is skipped as binary
        return "text"
    kind = FORMATS.get(suffix)
    if kind is None and document_format(path.name) not in (None, "text"):
        return "document"  # PDF, Office, HTML..., and source code and config files (read as text there)
    return kind


def selected(relative: str, include=(), exclude=()) -> bool:
    """Whether the path inside a source passes the --include globs (any; none given: all) and no --exclude."""
    return (not include or any(fnmatch.fnmatch(relative, g) for g in include)) \
        and not any(fnmatch.fnmatch(relative, g) for g in exclude)


def _inside(target: str, root: str) -> bool:
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def _entry_kind(entry: os.DirEntry, real_root: str, follow_links: bool) -> str:
    """'dir' or 'file' for a folder entry, else raises Skipped with the reason it is not read."""
    try:
        if entry.is_symlink():
            if not os.path.exists(entry.path):
                raise Skipped("broken_symlink")
            if not follow_links and not _inside(os.path.realpath(entry.path), real_root):
                raise Skipped("symlink_outside_root")
        mode = entry.stat(follow_symlinks=True).st_mode
    except OSError:
        raise Skipped("unreadable") from None
    if stat.S_ISDIR(mode):
        return "dir"
    if not stat.S_ISREG(mode):
        raise Skipped("not_regular_file")  # FIFO, socket, device: reading could block or never end
    return "file"


def walk_folder(root: Path, follow_links: bool, skipped: Counter, accept=None,
                listed: list | None = None) -> list[tuple[tuple[str, ...], Path]]:
    """(relative parts, path) of the corpus files under `root`, sorted; everything else counted in `skipped`
    (and, with `listed`, appended to it as (relative path, reason)).

    accept(name) -> bool says which file names are read (default: the FORMATS of this module).

    Iterative (a folder 100,000 levels deep is fine) and each real folder is entered once (link loops end).
    """
    real_root = os.path.realpath(root)
    found: list[tuple[tuple[str, ...], Path]] = []
    stack: list[tuple[tuple[str, ...], str]] = [((), os.fspath(root))]
    entered: set[tuple[int, int]] = set()

    def skip(parts: tuple[str, ...], reason: str) -> None:
        skipped[reason] += 1
        if listed is not None:
            listed.append(("/".join(parts) or ".", reason))

    while stack:
        parts, folder = stack.pop()
        try:
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in entered:
                skip(parts, "already_walked")
                continue
            entered.add((info.st_dev, info.st_ino))
            with os.scandir(folder) as entries:
                entries = sorted(entries, key=lambda e: e.name)
        except OSError:
            skip(parts, "unreadable_folder")
            continue
        folders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                kind = _entry_kind(entry, real_root, follow_links)
            except Skipped as e:
                skip(parts + (entry.name,), e.args[0])
                continue
            if kind == "dir":
                folders.append((parts + (entry.name,), entry.path))
            elif not (accept(entry.name) if accept else _format(Path(entry.name)) is not None):
                skip(parts + (entry.name,), "unsupported")
            else:
                found.append((parts + (entry.name,), Path(entry.path)))
        stack.extend(reversed(folders))  # depth first, in name order: a real folder before a later link to it
    found.sort(key=lambda item: item[0])
    return found


class Corpus:
    """Iterable of documents (str) read from files and folders; `manifest` describes what was accepted.

    Every path is checked when the corpus is made (a missing one is a DaulatError naming it, and so is a
    set of sources in which no file could hold a document); files are read on iteration, each pass in the
    same order. `manifest` is filled while iterating and is complete once a pass has finished; it is reset
    at the start of each pass.
    """

    def __init__(self, sources: Iterable | str | os.PathLike | dict, text_field: str = "text",
                 limits: ReadLimits | None = None, include=(), exclude=(), workers: int | None = None):
        if isinstance(sources, (str, os.PathLike, dict, Source)):
            sources = [sources]
        self.sources = [parse_source(s) for s in sources]
        if not self.sources:
            raise DaulatError("no data sources given")
        self.text_field = text_field
        self.limits = limits or ReadLimits()
        self.workers = workers  # processes extracting PDF, Office, HTML... files (None: see worker_count)
        # (source index, path relative to the source's root, path), in reading order
        self.files: list[tuple[int, str, Path]] = []
        self.listing_skipped: Counter = Counter()  # found while listing: unsupported, FIFOs, links...
        self.listing_skipped_files: list[dict] = []
        for i, source in enumerate(self.sources):
            root = Path(source.path)
            if not os.path.lexists(root):
                raise DaulatError(f"data path not found: {source.path} (it does not exist)")
            if root.is_dir():
                listed: list = []
                for parts, path in walk_folder(root, self.limits.follow_links, self.listing_skipped, listed=listed):
                    if selected("/".join(parts), include, exclude):
                        self.files.append((i, "/".join(parts), path))
                    else:
                        self.listing_skipped["excluded"] += 1
                self.listing_skipped_files += [{"source": i, "path": p, "reason": r} for p, r in listed]
                continue
            try:
                _check_named_file(root, self.limits)
            except Skipped as e:
                log.info("skipping %s: %s", source.path, e.args[0])
                self.listing_skipped[e.args[0]] += 1
                self.listing_skipped_files.append({"source": i, "path": root.name, "reason": e.args[0]})
                continue
            self.files.append((i, root.name, root))
        if not self.files:
            raise DaulatError(f"no readable corpus files in {', '.join(s.path for s in self.sources)} "
                              f"(skipped: {_counts(self.listing_skipped) or 'none found'})")
        self.manifest: dict = {}

    def source_manifest(self) -> list[dict]:
        """The sources as the manifest records them: published name and licence."""
        return [{"path": published_name(s.path), "licence": s.licence} for s in self.sources]

    def __iter__(self) -> Iterator[str]:
        return (text for _, text in self.records())

    def records(self) -> Iterator[tuple[str, str]]:
        """(format, text) of each document, in reading order: the documents of `iter(corpus)`, each with
        the format it came from ('text', 'jsonl', 'parquet', or a document format: 'pdf', 'html', 'code'...).

        PDF, Office, HTML... files are extracted by worker processes (`workers`, see worker_count) a few
        files ahead of the reader, in order, so a pass gives the same documents for any number of workers.
        """
        skipped, skipped_records, skipped_files, files = self._start_pass()
        jobs = [(path, self.limits) for _, _, path in self.files if _format(path) == "document"]
        extracted = ordered_map(_extract_job, jobs, worker_count(self.workers, len(jobs)))
        seen: set[str] = set()
        bar = progress(len(self.files), None)  # on stderr, only when it is a terminal
        for index, relative, path in self.files:
            bar.update()
            source, kind = self.sources[index], _format(path) or "text"
            found = next(extracted) if kind == "document" else None
            count = 0
            try:
                size, sha256 = scan_file(path, kind, self.limits)
                if sha256 in seen:
                    raise Skipped("duplicate")
                if isinstance(found, str):
                    raise Skipped(found)
                for record in _read_documents(path, kind, source.text_field or self.text_field, self.limits,
                                              skipped_records, found):
                    count += 1
                    yield record
            except Skipped as e:  # before its first document; after it, the file changed while being read
                if count:
                    skipped_records["file_changed_while_reading"] += 1
                else:
                    skipped[e.args[0]] += 1
                    skipped_files.append({"source": index, "path": relative, "reason": e.args[0]})
                    log.info("skipping %s: %s", path, e.args[0])
                    continue
            if not count:
                skipped["empty"] += 1
                skipped_files.append({"source": index, "path": relative, "reason": "empty"})
                continue
            seen.add(sha256)
            files.append({"source": index, "path": relative, "bytes": size, "sha256": sha256,
                          "licence": source.licence, "documents": count,
                          "format": document_format(path.name) if kind == "document" else kind})
            self.manifest["documents"] += count
            self.manifest["bytes"] += size
        bar.close()
        self._finish_pass(skipped, skipped_records, skipped_files, files)

    def _start_pass(self) -> tuple[Counter, Counter, list, list]:
        """A fresh manifest; (skipped, skipped_records, skipped_files, files), which it holds, to fill."""
        skipped, skipped_records = Counter(self.listing_skipped), Counter()
        skipped_files, files = list(self.listing_skipped_files), []
        self.manifest.clear()
        self.manifest.update(
            sources=self.source_manifest(), text_field=self.text_field,
            limits={"max_file_bytes": self.limits.max_file_bytes, "max_document_bytes": self.limits.max_document_bytes,
                    "follow_links": self.limits.follow_links},
            files=files, documents=0, bytes=0, skipped=skipped, skipped_records=skipped_records,
            skipped_files=skipped_files,
        )
        return skipped, skipped_records, skipped_files, files

    def _finish_pass(self, skipped: Counter, skipped_records: Counter, skipped_files: list, files: list) -> None:
        # Plain dicts from here on, so that the manifest is JSON-able as it is; the list of skipped files is
        # kept to MAX_LISTED entries, so that a folder of a million unsupported files keeps a small manifest.
        self.manifest["skipped"], self.manifest["skipped_records"] = dict(skipped), dict(skipped_records)
        if len(skipped_files) > MAX_LISTED:
            self.manifest["skipped_files_not_listed"] = len(skipped_files) - MAX_LISTED
            del skipped_files[MAX_LISTED:]
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
                line += f"; {label}: " + _counts(counts)
        return line


def _counts(counts: dict) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))


def iter_documents(sources, text_field: str = "text", limits: ReadLimits | None = None) -> tuple[Iterator[str], dict]:
    """(documents, manifest): one pass over the corpus; the manifest dict is complete once it is exhausted."""
    corpus = Corpus(sources, text_field, limits)
    return iter(corpus), corpus.manifest


# ------------------------------------------------------------------------------------- reading files


def _check_named_file(path: Path, limits: ReadLimits) -> None:
    """A file named as a source must be regular, and its first block must look like text (or be Parquet),
    so that `--data report.pdf` is refused before a run creates anything."""
    kind = _format(path) or "text"
    if kind == "document":  # a binary container: the one way to know it holds text is to extract it
        next(iter(extract_file(path, limits)))
        return
    with open_regular(path) as raw:
        try:
            head = (gzip.GzipFile(fileobj=raw) if _gzipped(path) else raw).read(64 << 10)
        except (OSError, EOFError, zlib.error):
            raise Skipped("corrupt") from None
    if kind != "parquet" and b"\x00" in head:
        raise Skipped("binary")


def _gzipped(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def scan_file(path: Path, kind: str, limits: ReadLimits) -> tuple[int, str]:
    """(bytes on disk, sha256 of them) after one streamed pass that checks the caps and, for text formats,
    that the content is UTF-8 without NUL bytes; raises Skipped with the first problem found. Memory stays
    at a few blocks whatever the file or its compression ratio."""
    hasher, size = hashlib.sha256(), 0
    decoder = codecs.getincrementaldecoder("utf-8")()

    def blocks(raw) -> Iterator[bytes]:
        nonlocal size
        for block in chunks(raw):
            hasher.update(block)
            size += len(block)
            yield block

    with open_regular(path) as raw:
        if os.fstat(raw.fileno()).st_size > limits.max_file_bytes:
            raise Skipped("file_too_large")
        total = 0
        try:
            text_format = kind not in ("parquet", "document")
            for data in (inflated(blocks(raw)) if _gzipped(path) else blocks(raw)):
                total += len(data)
                if total > limits.max_file_bytes:
                    raise Skipped("file_too_large")
                if kind == "text" and total > limits.max_document_bytes:
                    raise Skipped("document_too_large")
                if text_format:
                    _check_text_block(data, decoder)
            if text_format:
                decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise Skipped("not_utf8") from None
    return size, hasher.hexdigest()


def _check_text_block(data: bytes, decoder) -> None:
    if b"\x00" in data:  # text never holds NUL; images, archives, UTF-16 and executables do
        raise Skipped("binary")
    decoder.decode(data)


def _open_content(path: Path, raw):
    return gzip.GzipFile(fileobj=raw) if _gzipped(path) else raw


def _extract_job(job: tuple[Path, ReadLimits]) -> list[tuple[str, str]] | str:
    """[(format, text)] of a document file, or the reason it is skipped: what an extraction worker does."""
    path, limits = job
    try:
        return [(fmt, text) for _, fmt, text in extract_file(path, limits)]
    except Skipped as e:
        return e.args[0]


def _read_documents(path: Path, kind: str, field: str, limits: ReadLimits, skipped_records: Counter,
                    extracted: list | None = None) -> Iterator[tuple[str, str]]:
    """(format, text) of the documents of a file that `scan_file` accepted; `extracted`: what _extract_job
    gave for a document file. Record-level problems are counted, not fatal."""
    if kind == "parquet":
        yield from (("parquet", t) for t in _parquet_documents(path, field, limits, skipped_records))
        return
    if kind == "document":
        extracted = extracted if extracted is not None else _extract_job((path, limits))
        if isinstance(extracted, str):
            raise Skipped(extracted)
        for fmt, text in extracted:
            yield from ((fmt, t) for t in _texts([text], limits, skipped_records))
        return
    with open_regular(path) as raw, _open_content(path, raw) as content:
        try:
            if kind == "text":
                text = content.read(limits.max_document_bytes + 1).decode("utf-8-sig")
                if text.strip():
                    yield "text", text
                return
            values = _jsonl_values(content, field, limits, skipped_records)
            yield from (("jsonl", t) for t in _texts(values, limits, skipped_records))
        except (OSError, EOFError, zlib.error, UnicodeDecodeError):
            raise Skipped("corrupt") from None  # the file changed since it was scanned


def _jsonl_values(content, field: str, limits: ReadLimits, skipped_records: Counter) -> Iterator:
    """The `field` value of each JSONL line, read one bounded line at a time (b"\\n" ends a line, not
    U+2028, which may sit unescaped inside a JSON string)."""
    first = True
    while line := content.readline(limits.max_document_bytes + 1):
        if len(line) > limits.max_document_bytes:
            while line and not line.endswith(b"\n"):  # drop the rest of the over-long line unread into memory
                line = content.readline(BLOCK)
            skipped_records["document_too_large"] += 1
            continue
        if first and line.startswith(_BOM):
            line = line[len(_BOM):]
        first = False
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (json.JSONDecodeError, RecursionError):  # RecursionError: a line nested thousands deep
            skipped_records["bad_json"] += 1
            continue
        yield record.get(field) if isinstance(record, dict) else None


def _parquet_documents(path: Path, field: str, limits: ReadLimits, skipped_records: Counter) -> Iterator[str]:
    """The `field` values of a Parquet file, row group by row group (a .parquet.gz is first inflated into a
    temporary file, within the file cap)."""
    import pyarrow
    import pyarrow.parquet

    with tempfile.TemporaryFile() as inflated, open_regular(path) as raw:
        source = raw
        if _gzipped(path):
            with gzip.GzipFile(fileobj=raw) as content:
                for block in chunks(content):
                    inflated.write(block)
            inflated.seek(0)
            source = inflated
        try:
            table = pyarrow.parquet.ParquetFile(source)
            if field not in table.schema_arrow.names:
                raise Skipped("no_text_field")
            values = [v for batch in table.iter_batches(columns=[field]) for v in batch.column(0).to_pylist()]
        except (pyarrow.ArrowException, OSError, EOFError, zlib.error):
            raise Skipped("corrupt") from None
    yield from _texts(values, limits, skipped_records)


def _texts(values: Iterable, limits: ReadLimits, skipped_records: Counter) -> Iterator[str]:
    """The non-empty strings among a file's record values, within the document cap; the others are
    counted by reason."""
    for value in values:
        if not isinstance(value, str):
            skipped_records["no_text_field"] += 1
        elif not value.strip():
            skipped_records["empty"] += 1
        elif len(value) > limits.max_document_bytes // 4 and len(value.encode("utf-8", "surrogatepass")) > limits.max_document_bytes:
            skipped_records["document_too_large"] += 1
        else:
            yield value
