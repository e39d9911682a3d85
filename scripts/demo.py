"""`make demo`: train the default model on the embedded world, check what it draws, attribute a
rare-concept image. Every step is the public command line (printed), so the demo is also the tutorial.

Outputs go to outputs/demo/<timestamp>/{train,fidelity,attribute,retrieval}; nothing is overwritten.
Extra arguments are passed to train.py (e.g. `python scripts/demo.py training.max_steps=400`).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RARE_PROMPT = "a striped red square on a gray background"


def run(args: list[str]) -> float:
    print(f"\n$ {shlex.join(args)}", flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
    return time.perf_counter() - started


def main() -> None:
    base = ROOT / "outputs" / "demo" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    extra = sys.argv[1:]
    # The later steps must read the same training data (attribute.py refuses any other).
    data = [arg for arg in extra if arg.startswith(("data=", "data."))]
    train_dir, fidelity_dir = base / "train", base / "fidelity"
    attribute_dir, retrieval_dir = base / "attribute", base / "retrieval"

    train_s = run(["train.py", f"hydra.run.dir={train_dir}", *extra])
    checkpoint = train_dir / "checkpoint"
    run(
        [
            "evaluate.py",
            "benchmark=fidelity",
            f"model.path={checkpoint}",
            *data,
            f"hydra.run.dir={fidelity_dir}",
        ]
    )
    attribute_s = run(
        [
            "attribute.py",
            f"model.path={checkpoint}",
            f"query.prompts=[{RARE_PROMPT}]",
            "query.seeds=[0]",
            *data,
            f"hydra.run.dir={attribute_dir}",
        ]
    )
    run(
        [
            "evaluate.py",
            "benchmark=retrieval",
            f"scores={attribute_dir}",
            *data,
            f"hydra.run.dir={retrieval_dir}",
        ]
    )

    fidelity = json.loads((fidelity_dir / "metrics.json").read_text())
    retrieval = json.loads((retrieval_dir / "metrics.json").read_text())
    print("\n=== demo summary ===")
    print(f"training: {train_s / 60:.1f} min; samples during training: {train_dir / 'samples'}")
    print(
        f"fidelity: attribute accuracy {fidelity['attribute_accuracy']:.3f}, rare-concept hit rate "
        f"{fidelity['rare_concept_hit_rate']:.3f} ({fidelity['concepts_recognised']}/{fidelity['num_concepts']} "
        f"concepts recognised); grids: {fidelity_dir / 'fidelity_plain.png'}, {fidelity_dir / 'fidelity_rare.png'}"
    )
    print(
        f"attribution of '{RARE_PROMPT}': {attribute_s / 60:.1f} min; ranking: {attribute_dir / 'ranking.png'}"
    )
    print(f"retrieval of the concept's training images: mAP {retrieval['mean']['ap']:.3f}")


if __name__ == "__main__":
    main()
