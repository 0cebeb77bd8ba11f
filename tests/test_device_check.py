"""``scripts/device_check.sh``: the tiny CPU mode end to end, the step timeout, no-GPU message.

The script is run as a user runs it (``bash scripts/device_check.sh``), with this interpreter
(``PYTHON``) and a temporary ``OUT``; nothing is imported from ``scripts/``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEP_TITLES = {
    "machine": "Machine",
    "reward-b16": "Reward throughput, ViT-B/16, bf16, GPU",
    "reward-l14": "Reward throughput, ViT-L/14, bf16, GPU",
    "llava": "Contrastive-attention critic overhead, LLaVA-1.5-7B size, fp16, GPU",
    "ddpo": "DDPO at Stable Diffusion 1.5 size, fp16, GPU",
}
NUMBER = re.compile(r"\d+(\.\d+)?")


def _run(args: list[str], out: Path, timeout: float, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out)}
    full_env.pop("DEVICE_CHECK_TINY", None)
    full_env.update(env)
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "device_check.sh"), *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _sections(report: str) -> dict[str, str]:
    """``{heading: body}`` of the report's ``## `` sections."""
    parts = re.split(r"^## (.+)$", report, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _tables(body: str) -> list[list[list[str]]]:
    """Markdown tables of ``body``: lists of rows (header and separator dropped) of cells."""
    tables, current = [], []
    for line in body.splitlines() + [""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current[2:])  # drop the header and the |---| separator
            current = []
    return tables


def test_tiny_cpu_mode_prints_every_table_with_numbers(tmp_path):
    t0 = time.monotonic()
    proc = _run(["--tiny"], tmp_path, timeout=240)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = proc.stdout
    sections = _sections(report)
    for name, title in STEP_TITLES.items():
        assert title in sections, f"no section {title!r} in the report"
        body = sections[title]
        assert "Status: ok" in body, body
        tables = _tables(body)
        assert tables, f"step {name} printed no table"
        for table in tables:
            assert table, f"step {name}: a table without rows"
            for row in table if name != "machine" else []:  # (machine: "GPU | none" on CPU)
                assert any(NUMBER.search(c) for c in row[1:]), (name, row)
    # The tables the issue asks for, by their columns and rows.
    reward = sections[STEP_TITLES["reward-b16"]]
    assert "b/a" in reward and "b/c" in reward and len(_tables(reward)[0]) == 2  # batches 1, 4
    llava = sections[STEP_TITLES["llava"]]
    modes = [row[0] for row in _tables(llava)[0]]
    assert modes == ["plain", "capture", "capture+refine", "eager+attentions"]
    ddpo = _tables(sections[STEP_TITLES["ddpo"]])
    assert len(ddpo) == 2 and "samples/s" in ddpo[1][-1][-1]  # sampler table, epoch table
    summary = _tables(sections["Summary"])[0]
    assert [row[0] for row in summary] == list(STEP_TITLES)
    assert all(row[1] == "ok" for row in summary)
    # The same report is written under $OUT (what the device machine sends back), with a log.
    assert (tmp_path / "device_check.md").read_text().strip() == report.strip()
    assert "===== ddpo: ok" in (tmp_path / "device_check.log").read_text()
    print(f"tiny device check: {elapsed:.1f} s")


def test_step_timeout_kills_the_step_and_goes_on(tmp_path):
    """A step over its limit is killed, reported as timed out, and the next step still runs;
    the exit status says that not every step finished."""
    t0 = time.monotonic()
    proc = _run(
        ["--only", "reward-b16,machine", "--step-timeout", "0.3"],
        tmp_path,
        timeout=60,
        DEVICE_CHECK_TINY="1",
    )
    assert time.monotonic() - t0 < 30  # no step ran to its end (Python + torch > 0.3 s)
    assert proc.returncode == 1
    summary = _tables(_sections(proc.stdout)["Summary"])[0]
    assert [row[0] for row in summary] == ["machine", "reward-b16"]
    assert all(row[1] == "timed out after 0.3 s" for row in summary), summary


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")


@NO_GPU
def test_full_mode_without_gpu_says_what_to_run(tmp_path):
    proc = _run([], tmp_path, timeout=60)
    assert proc.returncode == 1
    assert "no CUDA device" in proc.stdout and "--tiny" in proc.stdout
    summary = _tables(_sections(proc.stdout)["Summary"])[0]
    assert summary == [["machine", "failed (exit 3)", summary[0][2]]]


@NO_GPU
def test_failed_llava_step_falls_back_to_fewer_layers_and_says_so(tmp_path):
    """The full LLaVA step fails here (no GPU): its fallback with 8 of 32 layers runs next,
    under a title and note that say the size was reduced."""
    proc = _run(["--only", "llava"], tmp_path, timeout=120)
    assert proc.returncode == 1
    sections = _sections(proc.stdout)
    reduced = "Contrastive-attention critic overhead, LLaVA-1.5-7B layers, 8 of 32, fp16, GPU"
    assert STEP_TITLES["llava"] in sections and reduced in sections
    assert "REDUCED" in sections[reduced] and "--layers 8" in sections[reduced]
    assert "Status: failed" in sections[STEP_TITLES["llava"]]
    summary = _tables(sections["Summary"])[0]
    assert [row[0] for row in summary] == ["llava", "llava"]
