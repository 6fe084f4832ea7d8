"""`daulat corpus DATA... --out docs.jsonl`: a company's documents become clean, deduplicated, PII-scrubbed
text with language and provenance per document (needs the `documents` extra).

    daulat corpus ~/shared-drive:licence=internal mail.mbox --out runs/docs.jsonl --languages id,en
    daulat pretrain --data runs/docs.jsonl --out runs/pt          # the output is a corpus like any other

For each file (walked as the corpus reader walks: streamed within the caps, regular files only, links kept
inside each root, see daulat.data.corpus), in order:

    extract (daulat.data.documents) -> clean (ftfy, whitespace, control characters, --min-chars)
      -> language (lingua; --languages keeps only those) -> PII scrub (e-mail, phone, IBAN, card; code
      files only with --pii-code) -> exact and near duplicates (sha256, MinHash LSH) -> one JSON line

Each line: `text`, `source` (the source's published name and the path inside it, `!member` for archive
members), `sha256` of the file, `language`, `licence`, `format`. Beside the output, `OUT.manifest.json`
holds the summary (documents, bytes, languages, formats, skipped files by reason, dropped documents by
reason, PII replaced by type: counts, never values) and every skipped file with its reason. Paths in both
are relative to each source's root.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from daulat.data.corpus import ReadLimits, Skipped, parse_source, published_name, walk_folder
from daulat.errors import DaulatError


@dataclass
class PipelineOptions:
    min_chars: int = 20  # shorter documents (after cleaning) are dropped
    languages: frozenset[str] | None = None  # ISO 639-1 codes to keep (None: all)
    pii: bool = True  # scrub PII from documents
    pii_code: bool = False  # and from source code and config files
    near_duplicate_threshold: float = 0.8  # estimated Jaccard similarity; 0 turns near-dup removal off
    include: tuple[str, ...] = ()  # globs on the path inside a source; when given, only matching files
    exclude: tuple[str, ...] = ()
    limits: ReadLimits = field(default_factory=ReadLimits)


def list_files(specs, options: PipelineOptions, summary: dict) -> list[tuple]:
    """(source, shown path, path) for every file to read, in order; skips counted in `summary`."""
    from daulat.data.documents import document_format

    files = []
    for spec in specs:
        source = parse_source(spec)
        root = Path(source.path)
        if not os.path.lexists(root):
            raise DaulatError(f"data path not found: {source.path} (it does not exist)")
        name = published_name(source.path)
        if not root.is_dir():
            files.append((source, name, root))
            continue
        listing, listed = Counter(), []
        for parts, path in walk_folder(root, options.limits.follow_links, listing,
                                       accept=lambda n: document_format(n) is not None, listed=listed):
            relative = "/".join(parts)
            if (options.include and not any(fnmatch.fnmatch(relative, g) for g in options.include)) \
                    or any(fnmatch.fnmatch(relative, g) for g in options.exclude):
                listing["excluded"] += 1
                continue
            files.append((source, f"{name}/{relative}", path))
        summary["skipped"].update(listing)
        summary["skipped_files"] += [{"path": f"{name}/{path}", "reason": reason} for path, reason in listed]
    return files


def _file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            hasher.update(block)
    return hasher.hexdigest()


class DocumentPipeline:
    """The steps after extraction, with their state (seen hashes, MinHash index) and counts."""

    def __init__(self, options: PipelineOptions):
        from daulat.data.dedup import NearDuplicates

        self.options = options
        self.near = NearDuplicates(options.near_duplicate_threshold) if options.near_duplicate_threshold > 0 else None
        self.seen_texts: set[str] = set()
        self.dropped, self.pii, self.languages, self.formats = Counter(), Counter(), Counter(), Counter()

    def process(self, text: str, fmt: str) -> tuple[str, str] | None:
        """(clean text, language) of a kept document, or None (the reason counted in `dropped`)."""
        from daulat.data.clean import clean_text
        from daulat.data.language import detect_language
        from daulat.data.pii import scrub

        text = clean_text(text, self.options.min_chars)
        if text is None:
            self.dropped["too_short"] += 1
            return None
        language = detect_language(text) if fmt != "code" else "code"
        if self.options.languages is not None and language not in self.options.languages:
            self.dropped["language"] += 1
            return None
        if self.options.pii and (fmt != "code" or self.options.pii_code):
            text, found = scrub(text)
            self.pii.update(found)
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        if digest in self.seen_texts:
            self.dropped["exact_duplicate"] += 1
            return None
        if self.near is not None and self.near.is_duplicate(text):
            self.dropped["near_duplicate"] += 1
            return None
        self.seen_texts.add(digest)
        self.languages[language] += 1
        self.formats[fmt] += 1
        return text, language


def run_pipeline(specs, options: PipelineOptions) -> tuple[Iterator[dict], dict]:
    """(records, summary): one pass over the files; the summary is complete once records are exhausted."""
    summary = {"files": 0, "documents": 0, "bytes": 0, "skipped": Counter(), "skipped_files": []}
    files = list_files(specs, options, summary)
    if not files:
        raise DaulatError(f"no files to read in {', '.join(map(str, specs))} ({dict(summary['skipped']) or 'none found'})")
    steps = DocumentPipeline(options)

    def records() -> Iterator[dict]:
        from daulat.data.documents import extract_file

        seen_files: set[str] = set()
        for source, shown, path in files:
            try:
                sha256 = _file_sha256(path)
                if sha256 in seen_files:
                    raise Skipped("duplicate")
                documents = list(extract_file(path, options.limits))
            except (Skipped, OSError) as e:
                reason = e.args[0] if isinstance(e, Skipped) else "unreadable"
                summary["skipped"][reason] += 1
                summary["skipped_files"].append({"path": shown, "reason": reason})
                continue
            seen_files.add(sha256)
            summary["files"] += 1
            for member, fmt, text in documents:
                kept = steps.process(text, fmt)
                if kept is None:
                    continue
                summary["documents"] += 1
                summary["bytes"] += len(kept[0].encode("utf-8", "surrogatepass"))
                yield {"text": kept[0], "source": shown + (f"!{member}" if member else ""), "sha256": sha256,
                       "language": kept[1], "licence": source.licence, "format": fmt}
        summary.update(skipped=dict(summary["skipped"]), dropped=dict(steps.dropped), pii=dict(steps.pii),
                       languages=dict(steps.languages), formats=dict(steps.formats))

    return records(), summary


def summary_table(summary: dict) -> str:
    """The summary as a few aligned lines for the terminal."""
    rows = [("files read", summary["files"]), ("documents kept", summary["documents"]), ("bytes of text", summary["bytes"])]
    for label, key in (("languages", "languages"), ("formats", "formats"), ("skipped files", "skipped"),
                       ("dropped documents", "dropped"), ("PII replaced", "pii")):
        counts = summary.get(key) or {}
        rows.append((label, ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"))
    return "\n".join(f"{label:<18} {value}" for label, value in rows)


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument("data", nargs="+", metavar="PATH", help="files or folders; PATH:licence=ID records a licence")
    parser.add_argument("--out", help="JSONL file to write (required unless --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="read everything, write nothing, list every skipped file")
    parser.add_argument("--languages", help="comma-separated ISO 639-1 codes to keep, e.g. id,en (default: all)")
    parser.add_argument("--min-chars", type=int, default=20, help="drop documents shorter than this after cleaning (default: %(default)s)")
    parser.add_argument("--no-pii", action="store_true", help="keep e-mail addresses, phone numbers, IBANs and card numbers")
    parser.add_argument("--pii-code", action="store_true", help="scrub PII from source code and config files too")
    parser.add_argument("--near-duplicates", type=float, default=0.8, metavar="JACCARD",
                        help="drop documents at least this similar to an earlier one; 0: keep them (default: %(default)s)")
    parser.add_argument("--include", action="append", default=[], metavar="GLOB", help="read only matching paths (repeatable)")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip matching paths (repeatable)")
    parser.add_argument("--follow-links", action="store_true", help="follow symbolic links that leave a data folder")


def run(args) -> int:
    if not args.out and not args.dry_run:
        raise DaulatError("--out FILE.jsonl is required (or --dry-run to only see what would be read)")
    languages = frozenset(c.strip().lower() for c in args.languages.split(",") if c.strip()) if args.languages else None
    options = PipelineOptions(min_chars=args.min_chars, languages=languages, pii=not args.no_pii, pii_code=args.pii_code,
                              near_duplicate_threshold=args.near_duplicates, include=tuple(args.include),
                              exclude=tuple(args.exclude), limits=ReadLimits(follow_links=args.follow_links))
    records, summary = run_pipeline(args.data, options)
    if args.dry_run:
        for _ in records:
            pass
        for entry in summary["skipped_files"]:
            print(f"skipped {entry['path']}: {entry['reason']}")
    else:
        _write_jsonl(Path(args.out), records, summary)
    print(summary_table(summary))
    return 0


def _write_jsonl(out: Path, records: Iterator[dict], summary: dict) -> None:
    """OUT and OUT.manifest.json, each written under a temporary name and renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as file:
            for record in records:
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
        if not summary["documents"]:
            raise DaulatError(f"no documents kept: {json.dumps({k: summary[k] for k in ('skipped', 'dropped')})}")
        manifest = out.with_name(out.name + ".manifest.json")
        manifest_tmp = manifest.with_name(f".{manifest.name}.tmp-{os.getpid()}")
        manifest_tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(manifest_tmp, manifest)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
