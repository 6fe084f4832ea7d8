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

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from daulat.data.corpus import ReadLimits, Skipped, parse_source, published_name, selected, walk_folder
from daulat.errors import DaulatError


@dataclass
class PipelineOptions:
    min_chars: int = 20  # shorter documents (after cleaning) are dropped
    languages: frozenset[str] | None = None  # ISO 639-1 codes of the documents to keep (None: all; code is kept)
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
            if not selected(relative, options.include, options.exclude):
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


def prepare(text: str, fmt: str, options: PipelineOptions) -> tuple[str, str, Counter] | str:
    """The steps that need no state across documents: (clean text, language, PII counts), or the reason
    the document is dropped ('too_short', 'language'). Run in the worker processes."""
    from daulat.data.clean import clean_text
    from daulat.data.language import detect_language
    from daulat.data.pii import scrub

    text = clean_text(text, options.min_chars)
    if text is None:
        return "too_short"
    language = detect_language(text) if fmt != "code" else "code"
    if options.languages is not None and fmt != "code" and language not in options.languages:  # code is kept
        return "language"
    found: Counter = Counter()
    if options.pii and (fmt != "code" or options.pii_code):
        text, found = scrub(text)
    return text, language, found


class DocumentPipeline:
    """The steps of one pass with their state (seen hashes, MinHash signatures) and counts; run in order,
    in the main process, so that which copy of a duplicate is kept does not depend on the workers."""

    def __init__(self, options: PipelineOptions):
        from daulat.data.dedup import NearDuplicates

        self.options = options
        self.near = NearDuplicates(options.near_duplicate_threshold) if options.near_duplicate_threshold > 0 else None
        self.seen_texts: set[bytes] = set()  # sha256 digests of kept texts: 32 bytes a document, never the text
        self.dropped, self.pii, self.languages, self.formats = Counter(), Counter(), Counter(), Counter()

    def keep(self, prepared: tuple[str, str, Counter] | str, fmt: str) -> tuple[str, str] | None:
        """(text, language) of a document `prepare` gave, or None when it is dropped (reason counted)."""
        if isinstance(prepared, str):
            self.dropped[prepared] += 1
            return None
        text, language, found = prepared
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
        if digest in self.seen_texts:
            self.dropped["exact_duplicate"] += 1
            return None
        if self.near is not None and self.near.is_duplicate(text):
            self.dropped["near_duplicate"] += 1
            return None
        self.seen_texts.add(digest)
        self.pii.update(found)
        self.languages[language] += 1
        self.formats[fmt] += 1
        return text, language

    def process(self, text: str, fmt: str) -> tuple[str, str] | None:
        """prepare then keep, in this process."""
        return self.keep(prepare(text, fmt, self.options), fmt)

    def counts(self) -> dict:
        return {"dropped": dict(self.dropped), "pii": dict(self.pii), "languages": dict(self.languages),
                "formats": dict(self.formats)}


def _file_job(job: tuple[Path, PipelineOptions]) -> tuple[str, str | list]:
    """('skipped', reason) or (sha256, [(member, format, prepared)]) for one file: what a worker does.
    Memory: one file's bytes (within the caps) and its documents, never more than one file at a time."""
    from daulat.data.documents import extract_file

    path, options = job
    try:
        sha256 = _file_sha256(path)
        documents = [(member, fmt, prepare(text, fmt, options)) for member, fmt, text in extract_file(path, options.limits)]
    except Skipped as e:
        return "skipped", e.args[0]
    except OSError:
        return "skipped", "unreadable"
    return sha256, documents


def run_pipeline(specs, options: PipelineOptions, workers: int | None = None,
                 show_progress: bool | None = None) -> tuple[Iterator[dict], dict]:
    """(records, summary): one pass over the files; the summary is complete once records are exhausted.

    Files are extracted, cleaned, language-tagged and scrubbed by `workers` processes (see worker_count),
    a bounded window of files at a time; duplicates are removed here, in file order, so the output is the
    same for any number of workers."""
    from daulat.data.reading import ordered_map, progress, worker_count

    summary = {"files": 0, "documents": 0, "bytes": 0, "skipped": Counter(), "skipped_files": []}
    files = list_files(specs, options, summary)
    if not files:
        raise DaulatError(f"no files to read in {', '.join(map(str, specs))} ({dict(summary['skipped']) or 'none found'})")
    steps = DocumentPipeline(options)

    def records() -> Iterator[dict]:
        seen_files: set[str] = set()
        results = ordered_map(_file_job, ((path, options) for _, _, path in files), worker_count(workers, len(files)))
        with progress(len(files), show_progress) as bar:
            for (source, shown, _), (sha256, documents) in zip(files, results):
                bar.update()
                if sha256 == "skipped" or sha256 in seen_files:
                    reason = documents if sha256 == "skipped" else "duplicate"
                    summary["skipped"][reason] += 1
                    summary["skipped_files"].append({"path": shown, "reason": reason})
                    continue
                seen_files.add(sha256)
                summary["files"] += 1
                for member, fmt, prepared in documents:
                    kept = steps.keep(prepared, fmt)
                    if kept is None:
                        continue
                    summary["documents"] += 1
                    summary["bytes"] += len(kept[0].encode("utf-8", "surrogatepass"))
                    yield {"text": kept[0], "source": shown + (f"!{member}" if member else ""), "sha256": sha256,
                           "language": kept[1], "licence": source.licence, "format": fmt}
        summary.update(skipped=dict(summary["skipped"]), **steps.counts())

    return records(), summary


class CleanCorpus:
    """A Corpus whose documents pass the pipeline's steps (clean, language, PII, exact and near duplicates):
    what `pretrain`, `tokenizer` and `speedrun --data` train on. Iterating gives the kept texts; the
    corpus's manifest gains `pipeline` (documents and bytes kept, languages, formats, dropped documents by
    reason, duplicates included, PII replaced by type, the settings) once a pass has finished."""

    def __init__(self, corpus, options: PipelineOptions):
        for module in ("ftfy", "lingua", "datasketch"):
            try:
                __import__(module)
            except ImportError:
                raise DaulatError(f"cleaning the data needs the documents extra ({module} is missing): "
                                  "pip install 'daulat[documents]', or set data.clean=false to train on the text as it is") from None
        self.corpus, self.options = corpus, options
        self.manifest = corpus.manifest

    def source_manifest(self) -> list[dict]:
        return self.corpus.source_manifest()

    def __iter__(self) -> Iterator[str]:
        steps, kept, size = DocumentPipeline(self.options), 0, 0
        for fmt, text in self.corpus.records():
            result = steps.process(text, fmt)
            if result is not None:
                kept, size = kept + 1, size + len(result[0].encode("utf-8", "surrogatepass"))
                yield result[0]
        o = self.options
        self.manifest["pipeline"] = {
            "documents": kept, "bytes": size, **steps.counts(),
            "settings": {"min_chars": o.min_chars, "languages": sorted(o.languages) if o.languages else None,
                         "pii": o.pii, "pii_code": o.pii_code, "near_duplicate_threshold": o.near_duplicate_threshold},
        }
        if not kept:
            raise DaulatError(f"no documents left after cleaning ({json.dumps(steps.counts()['dropped'])})")

    def summary(self) -> str:
        line = self.corpus.summary()
        kept = self.manifest.get("pipeline")
        if kept:
            dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(kept["dropped"].items()))
            line += f"; kept {kept['documents']} documents after cleaning" + (f" (dropped: {dropped})" if dropped else "")
        return line


def parse_languages(value) -> frozenset[str] | None:
    """'id,en' or ['id', 'en'] -> frozenset of ISO 639-1 codes; empty or None -> None (all languages)."""
    if isinstance(value, str):
        value = value.split(",")
    codes = frozenset(c.strip().lower() for c in value or () if c.strip())
    return codes or None


def training_corpus(data, settings):
    """The corpus a training command reads from `data`: a Corpus, through CleanCorpus unless
    settings.clean is false. settings: pretrain's DataConfig, or anything with its field names."""
    from daulat.data.corpus import Corpus

    limits = ReadLimits(settings.max_file_bytes, settings.max_document_bytes, settings.follow_links)
    corpus = Corpus(data, text_field=settings.text_field, limits=limits, include=tuple(settings.include or ()),
                    exclude=tuple(settings.exclude or ()))
    if not settings.clean:
        return corpus
    return CleanCorpus(corpus, PipelineOptions(languages=parse_languages(settings.languages), pii=settings.pii,
                                               near_duplicate_threshold=settings.near_duplicates, limits=limits))


def add_selection_arguments(parser) -> None:
    """--languages, --include, --exclude of the training commands (dest: their config key's name)."""
    parser.add_argument("--languages", type=lambda v: sorted(parse_languages(v) or ()), metavar="CODES",
                        help="keep only documents in these languages, ISO 639-1, e.g. id,en (data.languages)")
    parser.add_argument("--include", action="append", metavar="GLOB", help="read only matching paths in data folders (data.include; repeatable)")
    parser.add_argument("--exclude", action="append", metavar="GLOB", help="skip matching paths in data folders (data.exclude; repeatable)")


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
    parser.add_argument("--workers", type=int, metavar="N",
                        help="extraction processes (0: none; default: one per core, at most 8, for 64 files or more)")
    parser.add_argument("--progress", action="store_true", help="show a progress bar even when stderr is not a terminal")


def run(args) -> int:
    if not args.out and not args.dry_run:
        raise DaulatError("--out FILE.jsonl is required (or --dry-run to only see what would be read)")
    languages = parse_languages(args.languages)
    options = PipelineOptions(min_chars=args.min_chars, languages=languages, pii=not args.no_pii, pii_code=args.pii_code,
                              near_duplicate_threshold=args.near_duplicates, include=tuple(args.include),
                              exclude=tuple(args.exclude), limits=ReadLimits(follow_links=args.follow_links))
    records, summary = run_pipeline(args.data, options, workers=args.workers, show_progress=args.progress or None)
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
