"""What the base model can do before any task: the general set (the held-out split of its generic instruction
mixture), per answer format, against a constant answer.

    python scripts/base_skills.py [--set model.path=DIR] [--set KEY=VALUE ...] [--markdown] [--out skills.json]

A base that follows formats scores well on the formats whose answer is read off the image alone ("What color is
the line?"). Yes/no and multiple-choice questions need more: the model has to compare a word of the question (a
colour, an option) with the image. Where a format scores no better than answering every question of that format the
same way, the base has not learned that comparison, and a task built on it (FigureQA's yes/no about the tallest bar,
CLEVR-Math's "Subtract all red objects") cannot be learned by a rank-8 LoRA in the benchmark's budget either (README,
"FCIT-Synth in the paper's regime"). Per family, the yes/no and letter rows show where the comparison is missing.

The constant answer is the format's most frequent reference answer, scored by the same scorer (for yes/no about
half, for letters about one in four). Generation is greedy and in the config's compute dtype (``--set
model.compute_dtype=float32`` for the fp32 path the tables use).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

BINDING = ("yesno", "letter")  # formats whose answer depends on comparing the question with the image


def constant_score(fmt: str, samples, scoring: str = "reference") -> float:
    from fcit.data import registry
    from fcit.eval.scorers import score

    answer = Counter(s.answer for s in samples).most_common(1)[0][0]
    return float(score(registry.FORMATS[fmt], [answer] * len(samples), samples, scoring)["score"])


def skills(samples, preds, scoring: str = "reference") -> list[dict]:
    """One row per accuracy format over all families, then per family (``meta["family"]``) for the formats in
    BINDING: the base's score, the constant answer's and the margin (percentage points)."""
    from fcit.data import registry
    from fcit.eval.general import ACCURACY_FORMATS
    from fcit.eval.scorers import score

    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        fmt = s.meta["format"]
        if fmt in ACCURACY_FORMATS:
            groups[(fmt, "all")].append(i)
            if fmt in BINDING:
                groups[(fmt, s.meta.get("family", "-"))].append(i)
    rows = []
    def order(group):  # format order, "all" first, then the families by name
        (fmt, fam), _ = group
        return ACCURACY_FORMATS.index(fmt), fam != "all", fam

    for (fmt, fam), idx in sorted(groups.items(), key=order):
        ss, ps = [samples[i] for i in idx], [preds[i] for i in idx]
        base = float(score(registry.FORMATS[fmt], ps, ss, scoring)["score"])
        const = constant_score(fmt, ss, scoring)
        rows.append({"format": fmt, "family": fam, "n": len(idx), "base": round(base, 1),
                     "constant": round(const, 1), "margin": round(base - const, 1)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--out", help="write the scores as JSON")
    args = ap.parse_args()

    from fcit.config import load_config
    from fcit.data.loader import open_general
    from fcit.eval.evaluate import generate
    from fcit.methods import build_method
    from fcit.runtime import Runtime, prepare_model

    cfg = load_config(None, args.preset, [*args.overrides, "method.name=zeroshot"])
    rt = Runtime.build(cfg, progress=False)
    pm = prepare_model(cfg, build_method(cfg), rt.base_model, rt.processor)
    samples = open_general(cfg, progress=False)
    preds = generate(pm.model, pm.batcher, samples, cfg.eval.batch_size, cfg.eval.max_new_tokens)

    rows = skills(samples, preds, cfg.eval.scoring)

    model = cfg.model.path or "the embedded base"
    if args.markdown:
        print(f"Base: {model}; general set, {len(samples)} questions.\n")
        print("| format | family | n | base | constant answer | base - constant |")
        print("|---|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['format']} | {r['family']} | {r['n']} | {r['base']} | {r['constant']} | {r['margin']:+} |")
    else:
        print(f"base: {model}")
        for r in rows:
            print(f"{r['format']:7} {r['family']:14} n={r['n']:3}  base {r['base']:5.1f}  constant {r['constant']:5.1f}  "
                  f"margin {r['margin']:+.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": model, "compute_dtype": cfg.model.compute_dtype,
                                              "scoring": cfg.eval.scoring, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    from fcit.errors import FcitError

    try:
        main()
    except FcitError as e:  # a bad config or a benchmark without a general set: one line, no traceback
        raise SystemExit(f"base_skills: {e}")
