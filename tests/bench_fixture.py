"""A tiny benchmark in the official layout, written from scratch so the data tests do not depend on FCIT-Synth."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from fcit.data import registry

IMAGES_PER_DATASET = 3


def _answer(spec: registry.DatasetSpec, i: int) -> str:
    return {
        registry.EXACT: f"word{i % 4}",
        registry.CHOICE: "ABCD"[i % 4],
        registry.NUMBER: str(i % 7),
        registry.YESNO: ("yes", "no")[i % 2],
        registry.CONTAINS: str(10 + i % 5),
        registry.GROUNDING: f"[0.1{i % 10}, 0.2, 0.5, 0.78]",
        registry.CAPTION: f"a red shape number {i}",
    }[spec.answer_type]


def make_bench(root: Path, n_train: int = 12, n_test: int = 6, datasets=None) -> Path:
    """Write every registry dataset (or ``datasets``) under ``root``; images at ``root/images/<folder>/<j>.png``."""
    for name in datasets or registry.DATASETS:
        spec = registry.get(name)
        folder = root / "instructions" / spec.folder
        folder.mkdir(parents=True, exist_ok=True)
        imgs = root / "images" / spec.folder
        imgs.mkdir(parents=True, exist_ok=True)
        for j in range(IMAGES_PER_DATASET):
            Image.new("RGB", (8, 8), (40 * j, 80, 120)).save(imgs / f"{j}.png")

        def image(i: int) -> str:
            return f"images/{spec.folder}/{i % IMAGES_PER_DATASET}.png"

        train = [
            {
                "id": f"{name}-{i}",
                "image": image(i),
                "conversations": [
                    {"from": "human", "value": f"<image>\nQuestion {i} about {name}?"},
                    {"from": "gpt", "value": _answer(spec, i)},
                ],
            }
            for i in range(n_train)
        ]
        test = []
        for i in range(n_test):
            rec = {"question_id": 1000 + i, "image": image(i), "text": f"<image>\nTest {i} of {name}?",
                   "answer": _answer(spec, i)}
            if spec.answer_type == registry.GROUNDING:
                rec["answer_bbox"] = _answer(spec, i)
                rec["size"] = [8, 8]
            test.append(rec)
        (folder / spec.train_file).write_text(json.dumps(train))
        (folder / spec.test_file).write_text(json.dumps(test))
        if spec.answer_type == registry.CAPTION:
            anns = [{"image_id": i + 1, "id": 2 * i + k, "caption": f"ref {k} of image {i}"}
                    for i in range(n_test) for k in range(2)]
            coco = {"images": [{"id": i + 1} for i in range(n_test)], "annotations": anns}
            (folder / "val_coco_type.json").write_text(json.dumps(coco))
    return root
