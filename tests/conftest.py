import numpy as np
import pytest
from PIL import Image

from fcit.data.records import Sample
from fcit.models.backbone import TinySpec, build_tiny, build_tokenizer

MICRO = TinySpec(image_size=16, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2, lm_hidden=32,
                 lm_intermediate=64, lm_layers=2, lm_heads=2, vocab_size=300, max_positions=128)


@pytest.fixture(scope="session", autouse=True)
def _image_check_records(tmp_path_factory):
    """The record of image headers that opened (``data.validation``) goes to a folder of the session, not the user's
    cache: test data lives in temporary folders that the record would otherwise keep naming."""
    from fcit.data import validation

    folder = tmp_path_factory.mktemp("checked")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(validation, "_records_dir", lambda: folder)
        yield


@pytest.fixture(scope="session")
def micro_backbone():
    """A micro LLaVA (random init) with a tokenizer trained on a few words: fast enough for unit tests."""
    corpus = ["what colour is the square ? red blue green", "USER: ASSISTANT: a red square", "0.12 [0.40, 0.55]"] * 20
    tok = build_tokenizer(corpus, MICRO.vocab_size)
    return build_tiny(tok, MICRO, seed=0)


@pytest.fixture()
def micro_samples(tmp_path):
    rng = np.random.default_rng(0)
    out = []
    for i, colour in enumerate(["red", "blue", "green", "red", "blue", "green"]):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(p)
        out.append(Sample("toy", str(i), str(p), "what colour is the square ?", colour, (colour,)))
    return out
