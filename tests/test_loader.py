import json
import sys
import types
from pathlib import Path

import pytest
from bench_fixture import make_bench

from fcit.config import load_config
from fcit.data import registry
from fcit.data.loader import Benchmark, load_partition_file, open_benchmark, released_partition
from fcit.errors import FcitError


@pytest.fixture
def root(tmp_path):
    return make_bench(tmp_path / "bench")


def _train_path(root, ds):
    spec = registry.get(ds)
    return root / "instructions" / spec.folder / spec.train_file


def _test_path(root, ds):
    spec = registry.get(ds)
    return root / "instructions" / spec.folder / spec.test_file


def _rewrite(path, fn):
    recs = json.loads(path.read_text())
    fn(recs)
    path.write_text(json.dumps(recs))


def _error(fn) -> str:
    with pytest.raises(FcitError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# -- reading ------------------------------------------------------------------------------------------------------

def test_train_records(root):
    bench = Benchmark(root)
    s = bench.train("ImageNet-R")
    assert len(s) == 12
    assert s[0].prompt == "Question 0 about ImageNet-R?"  # <image> tag and newline gone
    assert s[0].answer == "word0" and s[0].refs == ("word0",)
    assert s[0].dataset == "ImageNet-R" and s[0].id == "ImageNet-R-0"
    assert Path(s[0].image).is_absolute() and Path(s[0].image).is_file()
    assert bench.train("ImageNet-R") is s  # cached


def test_train_uses_first_human_then_gpt_turn(root):
    def multi_turn(recs):
        recs[0]["conversations"] = [
            {"from": "gpt", "value": "stray"},
            {"from": "human", "value": "<image>\nfirst question"},
            {"from": "gpt", "value": "first answer"},
            {"from": "human", "value": "second"},
            {"from": "gpt", "value": "second answer"},
        ]
        del recs[1]["id"]

    _rewrite(_train_path(root, "IconQA"), multi_turn)
    s = Benchmark(root).train("IconQA")
    assert (s[0].prompt, s[0].answer) == ("first question", "first answer")
    assert s[1].id == "1"  # no id: the record index


def test_null_image_is_text_only(root):
    _rewrite(_train_path(root, "TabMWP"), lambda r: r[0].update(image=None))
    assert Benchmark(root).train("TabMWP")[0].image is None


def test_test_records_and_grounding_meta(root):
    bench = Benchmark(root)
    t = bench.test("Grounding")
    assert t[0].id == "1000" and t[0].prompt == "Test 0 of Grounding?"
    assert t[0].meta["answer_bbox"] == (0.10, 0.2, 0.5, 0.78)
    assert t[0].meta["size"] == [8, 8]
    assert bench.test("DVQA")[0].refs == ("10",)


def test_caption_refs_from_coco_file(root):
    t = Benchmark(root).test("Flickr30k")
    assert t[2].refs == ("ref 0 of image 2", "ref 1 of image 2")


def test_caption_refs_default_to_answer_without_coco_file(root):
    (_test_path(root, "Flickr30k").parent / "val_coco_type.json").unlink()
    t = Benchmark(root).test("Flickr30k")
    assert t[2].refs == (t[2].answer,)


def test_test_limit_is_spread(root):
    bench = Benchmark(root)
    assert [s.id for s in bench.test("AOKVQA", limit=3)] == ["1000", "1002", "1005"]
    assert len(bench.test("AOKVQA", limit=100)) == 6
    assert len(bench.test("AOKVQA")) == 6


def test_image_root_separate(tmp_path):
    root = make_bench(tmp_path / "b", datasets=["DVQA"])
    (root / "images").rename(tmp_path / "imgs")
    with pytest.raises(FcitError):
        Benchmark(root).train("DVQA")
    # the image fields are relative to the image root: images/<folder>/<j>.png
    (tmp_path / "imgroot").mkdir()
    (tmp_path / "imgs").rename(tmp_path / "imgroot" / "images")
    assert len(Benchmark(root, image_root=tmp_path / "imgroot").train("DVQA")) == 12


# -- errors: one line naming the file, the record and the field ---------------------------------------------------

def test_malformed_json(root):
    p = _train_path(root, "ArxivQA")
    p.write_text('[{"image": "a.png",\n "conversations": [}]')
    msg = _error(lambda: Benchmark(root).train("ArxivQA"))
    assert str(p) in msg and "line 2" in msg and "col" in msg


def test_top_level_not_a_list(root):
    p = _test_path(root, "ArxivQA")
    p.write_text('{"question_id": 1}')
    msg = _error(lambda: Benchmark(root).test("ArxivQA"))
    assert str(p) in msg and "list" in msg


@pytest.mark.parametrize("field", ["conversations", "image"])
def test_train_record_missing_field(root, field):
    p = _train_path(root, "FigureQA")
    _rewrite(p, lambda r: r[3].pop(field))
    msg = _error(lambda: Benchmark(root).train("FigureQA"))
    assert str(p) in msg and "record 3" in msg and f"'{field}'" in msg


@pytest.mark.parametrize("field", ["question_id", "answer", "image", "text"])
def test_test_record_missing_field(root, field):
    p = _test_path(root, "FigureQA")
    _rewrite(p, lambda r: r[4].pop(field))
    msg = _error(lambda: Benchmark(root).test("FigureQA"))
    assert str(p) in msg and "record 4" in msg and f"'{field}'" in msg


def test_record_not_an_object(root):
    p = _train_path(root, "DVQA")
    _rewrite(p, lambda r: r.__setitem__(1, ["x"]))
    msg = _error(lambda: Benchmark(root).train("DVQA"))
    assert str(p) in msg and "record 1" in msg


@pytest.mark.parametrize("turns", [
    [{"from": "human", "value": "<image>\nq"}],
    [{"from": "gpt", "value": "a"}],
    [],
])
def test_conversations_need_human_and_gpt(root, turns):
    p = _train_path(root, "DVQA")
    _rewrite(p, lambda r: r[5].update(conversations=turns))
    msg = _error(lambda: Benchmark(root).train("DVQA"))
    assert str(p) in msg and "record 5" in msg and "'conversations'" in msg


def test_malformed_turn(root):
    p = _train_path(root, "DVQA")
    _rewrite(p, lambda r: r[2].update(conversations=[{"from": "human"}, {"from": "gpt", "value": "a"}]))
    msg = _error(lambda: Benchmark(root).train("DVQA"))
    assert "record 2" in msg and "conversations[0]" in msg


def test_missing_images_reported_once_with_count(root):
    # records 1, 4, 7, 10 use image 1.png and records 2, 5, 8, 11 use 2.png
    (root / "images" / "OCRVQA" / "1.png").unlink()
    (root / "images" / "OCRVQA" / "2.png").unlink()
    p = _train_path(root, "OCR-VQA")
    msg = _error(lambda: Benchmark(root).train("OCR-VQA"))
    assert str(p) in msg and "record 1" in msg and "'image'" in msg and "1.png" in msg
    assert "2 of 3 images missing" in msg
    assert len(Benchmark(root, check_images=False).train("OCR-VQA")) == 12


def test_missing_test_image(root):
    (root / "images" / "TabMWP" / "2.png").unlink()
    msg = _error(lambda: Benchmark(root).test("TabMWP"))
    assert str(_test_path(root, "TabMWP")) in msg and "record 2" in msg


def test_unknown_dataset(root):
    msg = _error(lambda: Benchmark(root).train("MNIST"))
    assert "MNIST" in msg


def test_missing_file_and_bad_root(root, tmp_path):
    _train_path(root, "DVQA").unlink()
    msg = _error(lambda: Benchmark(root).train("DVQA"))
    assert str(_train_path(root, "DVQA")) in msg and "not found" in msg
    assert "instructions" in _error(lambda: Benchmark(tmp_path / "nowhere"))


def test_bad_grounding_box(root):
    p = _test_path(root, "Grounding")
    _rewrite(p, lambda r: r[1].update(answer_bbox="[0.1, 0.2, 0.3]"))
    msg = _error(lambda: Benchmark(root).test("Grounding"))
    assert str(p) in msg and "record 1" in msg and "'answer_bbox'" in msg


def test_non_string_answer(root):
    p = _test_path(root, "TabMWP")
    _rewrite(p, lambda r: (r[0].update(answer=3), r[1].update(answer={"x": 1})))
    msg = _error(lambda: Benchmark(root).test("TabMWP"))
    assert "record 1" in msg and "'answer'" in msg


def test_caption_refs_out_of_step(root):
    coco = _test_path(root, "Flickr30k").parent / "val_coco_type.json"
    data = json.loads(coco.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 4]
    coco.write_text(json.dumps(data))
    msg = _error(lambda: Benchmark(root).test("Flickr30k"))
    assert str(coco) in msg and "image_id 4" in msg


TASK_SEQ = ("Task-related", "seq")


# -- released partitions --------------------------------------------------------------------------------------------

def _write_release(root, parts, setting="Task-related", kind="seq", beta="1.0", stage=1):
    folder = root / "partitioned_data" / setting / kind / beta / f"Task{stage}"
    folder.mkdir(parents=True)
    for i, recs in enumerate(parts):
        (folder / f"client_{i}.json").write_text(json.dumps(recs))
    return folder


def test_load_partition_file(root):
    recs = json.loads(_train_path(root, "ImageNet-R").read_text())
    p = root / "client_0.json"
    p.write_text(json.dumps(recs[:3]))
    s = load_partition_file(p, root, dataset="ImageNet-R")
    assert [x.answer for x in s] == ["word0", "word1", "word2"] and s[0].dataset == "ImageNet-R"
    p.write_text(json.dumps([{"image": "images/DVQA/0.png"}]))
    msg = _error(lambda: load_partition_file(p, root))
    assert str(p) in msg and "record 0" in msg and "'conversations'" in msg


def test_released_partition_task_related(root):
    recs = json.loads(_train_path(root, "ImageNet-R").read_text())
    _write_release(root, [recs[:5], recs[5:6], recs[6:]])
    bench = Benchmark(root)
    shares = released_partition(root / "partitioned_data", *TASK_SEQ, 1.0, 1, 3, bench)
    assert [len(s) for s in shares] == [5, 1, 6]
    assert shares[1][0] is bench.train("ImageNet-R")[5]  # the benchmark's own sample, same id


def test_released_partition_capability_attributes_datasets(root):
    bench = Benchmark(root)
    mixed = [r for ds in registry.CAPABILITY_ORDER[1] for r in json.loads(_train_path(root, ds).read_text())]
    mixed = mixed[::-1]
    _write_release(root, [mixed[:20], mixed[20:]], "Capability-related", "cap", "0.5", stage=2)
    shares = released_partition(root / "partitioned_data", "Capability-related", "cap", 0.5, 2, 2, bench)
    got = [s.dataset for share in shares for s in share]
    assert got == [ds for ds in registry.CAPABILITY_ORDER[1] for _ in range(12)][::-1]


def test_released_partition_missing_client(root):
    recs = json.loads(_train_path(root, "ArxivQA").read_text())
    folder = _write_release(root, [recs[:3], recs[3:6], recs[6:9], recs[9:]], stage=2)
    (folder / "client_1.json").unlink()
    (folder / "client_3.json").unlink()
    msg = _error(lambda: released_partition(root / "partitioned_data", *TASK_SEQ, 1.0, 2, 4, Benchmark(root)))
    assert str(folder) in msg and "1, 3" in msg


def test_released_partition_wrong_order_or_beta(root):
    recs = json.loads(_train_path(root, "IconQA").read_text())  # IconQA records in the ImageNet-R folder
    folder = _write_release(root, [recs[:6], recs[6:]])
    msg = _error(lambda: released_partition(root / "partitioned_data", *TASK_SEQ, 1.0, 1, 2, Benchmark(root)))
    assert str(folder / "client_0.json") in msg and "record 0" in msg
    msg = _error(lambda: released_partition(root / "partitioned_data", *TASK_SEQ, 5.0, 1, 2, Benchmark(root)))
    assert "5.0" in msg and "1.0" in msg  # names what is there
    msg = _error(lambda: released_partition(root / "partitioned_data", *TASK_SEQ, 1.0, 1, 1, Benchmark(root)))
    assert "beyond num_clients" in msg


# -- open_benchmark ---------------------------------------------------------------------------------------------------

def test_open_benchmark_real(root):
    cfg = load_config(overrides={"data.kind": "real", "data.root": str(root)})
    assert len(open_benchmark(cfg).train("DVQA")) == 12
    msg = _error(lambda: open_benchmark(load_config(overrides={"data.kind": "real"})))
    assert "data.root" in msg


def test_open_benchmark_synth_dispatch(root, monkeypatch):
    calls = []

    def build(cfg, cache_dir=None, progress=True):
        calls.append((cfg.n_train, cache_dir))
        return root

    try:
        import fcit.data.synth as synth
    except ImportError:  # written in parallel; the dispatch must not depend on it
        synth = types.ModuleType("fcit.data.synth")
        monkeypatch.setitem(sys.modules, "fcit.data.synth", synth)
    monkeypatch.setattr(synth, "build", build, raising=False)
    cfg = load_config(overrides={"data.synth.n_train": 33, "data.root": "/cache"})
    bench = open_benchmark(cfg)
    assert calls == [(33, Path("/cache"))] and bench.root == root and bench.image_root == root


# -- the image checks' record of headers that opened ------------------------------------------------------------

@pytest.fixture
def record(root, tmp_path, monkeypatch):
    """check_images on OCR-VQA's train file, counting the headers it opens; files count as settled at once."""
    from fcit.data import validation

    monkeypatch.setattr(validation, "_records_dir", lambda: tmp_path / "checked")
    monkeypatch.setattr(validation, "_SETTLED_NS", 0)
    opened = []
    real = validation._header_error
    monkeypatch.setattr(validation, "_header_error", lambda p: opened.append(p) or real(p))
    path = _train_path(root, "OCR-VQA")
    samples = Benchmark(root).train("OCR-VQA")

    def check(**kw):
        opened.clear()
        validation.check_images(path, samples, {}, **kw)
        return sorted(opened)

    return check, sorted({s.image for s in samples}), path


def test_image_checks_open_only_changed_files_on_a_later_run(record):
    check, images, _ = record
    assert check() == images  # first run: every header
    assert check() == []  # unchanged files: none
    assert check(recheck=True) == images  # `fcit data check`: every header again

    with open(images[1], "r+b") as f:  # the same size, new bytes: checked again, and it fails
        f.write(b"not an image")
    with pytest.raises(FcitError, match="cannot decode"):
        check()
    with pytest.raises(FcitError, match="cannot decode"):  # a failed header is never remembered as good
        check()


def test_image_checks_distrust_a_record_of_another_pil_or_a_malformed_one(record, monkeypatch):
    from fcit.data import validation

    check, images, path = record
    check()
    monkeypatch.setattr(validation, "_pil_version", lambda: "0.0")
    assert check() == images
    validation._record_path(path).write_text('{"pil": "0.0", "images": []}')
    assert check() == images
    assert check() == []


def test_image_checks_do_not_remember_files_modified_in_the_last_seconds(record, monkeypatch):
    from fcit.data import validation

    check, images, _ = record
    monkeypatch.setattr(validation, "_SETTLED_NS", 3_000_000_000)  # the default; the images were just written
    check()
    assert check() == images


def test_image_checks_run_when_the_cache_folder_cannot_be_written(root, tmp_path, monkeypatch):
    from fcit.data import validation

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(validation, "_records_dir", lambda: blocker / "checked")
    samples = Benchmark(root).train("OCR-VQA")
    validation.check_images(_train_path(root, "OCR-VQA"), samples, {})
    Path(samples[1].image).write_bytes(b"garbage")
    with pytest.raises(FcitError, match="cannot decode"):
        validation.check_images(_train_path(root, "OCR-VQA"), samples, {})


def test_image_checks_run_without_a_home_folder(root, monkeypatch):
    from fcit.data import validation

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(validation, "_records_dir", no_home)
    samples = Benchmark(root).train("OCR-VQA")
    Path(samples[1].image).write_bytes(b"garbage")
    with pytest.raises(FcitError, match="cannot decode"):
        validation.check_images(_train_path(root, "OCR-VQA"), samples, {})
