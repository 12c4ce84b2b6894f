"""A second model family through the same code path (issue 11, item 6): Qwen2-VL and Qwen2.5-VL micro checkpoints
that the tests build (tests/qwen_fixture.py), loaded with the Auto classes, LoRA targets and projector found from
the module structure, the prompt in Qwen's chat template with the loss on exactly the answer, and `fcit run
--preset smoke` for Finetune and DISCO end to end. The structural targets pick exactly what the Llama regex picked
on LLaVA, so LLaVA runs do not move."""

import copy
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from qwen_fixture import QWEN2_VL_TEMPLATE, build_qwen

from fcit.config import ModelConfig, load_config
from fcit.data.records import Sample
from fcit.errors import FcitError
from fcit.models.backbone import ImageTextProcessor, load_backbone
from fcit.models.inputs import IGNORE, Batcher
from fcit.models.lora import attach_lora, trainable_names
from fcit.models.structure import ffn_linear_names, ffn_target, projector_modules, projector_param_names
from fcit.models.subspace_lora import SubspaceLoraConfig, attach_subspace_lora, subspace_layers

LLAMA_REGEX = r".*language_model.*\.(gate_proj|up_proj|down_proj)"


@pytest.fixture(scope="module")
def qwen_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    return {f: build_qwen(root / f, f) for f in ("qwen2_vl", "qwen2_5_vl")}


@pytest.fixture(scope="module")
def qwen(qwen_dirs):
    return load_backbone(str(qwen_dirs["qwen2_vl"]))


def _image(tmp_path, name, h, w, seed=0):
    p = tmp_path / name
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
    return str(p)


def _linear_names(model, regex):
    pat = re.compile(regex)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pat.fullmatch(n)]


# ---- loading --------------------------------------------------------------------------------------------------
def test_loads_through_the_auto_classes(qwen_dirs, qwen):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    model, processor = qwen
    assert isinstance(model, Qwen2VLForConditionalGeneration)
    assert processor.tokenizer.eos_token == "<|im_end|>" and processor.image_token == "<|image_pad|>"
    assert processor.chat_template == QWEN2_VL_TEMPLATE
    try:
        import torchvision  # noqa: F401
    except ImportError:
        # Qwen2VLProcessor's video part needs torchvision (not installable beside a CPU torch): the image-and-text
        # processor is built from AutoTokenizer + AutoImageProcessor + the checkpoint's chat template instead.
        from transformers import AutoProcessor

        assert isinstance(processor, ImageTextProcessor)
        with pytest.raises(ImportError, match="Torchvision"):
            AutoProcessor.from_pretrained(qwen_dirs["qwen2_vl"])
    half, _ = load_backbone(str(qwen_dirs["qwen2_5_vl"]), "bfloat16")
    assert isinstance(half, Qwen2_5_VLForConditionalGeneration) and half.dtype == torch.bfloat16


# ---- structure: LoRA targets and projector --------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_targets_are_the_lm_ffn_and_the_projector_is_the_merger(qwen_dirs, family):
    model, _ = load_backbone(str(qwen_dirs[family]))
    want = [f"model.language_model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
    assert ffn_linear_names(model) == want == _linear_names(model, ffn_target(model))
    if family == "qwen2_5_vl":
        # Its vision blocks' MLPs carry the same names: a name-only pattern would adapt the vision encoder too.
        assert _linear_names(model, r".*\.(gate_proj|up_proj|down_proj)") != want
    assert projector_modules(model) == ["model.visual.merger"]
    peft = attach_lora(copy.deepcopy(model), ModelConfig(train_projector=True))
    names = trainable_names(peft)
    assert {n.split(".lora_")[0] for n in names if ".lora_" in n} == {f"base_model.model.{w}" for w in want}
    assert [n for n in names if ".lora_" not in n] == projector_param_names(peft)
    assert all(n.startswith("base_model.model.model.visual.merger.") for n in projector_param_names(peft))
    sub = attach_subspace_lora(copy.deepcopy(model), SubspaceLoraConfig(num_subspaces=2, rank=2))
    assert [n for n, _ in subspace_layers(sub)] == want


def test_llava_structural_targets_equal_the_llama_regex(micro_backbone):
    from fcit.models.backbone import load_backbone as lb

    for model in (micro_backbone[0], lb(None)[0]):
        assert ffn_linear_names(model) == _linear_names(model, LLAMA_REGEX) != []
        assert _linear_names(model, ffn_target(model)) == _linear_names(model, LLAMA_REGEX)
        assert projector_modules(model) == ["model.multi_modal_projector"]
        by_regex = attach_lora(copy.deepcopy(model), ModelConfig(lora={"target": LLAMA_REGEX}, train_projector=True))
        by_structure = attach_lora(copy.deepcopy(model), ModelConfig(train_projector=True))
        assert trainable_names(by_structure) == trainable_names(by_regex)
        assert projector_param_names(by_structure) == [n for n in trainable_names(by_regex)
                                                       if "multi_modal_projector" in n]


# ---- prompt, image tokens, label mask -------------------------------------------------------------------------
def test_qwen_prompt_image_tokens_and_answer_mask(qwen, tmp_path):
    model, processor = qwen
    tok = processor.tokenizer
    b = Batcher(model, processor)
    assert b.uses_chat_template and b.n_img is None
    wide = Sample("toy", "0", _image(tmp_path, "wide.png", 32, 48), "what colour is the square ?", "red", ())
    square = Sample("toy", "1", _image(tmp_path, "sq.png", 48, 48, 1), "how many ?", "3", ())
    # The processor's count for the image's own size (no square padding): 32 x 48 px -> 2 x 3 merged tokens.
    assert (b.image_tokens(wide), b.image_tokens(square)) == (6, 9)
    assert b.prefix(wide) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                              "<|vision_start|>" + "<|image_pad|>" * 6 + "<|vision_end|>what colour is the square ?"
                              "<|im_end|>\n<|im_start|>assistant\n")
    batch = b.train_batch([wide, square])
    grid = batch["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 6], [1, 6, 6]] and batch["pixel_values"].shape[0] == int(grid.prod(1).sum())
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == model.config.image_token_id).long())
    for row, s in enumerate((wide, square)):
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        target = [t for t in labels if t != IGNORE]
        start = labels.index(target[0])
        assert tok.decode(target) == s.answer + "<|im_end|>" and ids[start:start + len(target)] == target
        assert labels[:start] == [IGNORE] * start and start == len(b.prompt_ids(s))
        assert ids.count(model.config.image_token_id) == b.image_tokens(s)
    # Generation is prompted with exactly the training prompt (left-padded).
    p = b.prompt_batch([wide])["input_ids"][0].tolist()
    assert p == batch["input_ids"][0].tolist()[: len(b.prompt_ids(wide))]
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)  # the model checks image tokens against image features
    # Derived length: template + the processor's largest image (64 x 64 px cap -> 16 tokens) + 256, capped at 512.
    assert b.max_length == min(len(b._prompt_ids(Sample("", "", "x", "", ""), 16)) + 256, 512)
    small = Batcher(model, processor, max_length=20)
    with pytest.raises(FcitError) as e:
        small.check_max_length([square])
    assert "9 of them image tokens" in str(e.value) and "\n" not in str(e.value)


def test_disco_gate_reads_the_instruction_back_from_a_qwen_prompt(qwen, tmp_path):
    from fcit.methods.disco.gate import gate_context

    base, processor = qwen
    model = attach_subspace_lora(copy.deepcopy(base), SubspaceLoraConfig(num_subspaces=2, rank=2))
    b = Batcher(model, processor)
    samples = [Sample("a", "0", _image(tmp_path, "a.png", 48, 48), "what colour is the square ?", "red", ()),
               Sample("b", "1", _image(tmp_path, "b.png", 32, 32, 2), "how many objects ?", "2", ())]
    seen = []

    def similarity(texts, img, has):
        seen.extend(texts)
        return torch.zeros(len(texts), 2)

    with gate_context(model, samples, processor.tokenizer, ["text"], similarity, lambda s: torch.softmax(s, -1),
                      torch.ones(2, dtype=torch.bool), None, {}):
        with torch.no_grad():
            model.generate(**b.prompt_batch(samples), max_new_tokens=2, do_sample=False)
    assert seen == [s.prompt for s in samples]


# ---- end to end -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_args(qwen_dirs, tmp_path_factory):
    data = tmp_path_factory.mktemp("synth")
    return ["--preset", "smoke", "--set", f"model.path={qwen_dirs['qwen2_vl']}", "--set", f"data.root={data}",
            "--set", "threads=1", "--set", "device=cpu", "--quiet"]


@pytest.mark.parametrize("method", ["finetune", "disco"])
def test_smoke_run_end_to_end(smoke_args, tmp_path, method):
    from fcit.cli import main

    assert main(["run", *smoke_args, "--method", method, "--out", str(tmp_path), "--name", method]) == 0
    run = tmp_path / method
    m = json.loads((run / "metrics.json").read_text())
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert len(m["matrix"]) == 2 and m["rounds"] and all(np.isfinite(r["loss"]) for r in m["rounds"])
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["lora"]["target"] == "ffn"
    if method == "disco":
        assert (run / "disco" / "routing.json").is_file()


def test_image_identity_and_the_feature_cache_are_cleanly_off(smoke_args, tmp_path, capsys, qwen):
    from fcit.cli import main
    from fcit.methods import REGISTRY
    from fcit.runtime import prepare_model

    capsys.readouterr()
    rc = main(["run", *smoke_args, "--method", "disco", "--set", "method.params.identity=image",
               "--out", str(tmp_path), "--name", "img"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "has no LLaVA-style vision_tower" in err[0] and "identity=text" in err[0]
    base, processor = qwen
    cfg = load_config(preset="smoke", overrides={"model.vision_cache_mb": 8})
    prepared = prepare_model(cfg, REGISTRY["finetune"](cfg), copy.deepcopy(base), processor)
    assert prepared.vision_cache is None and prepared.batcher._cache.enabled  # the pixel cache still works
