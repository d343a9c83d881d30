"""`make bench` at toy sizes: every section's script starts, measures both of its sides and writes its Markdown and
curves. (The figures of a tiny run mean nothing; `make bench` measures, never `make test`.)"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import NAMES

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_every_benchmark_section_runs_at_toy_sizes_and_writes_its_page_and_curves(tmp_path):
    # Its own Ray per section (bench/run.py), never the tests' session Ray. The timeout only stops a hang: ~9 min
    # here on a slow day, 15 when another job shares the 2 cores.
    out = subprocess.run([sys.executable, "-m", "bench.run", "--tiny", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    page = (tmp_path / "BENCHMARKS.md").read_text()
    headings = re.findall(r"^## (.+)$", page, re.MULTILINE)
    assert len(headings) == len(NAMES), headings
    assert not re.search(r"\bnan\b", page, re.IGNORECASE)
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page)
    assert len(images) >= 6  # train × 2, generation × 2, data prepare, weight sync
    for image in images:
        png = tmp_path / image
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
    for line in page.splitlines():  # every ratio row shows both sides and a ratio
        if line.startswith("| (") and "×" in line:
            assert line.count("|") >= 5, line
    # A second run of one section replaces it in place and says so; the others stay.
    again = subprocess.run([sys.executable, "-m", "bench.run", "--tiny", "--out", str(tmp_path), "export"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    refreshed = (tmp_path / "BENCHMARKS.md").read_text()
    assert re.findall(r"^## (.+)$", refreshed, re.MULTILINE) == headings
    assert "refreshed alone by `python -m bench.run export`" in refreshed


def test_bench_run_refuses_an_unknown_section_and_a_tiny_run_over_the_real_page(tmp_path):
    for argv in (["no-such-section", "--out", str(tmp_path)], ["--tiny"]):
        out = subprocess.run([sys.executable, "-m", "bench.run", *argv], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 2 and "error:" in out.stderr, out.stderr
    assert not (tmp_path / "BENCHMARKS.md").exists()
