"""Probe: do multiple-choice minimal pairs (one image, one question, the same options in two orders with different
letters, both in one batch) teach the base the option lookup? Writes a base to OUT.

A probe, not one of the project's commands (README, "Descriptions kept in phase 2", its last point). As run:
    python probe_mc_pairs.py runs/base-replay runs/probe-mc1 6000 1 5000
    python probe_mc_pairs.py runs/probe-mc1 runs/probe-mc3 6000 2 5000
(START OUT PAIRS EPOCHS [DESCRIPTIONS]; the pairs' images go to /tmp/probe/mcroot.) The pairs use the generic
mixture's own multiple-choice kinds (synth.INSTRUCT), one per image family, never a task's question."""
import json, sys, time, random
from pathlib import Path
import numpy as np, torch
from fcit.config import load_config
from fcit.data import synth
from fcit.data.synth import *  # noqa
from fcit.data.loader import load_train_file
from fcit.models.backbone import load_backbone
from fcit import pretrain as P

start, out, n_pairs, epochs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
n_desc = int(sys.argv[5]) if len(sys.argv) > 5 else 0
torch.set_num_threads(2)
cfg = load_config(None, "default", [])
scfg = cfg.data.synth

def mc_kind(name, s):
    if name == "object": return "In which style is this image made?", s.style, STYLES
    if name == "line": return "Which color is the plotted line?", s.color, COLOR_NAMES
    if name == "icons": return "How many icons are in the grid in total?", str(sum(n for _, n in s.counts)), [str(v) for v in range(1, 10)]
    if name == "scene": return "How many objects are in the scene?", str(len(s.objs)), [str(v) for v in range(1, 7)]
    if name == "book": return "Which color is the book cover?", s.cover, list(COVER_COLORS)
    if name == "landscape": return "What can be seen in the sky?", s.sky.kind if s.sky else "nothing", ["sun", "cloud", "nothing", "moon"]
    if name in ("bars", "labelled_bars"): return "Which color is the rightmost bar?", s.colors[-1], COLOR_NAMES
    if name == "table": return "What is written in the last row of the table?", s.items[-1], TABLE_ITEMS
    raise KeyError(name)

root = Path("/tmp/probe/mcroot"); (root / "images").mkdir(parents=True, exist_ok=True)
recs = []
names = list(FAMILIES)
for i in range(n_pairs):
    name = names[i % len(names)]
    rng = synth._rng(scfg.seed, 303, i)
    spec = FAMILIES[name].sample(rng)
    q, ans, pool = mc_kind(name, spec)
    k = min(4, len(set(pool)))
    opts = [ans] + synth._pick(rng, [p for p in pool if p != ans], k - 1)
    p1 = [opts[int(j)] for j in rng.permutation(k)]
    while True:
        p2 = [opts[int(j)] for j in rng.permutation(k)]
        if p2.index(ans) != p1.index(ans): break
    img = FAMILIES[name].draw(spec, scfg.image_size, rng)
    rel = f"images/mc-{i:06d}.png"; img.save(root / rel)
    for tag, o in (("a", p1), ("b", p2)):
        body = "\n".join(f"{LETTERS[j]}. {v}" for j, v in enumerate(o))
        recs.append(synth._conversation(f"mc-{i:06d}-{tag}", rel, f"{q}\n{body}\n{MC}", LETTERS[o.index(ans)]))
(root / "mc.json").write_text(json.dumps(recs))
pairs = load_train_file(root / "mc.json", "mc", root)
mroot = synth.build_pretrain(scfg)
instruct = load_train_file(mroot / "pretrain" / "instruct.json", "instruct", mroot)
extra = []
if n_desc:
    desc = load_train_file(mroot / "pretrain" / "train.json", "pretrain", mroot)
    extra = random.Random(0).sample(desc, n_desc)
rest = instruct + extra
random.Random(1).shuffle(rest)
model, processor = load_backbone(str(start))
P._freeze_vision_only(model)
mixed = pairs + rest[: len(rest) // 2 * 2]
t = time.time()
res = P._phase(model, processor, mixed, P.BINDING_TRAIN, epochs, 2, "mc pairs", True, block=2)
print("loss", res.loss, "seconds", time.time() - t, "records", len(mixed))
out.mkdir(parents=True, exist_ok=True)
model.save_pretrained(out); processor.save_pretrained(out)
rec = json.loads((start / "fcit_pretrain.json").read_text())
rec["probe_mc_pairs"] = {"pairs": n_pairs, "epochs": epochs, "descriptions": n_desc, "loss": res.loss}
(out / "fcit_pretrain.json").write_text(json.dumps(rec, indent=1))
