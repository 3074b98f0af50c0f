"""Label agreement of the fast modes with plain fp32, on a trained bundle.

    python bench/drift.py --images 500              # demo bundle, shapes at photo sizes
    python bench/drift.py --variants draft bf16 compile gpu-decode --device cuda

A fast mode may change probabilities (JPEG draft decoding, bf16, compiled
kernels, GPU resizing); it is on by default only where the label sets stay
the same. Reference: fp32, full-size decode, PIL resize. Reports, per mode,
the share of (image, class) decisions and of whole label sets that agree,
and the largest probability difference.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from datetime import UTC, datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from throughput import OUT, VARIANTS, machine  # noqa: E402


def main() -> None:
    import numpy as np
    from corpus import shapes_corpus
    from deltalake import DeltaTable

    from mlcls.bundle import load_bundle
    from mlcls.tag.job import TagOptions, tag_images

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--model", default=None, help="a trained bundle (default: the demo bundle)")
    p.add_argument("--device", default="auto")
    p.add_argument("--variants", nargs="*", default=["draft"], choices=[v for v in VARIANTS if v != "fp32"])
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args()
    corpus = os.path.join(OUT, f"shapes-{a.images}")
    shapes_corpus(corpus, a.images)
    bundle = load_bundle(a.model)
    classes = list(bundle.classes)

    def run(name: str) -> dict[str, tuple[np.ndarray, frozenset]]:
        out = os.path.join(OUT, f"drift-{name}")
        shutil.rmtree(out, ignore_errors=True)
        opts = {"device": a.device, "batch_size": 64, **VARIANTS[name]}
        tag_images(corpus, out, a.model, TagOptions(**opts))
        t = DeltaTable(out).to_pyarrow_dataset().to_table().to_pydict()
        return {u: (np.array([p[c] for c in classes]), frozenset(lb)) for u, p, lb in
                zip(t["uri"], t["probs"], t["labels"], strict=True)}

    reference = run("fp32")
    lines = [f"\n### Drift against fp32 on {a.images} shapes images at photo sizes, bundle {bundle.model_id} "
             f"({datetime.now(UTC):%Y-%m-%d})\n", f"`python bench/drift.py {' '.join(sys.argv[1:])}`\n",
             f"Machine: {machine()['cpu']}, GPU {machine()['gpu']}\n",
             "| mode | decisions agreeing | label sets agreeing | max abs prob diff |", "| --- | ---: | ---: | ---: |"]
    for name in a.variants:
        got = run(name)
        same_sets = sum(got[u][1] == reference[u][1] for u in reference)
        decisions = sum(len(classes) - len(got[u][1] ^ reference[u][1]) for u in reference)
        diff = max(float(np.abs(got[u][0] - reference[u][0]).max()) for u in reference)
        lines.append(f"| {name} | {decisions / (len(reference) * len(classes)):.2%} | "
                     f"{same_sets / len(reference):.2%} | {diff:.4f} |")
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if not a.no_record:
        with open(a.results, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
