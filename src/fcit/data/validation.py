"""Check every file a run will read before stage 1 trains, so a broken record of stage 8 costs seconds, not the
hours of stages 1-7.

The loader already parses each record and checks that its image exists when a file is read; it reads a stage's
files only when the stage starts. ``validate_scenario`` reads them all up front (train and test files of every
stage, the released partition files when configured) and opens every distinct image's header with PIL (no pixel
decoding), naming file, record and field on the first problem.

Images that opened once are remembered on disk (``checked/`` in fcit's cache folder, one file per records file) with
their size, modification and change times and inode, and the PIL version that opened them; a later run opens only
those whose file changed since (or all of them under another PIL, which may lack a codec). A file modified within
the last seconds is not remembered: on a file system with coarse timestamps a rewrite in the same tick would keep
its signature (git's "racy clean" rule). ``fcit data check`` opens every header whatever the record says. The
header checks were about 1 s of the embedded default run's 5 s setup on the 2-core machine, and a real release has
hundreds of thousands of images.
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from fcit.errors import FcitError
from fcit.jsonio import read_json, write_json

if TYPE_CHECKING:
    from fcit.data.loader import Benchmark
    from fcit.data.records import Sample
    from fcit.data.scenario import Scenario


@dataclass
class Report:
    """What was checked, for ``fcit data check``."""

    datasets: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (train records, test records)
    partition_records: int = 0
    images: int = 0

    def summary(self) -> str:
        lines = [f"{'dataset':<16}{'train':>8}{'test':>8}"]
        lines += [f"{d:<16}{n_tr:>8}{n_te:>8}" for d, (n_tr, n_te) in self.datasets.items()]
        extra = f", {self.partition_records} released partition records" if self.partition_records else ""
        lines.append(f"OK: {len(self.datasets)} datasets{extra}, {self.images} distinct images readable")
        return "\n".join(lines)


def _header_error(path: str) -> Optional[str]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - the header is parsed lazily on open; size proves it was
    except (UnidentifiedImageError, OSError, ValueError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


Signature = list[int]
# Younger files are not remembered: a same-size rewrite within the file system's timestamp granularity (up to 2 s on
# FAT, one kernel tick on older ext4) would keep the signature.
_SETTLED_NS = 3_000_000_000


def _signature(path: str) -> Optional[Signature]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _records_dir() -> Path:
    from fcit.data.synth import default_cache_dir

    return default_cache_dir() / "checked"


def _record_path(file: Path) -> Path:
    key = hashlib.sha256(str(Path(file).resolve()).encode()).hexdigest()[:24]
    return _records_dir() / f"{key}.json"


def _pil_version() -> str:
    import PIL

    return PIL.__version__


def _load_record(file: Path) -> dict[str, Signature]:
    # A cache: anything unreadable, malformed, or from another PIL is no record at all.
    try:
        data = read_json(_record_path(file))
    except (FcitError, RuntimeError):  # RuntimeError: no home folder to put the cache in
        return {}
    images = data.get("images") if isinstance(data, dict) and data.get("pil") == _pil_version() else None
    if not isinstance(images, dict):
        return {}
    return {k: v for k, v in images.items() if isinstance(v, list) and len(v) == 4}


def _save_record(file: Path, images: dict[str, Signature]) -> None:
    # A run whose cache folder cannot be written checks the headers again next time, nothing more.
    try:
        path = _record_path(file)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"file": str(Path(file).resolve()), "pil": _pil_version(), "images": images}, indent=None)
    except (OSError, RuntimeError, FcitError):
        pass


def check_images(file: Path, samples: Sequence["Sample"], seen: dict[str, Optional[str]], threads: int = 8,
                 recheck: bool = False) -> None:
    """Open the header of every image of ``samples`` not in ``seen`` (image -> error or None) whose file changed
    since it last opened (every one with ``recheck``), in threads because on a real benchmark this is hundreds of
    thousands of small reads."""
    todo = sorted({s.image for s in samples if s.image is not None and s.image not in seen})
    if todo:
        record = {} if recheck else _load_record(file)
        sigs = {t: _signature(t) for t in todo}
        opened = [t for t in todo if sigs[t] is None or sigs[t] != record.get(t)]
        seen.update(dict.fromkeys(todo))
        if opened:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                seen.update(zip(opened, pool.map(_header_error, opened)))
            settled = time.time_ns() - _SETTLED_NS
            good = {t: sig for t, sig in sigs.items()
                    if sig is not None and not seen[t] and max(sig[1], sig[2]) < settled}
            kept = {t: v for t, v in record.items() if t not in sigs}
            _save_record(file, {**kept, **good})
    for i, s in enumerate(samples):
        if s.image is not None and seen.get(s.image):
            raise FcitError(f"{file}: record {i} (id {s.id}): field 'image': cannot decode {s.image}: {seen[s.image]}")


def validate_scenario(bench: "Benchmark", scenario: "Scenario", recheck: bool = False) -> Report:
    """Parse every file the scenario's stages will read and check every image header; raise on the first problem.

    Remembered on ``bench``, so the runs of one comparison validate a dataset once. ``recheck`` opens every header,
    also those of unchanged files that opened before.
    """
    done: dict = bench.__dict__.setdefault("_validated", {"datasets": {}, "images": {}, "tasks": set()})
    report = Report()
    last = scenario.num_stages - 1
    datasets = scenario.seen_datasets(last)
    for d in datasets:
        if d not in done["datasets"]:
            train, test = bench.train(d), bench.test(d)
            check_images(bench.train_path(d), train, done["images"], recheck=recheck)
            check_images(bench.test_path(d), test, done["images"], recheck=recheck)
            done["datasets"][d] = (len(train), len(test))
        report.datasets[d] = done["datasets"][d]
    if scenario.partitions_root is not None:
        tasks = sorted({k for t in range(last + 1) for k in scenario.stage_tasks(t)})
        for k in tasks:
            # Released shares are matched against the train records (loader.released_partition); images are the
            # train files' own, checked above.
            report.partition_records += sum(len(share) for share in scenario.shares(k))
    report.images = sum(1 for err in done["images"].values() if err is None)
    return report


def check_config(cfg, progress: bool = True) -> Report:
    """``fcit data check``: the validation a run does at setup, alone (no model is loaded), opening every image
    header whatever the record of earlier checks says."""
    from fcit.data.loader import open_benchmark
    from fcit.data.scenario import Scenario

    bench = open_benchmark(cfg, progress=progress)
    scenario = Scenario(cfg.scenario, cfg.seed, bench, partitions_root=cfg.data.partitions)
    return validate_scenario(bench, scenario, recheck=True)
