"""Documents pipeline throughput: `daulat corpus` on a generated mixed folder, and the plain corpus reader
(what `pretrain --data` uses) on the same folder, side by side in one run.

    python bench/corpus.py                  # 40 files of each of 8 formats (320 files)
    python bench/corpus.py --per-format 100 --workers 2

Each file holds a few paragraphs of distinct generated text (so near-duplicate removal keeps them).
Reports documents/s and MB of extracted text/s for the pipeline in one process and with worker processes
and for the reader alone, and the peak resident memory of each run's main process (VmHWM; the workers,
children of a forkserver, are not in it), each measured in a fresh process. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path

WORDS = ("budget meeting report policy customer invoice supplier project roadmap quarter revenue office travel "
         "contract review laptop server badge holiday payroll tender library roof menu cafeteria region team").split()


def paragraph(rng: random.Random, n: int = 80) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def make_folder(root: Path, per_format: int, seed: int = 0) -> None:
    import docx
    import openpyxl
    import pptx
    from fpdf import FPDF

    rng = random.Random(seed)
    for i in range(per_format):
        texts = [paragraph(rng) for _ in range(4)]  # new texts for each file: no two are (near) duplicates
        (root / f"t{i}.txt").write_text("\n\n".join(texts))
        texts = [paragraph(rng) for _ in range(4)]
        (root / f"h{i}.html").write_text(f"<html><body><nav>menu</nav><main>{''.join(f'<p>{t}</p>' for t in texts)}</main></body></html>")
        texts = [paragraph(rng) for _ in range(4)]
        (root / f"m{i}.eml").write_text(f"Subject: note {i}\nFrom: a@example.org\n\n" + "\n\n".join(texts))
        texts = [paragraph(rng) for _ in range(4)]
        (root / f"c{i}.csv").write_text("id,note\n" + "".join(f'{j},"{t}"\n' for j, t in enumerate(texts)))
        texts = [paragraph(rng) for _ in range(4)]
        document = docx.Document()
        for t in texts:
            document.add_paragraph(t)
        document.save(root / f"d{i}.docx")
        texts = [paragraph(rng) for _ in range(4)]
        book = openpyxl.Workbook()
        for t in texts:
            book.active.append([t])
        book.save(root / f"x{i}.xlsx")
        texts = [paragraph(rng) for _ in range(4)]
        deck = pptx.Presentation()
        slide = deck.slides.add_slide(deck.slide_layouts[1])
        slide.placeholders[1].text = "\n".join(texts)
        deck.save(root / f"p{i}.pptx")
        texts = [paragraph(rng) for _ in range(4)]
        pdf = FPDF()
        pdf.add_page()
        pdf.set_font("Helvetica", size=10)
        pdf.multi_cell(0, 6, "\n\n".join(texts))
        pdf.output(str(root / f"f{i}.pdf"))


RUN = """
import json, sys, time
start = time.time()
kind, folder, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
if kind == "pipeline":
    from daulat.data.pipeline import PipelineOptions, run_pipeline
    records, summary = run_pipeline([folder], PipelineOptions(), workers=workers, show_progress=False)
    n, mb = 0, 0.0
    for r in records:  # streamed, as `daulat corpus` writes them: never all texts at once
        n, mb = n + 1, mb + len(r["text"].encode()) / 1e6
else:
    from daulat.data.corpus import Corpus
    n, mb = 0, 0.0
    for t in Corpus(folder, workers=workers):
        n, mb = n + 1, mb + len(t.encode()) / 1e6
seconds = time.time() - start
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "documents": n, "text_mb": mb, "peak_rss_mb": hwm / 1024}))
"""


def measure(kind: str, folder: Path, workers: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", RUN, kind, str(folder), str(workers)], capture_output=True, text=True,
                         env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["documents_per_s"] = result["documents"] / result["seconds"]
    result["text_mb_per_s"] = result["text_mb"] / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-format", type=int, default=40)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes of the parallel runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "docs"
        folder.mkdir()
        make_folder(folder, args.per_format)
        files = len(list(folder.iterdir()))
        runs = {"pipeline_1_process": ("pipeline", 0), f"pipeline_{args.workers}_workers": ("pipeline", args.workers),
                "corpus_reader": ("corpus", 0)}  # the reader alone: extraction without cleaning
        results = {name: measure(kind, folder, workers) for name, (kind, workers) in runs.items()}
    for kind, r in results.items():
        print(f"{kind:<20} {r['documents']:>5} documents in {r['seconds']:.1f}s: {r['documents_per_s']:.1f} docs/s, "
              f"{r['text_mb_per_s']:.2f} MB text/s, peak {r['peak_rss_mb']:.0f} MB")
    print(json.dumps({"bench": "corpus", "files": files, "machine": platform.processor() or platform.machine(),
                      "cpus": os.cpu_count(), **{k: {n: round(v, 3) for n, v in r.items()} for k, r in results.items()}}))


if __name__ == "__main__":
    main()
