"""Text out of the files a company's folders hold: PDF, Office, OpenDocument, EPUB, HTML, e-mail, RTF, code.

    for name, fmt, text in extract_file(Path("report.pdf"), limits): ...   # one (name, format, text) per document

Each format goes through a well-kept library of its field (the `documents` extra: pypdf, python-docx,
python-pptx, openpyxl, odfpy, ebooklib, trafilatura, striprtf) or the standard library (csv, email, mailbox,
zipfile, tarfile). Inside `.gz`, `.zip` and `.tar` (`.tgz`, `.tar.gz`) archives every member is read by its
own suffix. A file whose extractor fails, or that has no text (a scanned PDF without a text layer), raises
`Skipped` with the reason, which the caller counts; nothing here is fatal for the run.

Memory: a file (or archive member) is read within `ReadLimits.max_file_bytes`, decompressed included; the
extracted text of one document is cut off at nothing, but skipped above `max_document_bytes`.
"""

from __future__ import annotations

import csv
import email
import email.policy
import io
import mailbox
import os
import re
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

from daulat.data.reading import ReadLimits, Skipped, inflated, open_regular

CODE_SUFFIXES = (".py .js .ts .tsx .jsx .java .c .h .cc .cpp .hpp .cs .go .rs .rb .php .swift .kt .scala .sh .bash "
                 ".sql .r .m .lua .pl .yaml .yml .toml .ini .cfg .xml .json .css .scss .tex .rst .org").split()
DOCUMENT_FORMATS = {
    ".txt": "text", ".md": "text", ".jsonl": "text", ".pdf": "pdf", ".docx": "docx", ".pptx": "pptx",
    ".xlsx": "xlsx", ".csv": "csv", ".tsv": "csv", ".odt": "odf", ".ods": "odf", ".odp": "odf", ".epub": "epub",
    ".html": "html", ".htm": "html", ".xhtml": "html", ".eml": "eml", ".mbox": "mbox", ".rtf": "rtf",
    **{suffix: "code" for suffix in CODE_SUFFIXES},
}
ARCHIVES = (".zip", ".tar", ".tgz", ".tar.gz")
MAX_MEMBERS = 100_000  # an archive of more members is not a document collection but a bomb


def document_format(name: str) -> str | None:
    """The format of a file name ('pdf', 'docx', ..., 'archive'), looking through .gz; None: not read."""
    lower = name.lower()
    if lower.endswith(ARCHIVES):
        return "archive"
    lower = lower[:-3] if lower.endswith(".gz") else lower
    suffix = os.path.splitext(lower)[1]
    if not suffix:  # README, copyright, changelog, LICENSE: text by convention; a binary one is caught by content
        return "text"
    return DOCUMENT_FORMATS.get(suffix)


def read_capped(path: Path, limits: ReadLimits) -> bytes:
    """The bytes of a regular file (decompressed if .gz, but not .tar.gz), within max_file_bytes."""
    with open_regular(path) as raw:
        if os.fstat(raw.fileno()).st_size > limits.max_file_bytes:
            raise Skipped("file_too_large")
        blocks = iter(lambda: raw.read(1 << 20), b"")
        if path.name.lower().endswith(".gz") and not path.name.lower().endswith(".tar.gz"):
            blocks = inflated(blocks)
        out, total = [], 0
        for block in blocks:
            total += len(block)
            if total > limits.max_file_bytes:
                raise Skipped("file_too_large")
            out.append(block)
    return b"".join(out)


def extract_file(path: Path, limits: ReadLimits) -> Iterator[tuple[str, str, str]]:
    """(name inside the file, format, text) for each document of a file: one for most formats, one per
    message of an mbox, one per member of an archive. Raises Skipped when the file gives nothing."""
    fmt = document_format(path.name)
    if fmt is None:
        raise Skipped("unsupported")
    data = read_capped(path, limits)
    if fmt == "archive":
        yield from _archive_documents(path.name, data, limits)
        return
    for text in extract_bytes(data, fmt):
        yield "", fmt, text


def _archive_documents(name: str, data: bytes, limits: ReadLimits) -> Iterator[tuple[str, str, str]]:
    members = list(_archive_members(name, data, limits))
    found = False
    for member, blob in members:
        fmt = document_format(member)
        if fmt in (None, "archive"):
            continue  # archives inside archives are not opened: a nesting bomb stops here
        try:
            texts = list(extract_bytes(blob, fmt))
        except Skipped:
            continue
        for text in texts:
            found = True
            yield member, fmt, text
    if not found:
        raise Skipped("empty_archive")


def _archive_members(name: str, data: bytes, limits: ReadLimits) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of the regular-file members of a zip or tar, within the caps."""
    total = 0
    try:
        if name.lower().endswith(".zip"):
            archive = zipfile.ZipFile(io.BytesIO(data))
            infos = [i for i in archive.infolist() if not i.is_dir()][:MAX_MEMBERS]
            for info in infos:
                total += info.file_size
                if total > limits.max_file_bytes:
                    raise Skipped("file_too_large")
                yield info.filename, archive.read(info)
            return
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
            for member in archive:  # regular files only: links and devices inside a tar are never followed
                if member.isfile():
                    total += member.size
                    if total > limits.max_file_bytes:
                        raise Skipped("file_too_large")
                    yield member.name, archive.extractfile(member).read()
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, ValueError):
        raise Skipped("corrupt") from None


def extract_bytes(data: bytes, fmt: str) -> list[str]:
    """The texts of one file's bytes in format `fmt`; Skipped when there is none or the extractor fails."""
    extractor = _EXTRACTORS[fmt]
    try:
        texts = [t for t in extractor(data) if t and t.strip()]
    except Skipped:
        raise
    except ImportError as e:
        raise Skipped(f"needs_documents_extra ({e.name})") from None
    except Exception:  # each library raises its own types for a damaged file; one bad file never stops a run
        raise Skipped(f"extractor_failed ({fmt})") from None
    if not texts:
        raise Skipped("no_text_layer" if fmt == "pdf" else "empty")
    return texts


def _decode(data: bytes) -> str:
    if b"\x00" in data[: 1 << 16]:
        raise Skipped("binary")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Skipped("not_utf8") from None


def _pdf(data: bytes) -> list[str]:
    import pypdf

    reader = pypdf.PdfReader(io.BytesIO(data))
    return ["\n\n".join(page.extract_text() or "" for page in reader.pages)]


def _docx(data: bytes) -> list[str]:
    import docx

    document = docx.Document(io.BytesIO(data))
    parts = [p.text for p in document.paragraphs]
    for table in document.tables:
        parts += ["\t".join(cell.text for cell in row.cells) for row in table.rows]
    return ["\n".join(parts)]


def _pptx(data: bytes) -> list[str]:
    import pptx

    slides = []
    for slide in pptx.Presentation(io.BytesIO(data)).slides:
        slides.append("\n".join(shape.text_frame.text for shape in slide.shapes if shape.has_text_frame))
    return ["\n\n".join(slides)]


def _xlsx(data: bytes) -> list[str]:
    import openpyxl

    book = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    sheets = []
    for sheet in book.worksheets:
        rows = ("\t".join("" if v is None else str(v) for v in row) for row in sheet.iter_rows(values_only=True))
        sheets.append("\n".join(r for r in rows if r.strip()))
    return ["\n\n".join(sheets)]


def _csv(data: bytes) -> list[str]:
    text = _decode(data)
    dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t|") if text.strip() else csv.excel
    return ["\n".join("\t".join(row) for row in csv.reader(io.StringIO(text), dialect))]


def _odf(data: bytes) -> list[str]:
    from odf import opendocument, teletype
    from odf import text as odf_text

    document = opendocument.load(io.BytesIO(data))
    elements = document.getElementsByType(odf_text.H) + document.getElementsByType(odf_text.P)
    return ["\n".join(teletype.extractText(e) for e in elements)]


_XML_DECLARATION = re.compile(r"^\s*<\?xml[^>]*\?>")


def html_main_text(html: str) -> str:
    """The main content of an HTML page, without navigation, scripts, styles, headers and footers.

    Those elements are removed first (lxml), so that they cannot come back on a page too small for
    trafilatura's boilerplate heuristics; trafilatura then keeps the main content (its text, or for a
    page it finds nothing in, the cleaned body's text)."""
    import lxml.etree
    import lxml.html
    import trafilatura

    html = _XML_DECLARATION.sub("", html, count=1)  # lxml refuses a str that declares its own encoding
    if not html.strip():
        return ""
    tree = lxml.html.fromstring(html)
    for element in tree.xpath("//script|//style|//nav|//header|//footer|//aside|//noscript|//form|//template"):
        element.drop_tree()
    cleaned = lxml.etree.tostring(tree, encoding="unicode", method="html")
    text = trafilatura.extract(cleaned, include_comments=False, include_tables=True, favor_recall=True)
    if text:
        return text
    return "\n".join(line.strip() for line in tree.text_content().splitlines() if line.strip())


def _html(data: bytes) -> list[str]:
    return [html_main_text(_decode(data))]


def _epub(data: bytes) -> list[str]:
    import ebooklib
    from ebooklib import epub

    with tempfile.NamedTemporaryFile(suffix=".epub") as file:  # ebooklib reads from a path
        file.write(data)
        file.flush()
        book = epub.read_epub(file.name, options={"ignore_ncx": True})
    chapters = [html_main_text(item.get_content().decode("utf-8", "replace"))
                for item in book.get_items_of_type(ebooklib.ITEM_DOCUMENT)]
    return ["\n\n".join(c for c in chapters if c)]


def _message_text(message) -> str:
    """Subject and body of an e-mail: its text/plain part, else its HTML part as text."""
    body = message.get_body(preferencelist=("plain", "html"))
    content = body.get_content() if body is not None else ""
    if body is not None and body.get_content_type() == "text/html":
        content = html_main_text(content)
    subject = message.get("subject", "")
    return f"{subject}\n\n{content}" if subject else content


def _eml(data: bytes) -> list[str]:
    return [_message_text(email.message_from_bytes(data, policy=email.policy.default))]


def _mbox(data: bytes) -> list[str]:
    with tempfile.NamedTemporaryFile(suffix=".mbox") as file:  # mailbox reads from a path
        file.write(data)
        file.flush()
        box = mailbox.mbox(file.name, factory=lambda f: email.message_from_binary_file(f, policy=email.policy.default))
        return [_message_text(message) for message in box]


def _rtf(data: bytes) -> list[str]:
    from striprtf.striprtf import rtf_to_text

    return [rtf_to_text(data.decode("latin-1"))]  # RTF is 7-bit with escapes; latin-1 never fails


_EXTRACTORS = {
    "text": lambda d: [_decode(d)], "code": lambda d: [_decode(d)], "pdf": _pdf, "docx": _docx, "pptx": _pptx,
    "xlsx": _xlsx, "csv": _csv, "odf": _odf, "html": _html, "epub": _epub, "eml": _eml, "mbox": _mbox, "rtf": _rtf,
}
