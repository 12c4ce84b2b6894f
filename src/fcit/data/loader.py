"""Read the FCIT benchmark (official ``instructions/`` layout, real or FCIT-Synth) into :class:`Sample` lists.

Every problem with a file becomes one :class:`FcitError` line naming the file, the record index and the field, raised
while loading, i.e. before any training starts. Formats are those of reference section 1.1:

* train: ``[{"id"?, "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}]``
* test: ``[{"question_id", "image", "text", "answer"}]``; grounding adds ``answer_bbox`` ``"[x1, y1, x2, y2]"`` and
  ``size`` ``[w, h]``; captions take their references from ``val_coco_type.json`` beside the test file when present
  (COCO caption format, ``image_id`` 1..N in test-file order).

An ``image`` key is required in every record; an explicit ``null`` marks a text-only record (the model gets a blank
image, as the reference does), while a missing key is almost always a broken export and is reported.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from fcit.data import registry
from fcit.data.records import Sample, strip_image_tag
from fcit.errors import FcitError

if TYPE_CHECKING:
    from fcit.config import Config

COCO_REFS_FILE = "val_coco_type.json"
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FcitError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise FcitError(f"{path}: malformed JSON at line {e.lineno} col {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FcitError(f"{path}: cannot read: {e}") from None


def _read_records(path: Path) -> list[Any]:
    data = _read_json(path)
    if not isinstance(data, list):
        raise FcitError(f"{path}: top level must be a JSON list of records, got {type(data).__name__}")
    return data


def _field(path: Path, i: int, rec: Any, key: str) -> Any:
    if not isinstance(rec, dict):
        raise FcitError(f"{path}: record {i}: expected an object, got {type(rec).__name__}")
    if key not in rec:
        raise FcitError(f"{path}: record {i}: missing field '{key}'")
    return rec[key]


def _text(path: Path, i: int, value: Any, key: str) -> str:
    # Numbers are common in answer fields (e.g. CLEVR-Math); anything else is a broken record.
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise FcitError(f"{path}: record {i}: field '{key}' must be a string, got {type(value).__name__}")
    return str(value)


def _image(path: Path, i: int, rec: dict, image_root: Path) -> Optional[str]:
    value = _field(path, i, rec, "image")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise FcitError(f"{path}: record {i}: field 'image' must be a non-empty path or null")
    return str(image_root / value)


def _check_images(path: Path, samples: Sequence[Sample], image_root: Path) -> None:
    # One stat per distinct image; report the first missing one and how many there are, so a wrong image root
    # (everything missing) is told apart from a few absent files.
    seen: dict[str, bool] = {}
    first: Optional[tuple[int, str]] = None
    for i, s in enumerate(samples):
        if s.image is None:
            continue
        if s.image not in seen:
            seen[s.image] = os.path.exists(s.image)
        if not seen[s.image] and first is None:
            first = (i, s.image)
    if first is not None:
        missing = sum(1 for ok in seen.values() if not ok)
        raise FcitError(
            f"{path}: record {first[0]}: field 'image': file not found: {first[1]} "
            f"({missing} of {len(seen)} images missing; image root {image_root})"
        )


def _parse_train(path: Path, i: int, rec: Any, dataset: str, image_root: Path) -> Sample:
    convs = _field(path, i, rec, "conversations")
    image = _image(path, i, rec, image_root)
    if not isinstance(convs, list):
        raise FcitError(f"{path}: record {i}: field 'conversations' must be a list of turns")
    prompt = answer = None
    for j, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise FcitError(f"{path}: record {i}: field 'conversations[{j}]' must be {{'from': ..., 'value': str}}")
        if prompt is None and turn.get("from") == "human":
            prompt = strip_image_tag(turn["value"])
        elif prompt is not None and turn.get("from") == "gpt":
            answer = turn["value"].strip()
            break
    if prompt is None or answer is None:
        raise FcitError(f"{path}: record {i}: field 'conversations' needs a 'human' turn followed by a 'gpt' turn")
    rid = rec.get("id", i)
    return Sample(dataset=dataset, id=str(rid), image=image, prompt=prompt, answer=answer, refs=(answer,))


def _parse_box(path: Path, i: int, value: Any, key: str) -> tuple[float, ...]:
    try:
        nums = [float(v) for v in value] if isinstance(value, list) else [float(v) for v in _NUMBER.findall(str(value))]
    except (TypeError, ValueError):
        nums = []
    if len(nums) != 4:
        raise FcitError(f"{path}: record {i}: field '{key}' must hold 4 numbers [x1, y1, x2, y2], got {value!r}")
    return tuple(nums)


def _parse_test(path: Path, i: int, rec: Any, spec: registry.DatasetSpec, image_root: Path) -> Sample:
    qid = _field(path, i, rec, "question_id")
    image = _image(path, i, rec, image_root)
    prompt = strip_image_tag(_text(path, i, _field(path, i, rec, "text"), "text"))
    answer = _text(path, i, _field(path, i, rec, "answer"), "answer").strip()
    meta: dict[str, Any] = {}
    if spec.answer_type == registry.GROUNDING:
        key = "answer_bbox" if "answer_bbox" in rec else "answer"
        meta["answer_bbox"] = _parse_box(path, i, rec[key], key)
        if "size" in rec:
            meta["size"] = rec["size"]
    return Sample(dataset=spec.name, id=str(qid), image=image, prompt=prompt, answer=answer, refs=(answer,), meta=meta)


def _attach_caption_refs(coco_path: Path, samples: list[Sample]) -> list[Sample]:
    data = _read_json(coco_path)
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise FcitError(f"{coco_path}: expected a COCO caption file with an 'annotations' list")
    refs: dict[int, list[str]] = {}
    for j, a in enumerate(anns):
        if not isinstance(a, dict) or not isinstance(a.get("caption"), str) or "image_id" not in a:
            raise FcitError(f"{coco_path}: annotation {j}: needs 'image_id' and a string 'caption'")
        refs.setdefault(int(a["image_id"]), []).append(a["caption"].strip())
    # Captions pair with questions by position only (image_id k = k-th test record), so any mismatch means the two
    # files are out of step and every score would be silently wrong.
    n = len(samples)
    if set(refs) != set(range(1, n + 1)):
        extra = sorted(set(refs) - set(range(1, n + 1)))
        lacking = sorted(set(range(1, n + 1)) - set(refs))
        what = f"no captions for image_id {lacking[0]}" if lacking else f"unexpected image_id {extra[0]}"
        raise FcitError(f"{coco_path}: image_ids must be 1..{n} (one per test record, in order): {what}")
    return [replace(s, refs=tuple(refs[k + 1])) for k, s in enumerate(samples)]


def load_train_file(path: str | Path, dataset: str, image_root: str | Path, check_images: bool = True) -> list[Sample]:
    """Training records of one file (a dataset's train file or a released client file), attributed to ``dataset``."""
    path, image_root = Path(path), Path(image_root)
    samples = [_parse_train(path, i, rec, dataset, image_root) for i, rec in enumerate(_read_records(path))]
    if check_images:
        _check_images(path, samples, image_root)
    return samples


def load_partition_file(
    path: str | Path, image_root: str | Path, dataset: str = "", check_images: bool = True
) -> list[Sample]:
    """One released ``partitioned_data/.../client_<i>.json`` (train record format).

    A client file of the Capability setting mixes datasets and does not say which record came from which; pass the
    dataset when it is known, or use :func:`released_partition`, which attributes every record by matching it against
    the benchmark's training files.
    """
    return load_train_file(path, dataset, image_root, check_images)


def _sample_points(n: int, limit: Optional[int]) -> list[int]:
    if limit is None or limit >= n:
        return list(range(n))
    # Evenly spaced rather than the first `limit`: several test files are sorted by class or source, so a prefix
    # would test only a few classes.
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, limit)})


class Benchmark:
    """The 12 datasets under ``root`` (official layout). Images resolve against ``image_root`` (default ``root``)."""

    def __init__(self, root: str | Path, image_root: str | Path | None = None, check_images: bool = True):
        self.root = Path(root)
        self.image_root = Path(image_root) if image_root is not None else self.root
        self.check_images = check_images
        if not (self.root / "instructions").is_dir():
            raise FcitError(f"{self.root}: not a benchmark root (no instructions/ folder)")
        self._train: dict[str, list[Sample]] = {}
        self._test: dict[str, list[Sample]] = {}

    def train_path(self, dataset: str) -> Path:
        spec = registry.get(dataset)
        return self.root / "instructions" / spec.folder / spec.train_file

    def test_path(self, dataset: str) -> Path:
        spec = registry.get(dataset)
        return self.root / "instructions" / spec.folder / spec.test_file

    def available(self) -> list[str]:
        """Datasets whose train and test files exist, in registry order."""
        return [d for d in registry.DATASETS if self.train_path(d).is_file() and self.test_path(d).is_file()]

    def train(self, dataset: str) -> list[Sample]:
        if dataset not in self._train:
            name = registry.get(dataset).name
            self._train[dataset] = load_train_file(self.train_path(dataset), name, self.image_root, self.check_images)
        return self._train[dataset]

    def test(self, dataset: str, limit: int | None = None) -> list[Sample]:
        """The test records; ``limit`` keeps an evenly spaced subset of that many, in file order."""
        if dataset not in self._test:
            spec = registry.get(dataset)
            path = self.test_path(dataset)
            samples = [_parse_test(path, i, rec, spec, self.image_root) for i, rec in enumerate(_read_records(path))]
            coco = path.parent / COCO_REFS_FILE
            if spec.answer_type == registry.CAPTION and coco.is_file():
                samples = _attach_caption_refs(coco, samples)
            if self.check_images:
                _check_images(path, samples, self.image_root)
            self._test[dataset] = samples
        samples = self._test[dataset]
        return [samples[i] for i in _sample_points(len(samples), limit)]


# The Sample.dataset of the general-ability test split (not one of the 12 datasets; scored by fcit.eval.general).
GENERAL = "Instruct-Test"


def load_general_test(path: str | Path, image_root: str | Path, check_images: bool = True) -> list[Sample]:
    """The general-ability test split: test records (``question_id``, ``image``, ``text``, ``answer``) of mixed
    answer formats, each naming its ``format`` (a key of ``registry.FORMATS``); a box carries ``answer_bbox``. An
    optional ``family`` (FCIT-Synth's image family) is kept in ``meta`` beside the format."""
    path, image_root = Path(path), Path(image_root)
    samples = []
    for i, rec in enumerate(_read_records(path)):
        fmt = _field(path, i, rec, "format")
        if fmt not in registry.FORMATS:
            raise FcitError(f"{path}: record {i}: field 'format' must be one of {', '.join(registry.FORMATS)}, "
                            f"got {fmt!r}")
        spec = registry.DatasetSpec(GENERAL, "", "", path.name, "", registry.FORMATS[fmt])
        s = _parse_test(path, i, rec, spec, image_root)
        extra = {"family": rec["family"]} if "family" in rec else {}
        samples.append(replace(s, meta={**s.meta, "format": fmt, **extra}))
    if check_images:
        _check_images(path, samples, image_root)
    return samples


def open_general(cfg: "Config", progress: bool = True) -> list[Sample]:
    """The general-ability test split of a config's benchmark: FCIT-Synth's held-out generic instructions (built
    or taken from the cache), at most ``eval.max_test`` of them, evenly spaced. The real benchmark ships no
    general set (the paper's MME and POPE are separate downloads), so a real-data run cannot ask for one."""
    data = cfg.data
    if data.kind != "synth":
        raise FcitError("config: eval.retention: needs FCIT-Synth's held-out instruction mixture (data.kind=synth); "
                        "the real benchmark has no general-ability test set (MME and POPE are not part of it)")
    from fcit.data import synth

    root = synth.build_general(data.synth, cache_dir=Path(data.root) if data.root else None, progress=progress)
    samples = load_general_test(root / synth.GENERAL_TEST_FILE, root)
    return [samples[i] for i in _sample_points(len(samples), cfg.eval.max_test)]


SETTINGS = {"Task-related": "seq", "Capability-related": "cap"}


def beta_folder(partitions_root: str | Path, setting: str, kind: str, beta: float) -> Path:
    """``<root>/<setting>/<kind>/<beta>``; the release spells beta as a float ("1.0"), but accept "1" too."""
    base = Path(partitions_root) / setting / kind
    for name in (str(float(beta)), f"{beta:g}"):
        if (base / name).is_dir():
            return base / name
    there = sorted(p.name for p in base.iterdir()) if base.is_dir() else []
    raise FcitError(f"{base}: no partition folder for beta {float(beta)} (found: {', '.join(there) or 'nothing'})")


def released_partition(
    partitions_root: str | Path,
    setting: str,
    kind: str,
    beta: float,
    stage: int,
    num_clients: int,
    bench: Benchmark,
    datasets: Optional[Sequence[str]] = None,
) -> list[list[Sample]]:
    """Client shares of the released ``partitioned_data/<setting>/<kind>/<beta>/Task<stage>/client_<i>.json``.

    ``stage`` is 1-based as in the folder names, client ids 0-based. ``datasets`` are the datasets this task draws
    from (default: the registry order of the setting). Each record is attributed to its dataset by matching it
    against those datasets' training records, first on (image, prompt, answer), then on the image alone when only
    one dataset uses it; a record that matches none means the release and the configured order disagree.
    """
    if setting not in SETTINGS:
        raise FcitError(f"partitions: unknown setting {setting!r}; known: {', '.join(SETTINGS)}")
    if kind not in ("seq", "cap"):
        raise FcitError(f"partitions: unknown kind {kind!r}; expected 'seq' or 'cap'")
    if datasets is None:
        order = registry.TASK_ORDER if setting == "Task-related" else registry.CAPABILITY_ORDER
        if not 1 <= stage <= len(order):
            raise FcitError(f"partitions: stage {stage} out of range 1..{len(order)} for {setting}")
        datasets = [order[stage - 1]] if setting == "Task-related" else order[stage - 1]
    folder = beta_folder(partitions_root, setting, kind, beta) / f"Task{stage}"
    if not folder.is_dir():
        raise FcitError(f"{folder}: partition folder not found")
    missing = [i for i in range(num_clients) if not (folder / f"client_{i}.json").is_file()]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise FcitError(f"{folder}: missing client files for client ids {shown} ({len(missing)} of {num_clients})")
    expected = {f"client_{i}.json" for i in range(num_clients)}
    extra = sorted(p.name for p in folder.glob("client_*.json") if p.name not in expected)
    if extra:
        raise FcitError(f"{folder}: holds {len(extra)} client files beyond num_clients={num_clients} (e.g. {extra[0]})")

    exact: dict[tuple, Sample] = {}
    by_image: dict[Optional[str], set[str]] = {}
    for ds in datasets:
        for s in bench.train(ds):
            exact.setdefault((s.image, s.prompt, s.answer), s)
            by_image.setdefault(s.image, set()).add(s.dataset)

    shares = []
    for i in range(num_clients):
        path = folder / f"client_{i}.json"
        share = []
        for j, s in enumerate(load_partition_file(path, bench.image_root, check_images=bench.check_images)):
            hit = exact.get((s.image, s.prompt, s.answer))
            if hit is None:
                owners = by_image.get(s.image, set())
                if len(owners) != 1:
                    raise FcitError(
                        f"{path}: record {j}: matches no training record of {', '.join(datasets)} "
                        f"(image {s.image}); does the release use another task order?"
                    )
                hit = replace(s, dataset=next(iter(owners)))
            share.append(hit)
        shares.append(share)
    return shares


def open_benchmark(cfg: "Config", progress: bool = True) -> Benchmark:
    """The benchmark a config names: FCIT-Synth (generated or taken from its cache) or the real release."""
    data = cfg.data
    if data.kind == "synth":
        from fcit.data import synth  # heavy (image rendering); only needed for synthetic runs

        root = synth.build(data.synth, cache_dir=Path(data.root) if data.root else None, progress=progress)
        return Benchmark(root, image_root=root)
    if data.root is None:
        raise FcitError("config: data.root: required when data.kind is 'real' (the folder holding instructions/)")
    return Benchmark(data.root, image_root=data.image_root or data.root)
