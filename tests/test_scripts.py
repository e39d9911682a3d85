"""scripts/reproduce/ drives the public CLIs and benchmarks/ holds throughput benchmarks only: no
sys.path edits, no script importing another script, no calibration scripts (those are Hydra sweeps)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

# ranking_context and fidelity_curve became evaluate.py benchmarks: no script of that name may return.
ELSEWHERE = {"ranking_context", "fidelity_curve"}
SCRIPTS = sorted((REPO / "scripts").rglob("*.py")) + sorted(
    p for p in (REPO / "benchmarks").glob("*.py") if p.stem not in ELSEWHERE
)
SCRIPT_NAMES = {p.stem for p in SCRIPTS} | ELSEWHERE


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_scripts_import_only_the_package(path: Path) -> None:
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & SCRIPT_NAMES, f"{path} imports another script"
    assert "sys.path" not in path.read_text(), f"{path} edits sys.path"


def test_benchmarks_are_throughput_only() -> None:
    names = {p.stem for p in (REPO / "benchmarks").glob("*.py")}
    assert names - ELSEWHERE == {
        "after_sweep",
        "paper_scale",
        "sweep_throughput",
        "train_throughput",
        "trak_throughput",
    }
    assert {p.stem for p in (REPO / "scripts" / "reproduce").glob("*.py")} == {
        "abc_embedded",
        "candidate_pruning",
        "leave_k_out_cpu",
        "rare_concept_retrieval",
    }
