import numpy as np
import pytest
from PIL import Image

from fcit.eval.metrics import AccuracyMatrix, summary
from fcit.report.plots import heatmap, matrix_heatmap
from fcit.report.tables import format_cell, matrix_markdown, results_markdown, seed_cell


def three_stage() -> AccuracyMatrix:
    m = AccuracyMatrix()
    m.add_stage({"ImageNet-R": 83.14})
    m.add_stage({"ImageNet-R": 70.0, "ArxivQA": 60.26})
    m.add_stage({"ImageNet-R": 75.0, "ArxivQA": 40.0, "IconQA": 95.0})
    return m


def test_matrix_markdown_cells_blanks_and_summary():
    m = three_stage()
    text = matrix_markdown(m, summary(m, ["IconQA"]), title="Task hom")
    lines = text.splitlines()
    assert lines[0] == "### Task hom"
    assert "| Stage | ImageNet-R | ArxivQA | IconQA |" in lines
    # Unseen datasets are blank, not 0.0, so a reader cannot mistake them for a collapsed score.
    assert "| After stage 1 | 83.1 |  |  |" in lines
    assert "| After stage 2 | 70.0 | 60.3 |  |" in lines
    assert "| After stage 3 | 75.0 | 40.0 | 95.0 |" in lines
    # Last = 70.0, Avg = (83.14 + 65.13 + 70) / 3 = 72.76, Forgetting = ((83.14 - 75) + (60.26 - 40)) / 2 = 14.2.
    assert "- **Last**: 70.0" in lines
    assert "- **Avg**: 72.8" in lines
    assert "- **Forgetting**: 14.2" in lines


def test_matrix_markdown_undefined_forgetting_and_groups():
    m = AccuracyMatrix()
    m.add_stage({"A": 50.0})
    s = summary(m, ["A"], {"G": ["A"]})
    text = matrix_markdown(m, s, title=None)
    assert not text.startswith("###")
    assert "- **Forgetting**: n/a" in text
    assert "- **Last (groups)**: 50.0" in text
    assert "- **Avg (groups)**: 50.0" in text


def test_results_markdown():
    rows = [
        {"method": "Finetune", "last": (47.2, 1.26), "avg": [68.79, 0.5]},  # a list is what JSON gives back
        {"method": "DISCO", "last": 56.22, "avg": seed_cell([73.03])},
        {"method": "Zero-shot", "last": 29.08},
    ]
    lines = results_markdown(rows, ["last", "avg"]).splitlines()
    assert lines[0] == "| Method | Last | Avg |"
    assert lines[2] == "| Finetune | 47.2 ± 1.3 | 68.8 ± 0.5 |"
    assert lines[3] == "| DISCO | 56.2 | 73.0 |"  # one seed: no ± 0.0
    assert lines[4] == "| Zero-shot | 29.1 | - |"


def test_format_cell_variants():
    assert seed_cell([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert format_cell((56.224, None), digits=2) == "56.22"
    assert format_cell(None) == "-"
    with pytest.raises(TypeError):
        format_cell("56")


def test_matrix_heatmap_writes_png(tmp_path):
    out = matrix_heatmap(three_stage(), tmp_path / "figs" / "matrix.png", "Task hom, beta=1.0")
    assert out.exists()
    with Image.open(out) as img:
        img.load()
        assert img.format == "PNG"
        assert img.width >= 300 and img.height >= 200
        # A blank PNG would pass the size check; a real heatmap has many distinct colours.
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 50


def test_generic_heatmap_accepts_nan_and_large_matrices(tmp_path):
    rng = np.random.default_rng(0)
    sim = rng.uniform(-1, 1, size=(30, 30))
    sim[0, 0] = np.nan
    labels = [f"c{i}" for i in range(30)]
    out = heatmap(sim, labels, labels, tmp_path / "sim.png", "similarity", vmin=-1, vmax=1)
    with Image.open(out) as img:
        assert img.width > 300


def test_heatmap_checks_shapes(tmp_path):
    with pytest.raises(ValueError):
        heatmap(np.zeros((2, 3)), ["a", "b"], ["x", "y"], tmp_path / "x.png", "t")
    with pytest.raises(ValueError):
        heatmap(np.zeros(3), ["a"], ["x", "y", "z"], tmp_path / "x.png", "t")
