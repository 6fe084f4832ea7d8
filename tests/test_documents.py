"""The documents pipeline on real files written by the libraries of each format, each holding a known
sentence: the sentence comes out, navigation and scripts do not, PII is replaced, a near-duplicate is
dropped, an Indonesian document is tagged as Indonesian, and the manifest counts all of it."""

import csv
import email.message
import gzip
import io
import json
import mailbox
import tarfile
import zipfile

import pytest

from daulat.cli import main

# One distinct sentence per format (similar ones would rightly be dropped as near-duplicates of each other).
SENTENCES = {
    "pdf": "The annual report shows that revenue in the northern region grew faster than expected.",
    "docx": "Minutes: the board approved the new parental leave policy after a long discussion.",
    "pptx": "Our roadmap slide lists three launches planned for the spring and one for autumn.",
    "xlsx": "Warehouse inventory counts were reconciled against the supplier invoices in March.",
    "csv": "Customer support tickets about delayed parcels doubled during the holiday season.",
    "odt": "The tender letter invites offers for renovating the library roof before winter.",
    "epub": "Chapter one of the employee handbook explains how holidays are requested and approved.",
    "html": "The intranet news item announces that the cafeteria reopens with a vegetarian menu.",
    "eml": "Please review the attached contract draft and send your comments by Friday noon.",
    "mbox": "The archived thread decided to move the weekly standup to Tuesday mornings.",
    "rtf": "This memo reminds every team that badges must be worn visibly inside the building.",
    "code": "Utility that converts exported timesheets into the payroll system's import format.",
    "zip": "A zipped note records that the server room air conditioning was serviced yesterday.",
    "tar": "The packaged readme describes how to install the invoicing tool on a new laptop.",
    "gz": "Compressed meeting notes say the marketing budget will be split between radio and web.",
}
INDONESIAN = ("Rapat anggaran kantor kami diundur karena direktur sedang sakit. Kami belum bisa memutuskan berapa uang "
              "yang dibutuhkan untuk proyek baru tahun depan, jadi tolong kirimkan laporan keuangan sebelum hari Jumat.")
PII = "Write to ana.putri@example.co.id or call +62 812-3456-7890; IBAN DE89 3704 0044 0532 0130 00, card 4111 1111 1111 1111."


def write_pdf(path, text):
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("Helvetica", size=11)
    pdf.multi_cell(0, 8, text)
    pdf.output(str(path))


def write_scanned_pdf(path):
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_page()
    pdf.rect(10, 10, 100, 50, style="F")  # a page with a drawing and no text layer, as a scan has
    pdf.output(str(path))


def write_docx(path, text):
    import docx

    document = docx.Document()
    document.add_heading("Minutes", level=1)
    document.add_paragraph(text)
    document.save(path)


def write_rtf(path, text):
    from PyRTF.Elements import Document, Section
    from PyRTF.Renderer import Renderer

    document, section = Document(), Section()
    document.Sections.append(section)
    section.append("Memo")
    section.append(text)
    with open(path, "w") as f:
        Renderer().Write(document, f)


def write_pptx(path, text):
    import pptx

    deck = pptx.Presentation()
    slide = deck.slides.add_slide(deck.slide_layouts[1])
    slide.shapes.title.text = "Agenda"
    slide.placeholders[1].text = text
    deck.save(path)


def write_xlsx(path, text):
    import openpyxl

    book = openpyxl.Workbook()
    book.active.append(["note", "amount"])
    book.active.append([text, 42])
    book.save(path)


def write_odt(path, text):
    from odf.opendocument import OpenDocumentText
    from odf.text import P

    document = OpenDocumentText()
    document.text.addElement(P(text=text))
    document.save(str(path))


def write_epub(path, text):
    from ebooklib import epub

    book = epub.EpubBook()
    book.set_identifier("id1")
    book.set_title("Handbook")
    book.set_language("en")
    chapter = epub.EpubHtml(title="One", file_name="one.xhtml", lang="en")
    chapter.content = f"<html><body><h1>One</h1><p>{text}</p></body></html>"
    book.add_item(chapter)
    book.toc = [chapter]
    book.spine = ["nav", chapter]
    book.add_item(epub.EpubNcx())
    book.add_item(epub.EpubNav())
    epub.write_epub(str(path), book)


def write_email(text):
    message = email.message.EmailMessage()
    message["Subject"] = "Budget"
    message["From"] = "someone@example.org"
    message.set_content(text)
    return message


HTML = """<!doctype html><html><head><title>Intranet</title><style>body {{ color: red }}</style>
<script>var tracking = "SCRIPT_MARKER";</script></head><body>
<nav><a href="/">Home</a> <a href="/x">NAVIGATION_MARKER</a></nav>
<main><article><h1>News</h1><p>{text}</p><p>{more}</p></article></main>
<footer>FOOTER_MARKER copyright</footer></body></html>"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("company") / "docs"
    root.mkdir()
    s = SENTENCES
    write_pdf(root / "report.pdf", s["pdf"])
    write_scanned_pdf(root / "scan.pdf")
    write_docx(root / "minutes.docx", s["docx"])
    write_pptx(root / "deck.pptx", s["pptx"])
    write_xlsx(root / "sheet.xlsx", s["xlsx"])
    with open(root / "table.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "note"], [1, s["csv"]]])
    write_odt(root / "letter.odt", s["odt"])
    write_epub(root / "book.epub", s["epub"])
    (root / "page.html").write_text(HTML.format(text=s["html"], more="A second paragraph of the main article text."))
    (root / "mail.eml").write_bytes(bytes(write_email(s["eml"])))
    box = mailbox.mbox(root / "archive.mbox")
    box.add(write_email(s["mbox"]))
    box.add(write_email(PII))
    box.close()
    write_rtf(root / "memo.rtf", s["rtf"])
    (root / "tool.py").write_text(f'# {s["code"]}\nprint("contact: dev@example.com")\n')
    with zipfile.ZipFile(root / "bundle.zip", "w") as z:
        z.writestr("inner/note.txt", s["zip"])
    with tarfile.open(root / "bundle.tar.gz", "w:gz") as t:
        data = s["tar"].encode()
        info = tarfile.TarInfo("inner/readme.md")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    (root / "notes.txt.gz").write_bytes(gzip.compress(s["gz"].encode()))
    (root / "indonesian.txt").write_text(INDONESIAN)
    base = "Our travel policy: economy class for flights under six hours, receipts within thirty days, " * 4
    (root / "policy.txt").write_text(base + "Approved by the board.")
    (root / "policy_copy.txt").write_text(base + "Approved by the board!")  # a near-copy
    (root / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    return root


@pytest.fixture(scope="module")
def produced(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "docs.jsonl"
    assert main(["corpus", f"{folder}:licence=internal", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    manifest = json.loads(out.with_name("docs.jsonl.manifest.json").read_text())
    return records, manifest


def test_every_format_gives_its_sentence(produced):
    records, _ = produced
    text = "\n".join(r["text"] for r in records)
    for fmt, sentence in SENTENCES.items():
        assert sentence in text, fmt
    formats = {r["source"].split("/", 1)[1]: r["format"] for r in records}
    assert formats["report.pdf"] == "pdf" and formats["minutes.docx"] == "docx" and formats["bundle.zip!inner/note.txt"] == "text"
    assert all(r["licence"] == "internal" and len(r["sha256"]) == 64 for r in records)
    memo = next(r["text"] for r in records if r["source"].endswith("memo.rtf"))
    assert memo.split("\n")[0] == "Memo" and "Heading" not in memo  # the text, not the stylesheet's names


def test_html_main_content_only(produced):
    records, _ = produced
    page = next(r["text"] for r in records if r["source"] == "docs/page.html")
    assert SENTENCES["html"] in page
    for marker in ("SCRIPT_MARKER", "NAVIGATION_MARKER", "FOOTER_MARKER", "color: red"):
        assert marker not in page


def test_pii_replaced_and_counted(produced):
    records, manifest = produced
    text = "\n".join(r["text"] for r in records)
    assert "ana.putri@example.co.id" not in text and "4111 1111 1111 1111" not in text and "DE89" not in text
    assert "<EMAIL>" in text and "<PHONE>" in text and "<IBAN>" in text and "<CARD_NUMBER>" in text
    assert manifest["pii"] == {"email": 1, "phone": 1, "iban": 1, "card": 1}  # code is not scrubbed by default
    assert "dev@example.com" in text


def test_language_near_duplicates_and_manifest(produced, folder):
    records, manifest = produced
    languages = {r["source"]: r["language"] for r in records}
    assert languages["docs/indonesian.txt"] == "id" and languages["docs/minutes.docx"] == "en"
    assert sum(r["source"].startswith("docs/policy") for r in records) == 1
    assert manifest["dropped"] == {"near_duplicate": 1}
    assert manifest["skipped"] == {"no_text_layer": 1, "unsupported": 1}
    assert manifest["skipped_files"] == [{"path": "docs/photo.png", "reason": "unsupported"},
                                         {"path": "docs/scan.pdf", "reason": "no_text_layer"}]
    assert manifest["documents"] == len(records) and manifest["languages"]["id"] == 1
    assert str(folder.parent) not in json.dumps(manifest) + json.dumps(records)  # no machine paths


def test_languages_filter_and_pretraining_reads_the_output(folder, tmp_path, capsys):
    out = tmp_path / "id.jsonl"
    assert main(["corpus", str(folder), "--out", str(out), "--languages", "id", "--include", "*.txt"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in records] == ["docs/indonesian.txt"]
    assert "languages" in capsys.readouterr().out
    from daulat.data.corpus import Corpus

    assert list(Corpus(out)) == [INDONESIAN]


def test_damaged_files_are_skipped_with_their_reason_and_dry_run_writes_nothing(tmp_path, capsys):
    root = tmp_path / "mixed"
    root.mkdir()
    write_docx(root / "good.docx", SENTENCES["docx"])
    (root / "broken.docx").write_bytes((root / "good.docx").read_bytes()[:300])  # a truncated zip container
    (root / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["corpus", str(root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "skipped mixed/broken.docx: extractor_failed (docx)" in out and "skipped mixed/broken.zip: corrupt" in out
    assert sorted(p.name for p in root.iterdir()) == ["broken.docx", "broken.zip", "good.docx"]
    assert main(["corpus", str(root)]) == 2  # --out is required without --dry-run
    assert "--out" in capsys.readouterr().err


def write_ods(path, text):
    from odf.opendocument import OpenDocumentSpreadsheet
    from odf.table import Table, TableCell, TableRow
    from odf.text import P

    document = OpenDocumentSpreadsheet()
    table = Table(name="Budget")
    row = TableRow()
    cell = TableCell(valuetype="string")
    cell.addElement(P(text=text))
    row.addElement(cell)
    table.addElement(row)
    document.spreadsheet.addElement(table)
    document.save(str(path))


def write_odp(path, text):
    from odf.draw import Frame, Page, TextBox
    from odf.opendocument import OpenDocumentPresentation
    from odf.style import MasterPage, PageLayout
    from odf.text import P

    document = OpenDocumentPresentation()
    layout = PageLayout(name="layout")
    document.automaticstyles.addElement(layout)
    master = MasterPage(name="master", pagelayoutname=layout)
    document.masterstyles.addElement(master)
    page = Page(masterpagename=master)
    frame = Frame(width="20cm", height="5cm", x="1cm", y="1cm")
    box = TextBox()
    box.addElement(P(text=text))
    frame.addElement(box)
    page.addElement(frame)
    document.presentation.addElement(page)
    document.save(str(path))


def test_opendocument_spreadsheet_and_presentation(tmp_path):
    from daulat.data.documents import extract_file
    from daulat.data.reading import ReadLimits

    write_ods(tmp_path / "budget.ods", "The spreadsheet cell holds the travel budget for the third quarter.")
    write_odp(tmp_path / "talk.odp", "The slide announces the new cafeteria opening hours for all staff.")
    for name, sentence in (("budget.ods", "travel budget for the third quarter"), ("talk.odp", "new cafeteria opening hours")):
        [(member, fmt, text)] = list(extract_file(tmp_path / name, ReadLimits()))
        assert (member, fmt) == ("", "odf") and sentence in text, name


def test_digits_of_an_invalid_iban_are_not_a_phone_number():
    from daulat.data.pii import scrub

    # the check digits are wrong: not an IBAN, and its tail "0044 0532 0130 01" is not a call to +44 either
    assert scrub("Account DE89 3704 0044 0532 0130 01 is closed.") == ("Account DE89 3704 0044 0532 0130 01 is closed.", {})
    text, counts = scrub("Pay DE89 3704 0044 0532 0130 00 or call 0044 20 7946 0958.")
    assert text == "Pay <IBAN> or call <PHONE>." and counts == {"iban": 1, "phone": 1}


@pytest.mark.slow  # starts worker processes: about 4 s
def test_worker_processes_give_the_same_output_in_the_same_order(folder):
    from daulat.data.pipeline import PipelineOptions, run_pipeline

    outputs = []
    for workers in (0, 2):
        records, summary = run_pipeline([str(folder)], PipelineOptions(), workers=workers, show_progress=False)
        outputs.append((list(records), summary))
    assert outputs[0] == outputs[1] and outputs[0][1]["dropped"] == {"near_duplicate": 1}
    from daulat.data.corpus import Corpus  # what pretrain reads: its document files extracted by workers too

    one, two = Corpus(folder, workers=0), Corpus(folder, workers=2)
    assert list(one) == list(two) and one.manifest == two.manifest
    assert len(one.manifest["files"]) == 18  # all 20 files but the photo and the scanned PDF


def test_pretrain_cleans_filters_and_records_the_pipeline_in_the_manifest(folder, tmp_path):
    out = tmp_path / "pt"
    assert main(["pretrain", "--preset", "micro", "--steps", "1", "--data", str(folder), "--out", str(out),
                 "--exclude", "*.pdf", "--languages", "en", "data.val_fraction=0"]) == 0
    manifest = json.loads((out / "final" / "daulat.json").read_text())["data"]["manifest"]
    pipeline = manifest["pipeline"]
    assert set(pipeline["languages"]) == {"en", "code"} and pipeline["dropped"]["language"] >= 1  # Indonesian
    assert pipeline["dropped"]["near_duplicate"] == 1 and pipeline["pii"]["email"] >= 1
    assert manifest["skipped"]["excluded"] == 2 and "pdf" not in pipeline["formats"]
    assert str(folder.parent) not in json.dumps(manifest)


@pytest.mark.slow
def test_speedrun_on_a_folder_of_documents(folder, tmp_path):
    out = tmp_path / "run"
    assert main(["speedrun", "--preset", "micro", "--data", str(folder), "--out", str(out)]) == 0
    for stage in ("pretrain", "distill"):
        card = json.loads((out / stage / "final" / "daulat.json").read_text())
        assert '"near_duplicate": 1' in json.dumps(card), stage  # the pipeline's summary travels with every model


def test_progress_bar_on_stderr_only_when_asked(tmp_path, capsys):
    from daulat.data.pipeline import PipelineOptions, run_pipeline

    (tmp_path / "a.txt").write_text("The first note about the roof repair of the office in March.")
    (tmp_path / "b.txt").write_text("Das zweite Protokoll beschreibt die neue Kantine im Erdgeschoss.")
    for show in (False, True):
        records, _ = run_pipeline([str(tmp_path)], PipelineOptions(), workers=0, show_progress=show)
        assert len(list(records)) == 2
        err = capsys.readouterr().err
        assert ("/2 [" in err and "file/s" in err) == show, err  # tqdm's bar over the 2 files; none unless asked
