"""Device, precision, memory, sequence length, prompt template and cache bounds (issue 11), on tiny CPU models."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from fcit.config import ModelConfig, TrainConfig, load_config
from fcit.data.records import Sample
from fcit.errors import FcitError
from fcit.training.local import local_train
from fcit.models.backbone import TinySpec, build_tiny, build_tokenizer, load_backbone
from fcit.models.cache import TensorLRU
from fcit.models.device import FP32_ATTENTION, model_device, resolve_device, set_compute_dtype, upcast_trainables
from fcit.models.inputs import IGNORE, Batcher
from fcit.models.lora import attach_lora, get_state, trainable_names
from fcit.models.vision_cache import VisionFeatureCache

VICUNA_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'][0]['text'] + ' ' }}"
    "{% elif m['role'] == 'user' %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {{ m['content'][0]['text'] }}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _images(tmp_path, n, size, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = tmp_path / f"im{size}_{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture()
def varied_samples(tmp_path):
    """8 samples whose answers differ in length, so micro-batches carry different numbers of answer tokens."""
    answers = ["red", "blue square", "green", "a red square", "red", "blue", "what colour is the square", "green red"]
    paths = _images(tmp_path, len(answers), 16)
    return [Sample("toy", str(i), p, "what colour is the square ?", a, (a,)) for i, (p, a) in
            enumerate(zip(paths, answers))]


# ---- 1. device ------------------------------------------------------------------------------------------------
def test_device_auto_resolves_and_bad_values_are_one_line_errors():
    assert load_config(overrides=["device=cpu"]).device == "cpu"
    assert load_config().device == "auto"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    for bad in ("gpu", "cuda:x", "tpu:0"):
        with pytest.raises(FcitError) as e:
            load_config(overrides=[f"device={bad}"])
        assert str(e.value).startswith("config: device: expected auto, cpu, cuda or cuda:N") and "\n" not in str(e.value)
    if not torch.cuda.is_available():
        with pytest.raises(FcitError, match="config: device: cuda:1 requested but no CUDA device"):
            resolve_device("cuda:1")


def test_batches_live_on_the_models_device_in_its_dtype(micro_backbone, micro_samples):
    base, processor = micro_backbone
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(base).to(dtype)
        b = Batcher(model, processor)
        for batch in (b.train_batch(micro_samples[:3]), b.prompt_batch(micro_samples[:3])):
            assert all(v.device == model_device(model) for v in batch.values())
            assert batch["pixel_values"].dtype == dtype and batch["input_ids"].dtype == torch.long


def test_load_backbone_places_the_model_and_takes_the_attention_implementation(micro_backbone, tmp_path):
    model, processor = micro_backbone
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, _ = load_backbone(str(tmp_path), "bfloat16", "cpu", "eager")
    assert loaded.dtype == torch.bfloat16 and model_device(loaded).type == "cpu"
    assert loaded.config._attn_implementation == "eager"
    with pytest.raises(FcitError, match="^config: device: expected"):
        load_backbone(str(tmp_path), "float32", "gpu0")


# ---- 2. precision ---------------------------------------------------------------------------------------------
def test_bf16_local_train_keeps_fp32_trainables_and_a_frozen_bf16_base(micro_backbone, micro_samples):
    base, processor = micro_backbone
    # the projector trained, as the llava-1.5-7b preset trains it: its bf16 weights are the ones to upcast
    model = attach_lora(copy.deepcopy(base).to(torch.bfloat16), ModelConfig(train_projector=True))
    assert upcast_trainables(model) > 0
    names = set(trainable_names(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = local_train(model, Batcher(model, processor), get_state(model), micro_samples,
                      TrainConfig(batch_size=3, lr=1e-2, local_epochs=1), seed=0)
    assert np.isfinite(res.loss)
    for n, p in model.named_parameters():
        if n in names:
            assert p.dtype == torch.float32 and res.state[n].dtype == torch.float32
        else:
            assert p.dtype == torch.bfloat16 and torch.equal(p, before[n]), n
    assert any(not torch.equal(res.state[n], before[n]) for n in names if "lora_B" in n)
    assert any(not torch.equal(res.state[n], before[n]) for n in names if "multi_modal_projector" in n)


def test_bf16_compute_on_an_fp32_base_runs_bf16_matmuls_fp32_attention_and_fp32_masters(micro_backbone,
                                                                                          micro_samples):
    base, processor = micro_backbone
    runs = {}
    for compute in (None, "bfloat16"):
        torch.manual_seed(0)
        model = attach_lora(copy.deepcopy(base), ModelConfig())
        set_compute_dtype(model, compute)
        start = get_state(model)
        res = local_train(model, Batcher(model, processor), start, micro_samples,
                          TrainConfig(batch_size=3, lr=1e-2, local_epochs=1), seed=0)
        runs[compute] = (model, res)
    model, res = runs["bfloat16"]
    top = model.get_base_model()
    assert top.config._attn_implementation == FP32_ATTENTION
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights are the fp32 masters
    assert all(v.dtype == torch.float32 for v in res.state.values())
    ref = runs[None][1]
    assert runs[None][0].get_base_model().config._attn_implementation == "sdpa"
    # bf16 matmuls: close to the fp32 computation, and not equal to it (the bf16 units did run)
    assert abs(res.loss - ref.loss) <= 0.02 * abs(ref.loss) and res.loss != ref.loss
    # a linear under the model's autocast computes in bf16; attention's inputs arrive as fp32
    seen = []
    h = top.model.language_model.layers[0].mlp.gate_proj.base_layer.register_forward_hook(
        lambda m, i, o: seen.append(o.dtype))
    from fcit.models.device import autocast_for

    with torch.no_grad(), autocast_for(model):
        model(**Batcher(model, processor).train_batch(micro_samples[:2]))
    h.remove()
    assert seen == [torch.bfloat16]


def test_fp32_attention_masks_the_padding_of_left_padded_prompts(micro_backbone, micro_samples):
    """Generation left-pads its prompts: the fp32 attention must get transformers' padding mask as SDPA does, so
    that what stands in the padding cannot change a prompt's logits."""
    from fcit.models.device import autocast_for

    base, processor = micro_backbone
    short = dataclasses.replace(micro_samples[0], prompt="red ?")
    other = next(i for i in (5, 6, 7) if i not in (base.config.image_token_index, processor.tokenizer.pad_token_id))
    for compute in (None, "bfloat16"):
        model = copy.deepcopy(base)
        set_compute_dtype(model, compute)
        batch = Batcher(model, processor).prompt_batch([short, micro_samples[1]])
        pad = batch["attention_mask"] == 0
        assert pad[0].any() and not pad[1].any()  # the short prompt is padded on the left
        changed = {**batch, "input_ids": batch["input_ids"].masked_fill(pad, other)}
        with torch.no_grad(), autocast_for(model):
            a, b = (model(**x).logits[:, -1].float() for x in (batch, changed))
        assert torch.equal(a, b), (compute, (a - b).abs().max())


def test_compiled_fp32_attention_calls_sdpas_kernel_and_keeps_the_graph_cacheable(micro_backbone, micro_samples):
    """In a compiled layer the fp32 attention calls the CPU flash kernel that SDPA picks for fp32 inputs, without an
    autocast region in the graph: such a region makes AOTAutograd skip its cache, and every pool worker traced the
    layer's joint graph again (4 s of its first step)."""
    from torch._dynamo.utils import counters

    from fcit.models.answer_loss import answer_forward
    from fcit.models.compiled import training_compiled
    from fcit.models.device import _flash_cpu_fp32, _sdpa_fp32, autocast_for

    class Attn:  # what the attention functions read off the module
        is_causal, num_key_value_groups = True, 1

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 12, 8, generator=gen, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    rows = torch.tensor([[3, 7], [11, 11], [0, 5]])
    masks = {None: None, "rows": (torch.arange(12)[None, None, :] <= rows[:, :, None]).unsqueeze(1)}
    for name, mask in masks.items():
        query = q if mask is None else q[:, :, :2]
        outs, grads = [], []
        for fn in (lambda: _sdpa_fp32(Attn(), query, k, v, mask, scaling=0.3)[0],  # eager: SDPA itself
                   lambda: _flash_cpu_fp32(Attn(), query, k, v, mask, 0.3, None).to(v.dtype)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = fn()
            outs.append(out)
            grads.append(torch.autograd.grad(out.float().square().sum(), (q, k, v)))
        assert outs[0].dtype == outs[1].dtype == torch.bfloat16
        assert torch.equal(outs[0], outs[1]), name
        assert all(torch.equal(a, b) for a, b in zip(*grads)), name

    base, processor = micro_backbone
    model = attach_lora(copy.deepcopy(base), ModelConfig())
    set_compute_dtype(model, "bfloat16")
    model.train()
    torch._dynamo.reset()  # compile afresh: graphs an earlier test compiled would be reused without AOTAutograd
    before = dict(counters["aot_autograd"])
    with training_compiled(model, True), autocast_for(model):  # the layers' graph and the answer rows' graph
        answer_forward(model, Batcher(model, processor).train_batch(micro_samples[:3])).loss.backward()
    seen = {key: counters["aot_autograd"][key] - before.get(key, 0) for key in counters["aot_autograd"]}
    assert seen.get("total", 0) >= 2
    assert seen.get("autograd_cache_bypass", 0) == 0, seen


# ---- 3. memory ------------------------------------------------------------------------------------------------
def _one_step(base, processor, samples, **train):
    torch.manual_seed(0)
    model = attach_lora(copy.deepcopy(base), ModelConfig())
    cfg = TrainConfig(batch_size=8, lr=1e-2, local_epochs=1, warmup_ratio=0.0, **train)
    res = local_train(model, Batcher(model, processor), get_state(model), samples, cfg, seed=3)
    assert res.steps == 1
    return res


def test_micro_batches_accumulate_to_the_full_batch_step(micro_backbone, varied_samples):
    base, processor = micro_backbone
    full = _one_step(base, processor, varied_samples)
    micro = _one_step(base, processor, varied_samples, micro_batch_size=2)
    assert abs(full.loss - micro.loss) < 1e-5
    for k in full.state:
        assert torch.allclose(full.state[k], micro.state[k], atol=1e-5, rtol=0), k
    assert any(bool(v.abs().sum() > 0) for k, v in full.state.items() if "lora_B" in k)  # B starts at 0: it moved
    # Unweighted means of the micro-batch losses would differ: the answers' lengths are not equal.
    b = Batcher(base, processor)
    counts = [int((b.train_batch(varied_samples[i : i + 2])["labels"][:, 1:] != IGNORE).sum()) for i in range(0, 8, 2)]
    assert len(set(counts)) > 1


def test_gradient_checkpointing_gives_the_same_update(micro_backbone, varied_samples):
    base, processor = micro_backbone
    plain = _one_step(base, processor, varied_samples)
    torch.manual_seed(0)
    model = attach_lora(copy.deepcopy(base), ModelConfig())
    cfg = TrainConfig(batch_size=8, lr=1e-2, local_epochs=1, warmup_ratio=0.0, gradient_checkpointing=True)
    ckpt = local_train(model, Batcher(model, processor), get_state(model), varied_samples, cfg, seed=3)
    assert model.base_model.model.is_activation_checkpointing
    assert all(torch.allclose(plain.state[k], ckpt.state[k], atol=1e-6) for k in plain.state)


# ---- 4. sequence length ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def many_image_tokens():
    """A llava-1.5-shaped micro checkpoint whose image expands to 64 tokens (112 px, patch 14), 128 positions."""
    spec = TinySpec(image_size=112, patch_size=14, vision_hidden=32, vision_layers=1, vision_heads=2, lm_hidden=32,
                    lm_intermediate=64, lm_layers=2, lm_heads=2, vocab_size=300, max_positions=128)
    corpus = ["what colour is the square ? red blue green", "USER: ASSISTANT: a red square"] * 20
    return build_tiny(build_tokenizer(corpus, spec.vocab_size), spec, seed=0)


def test_max_length_that_cuts_the_prompt_is_a_config_error(many_image_tokens, tmp_path):
    model, processor = many_image_tokens
    (path,) = _images(tmp_path, 1, 112)
    s = Sample("toy", "7", path, "what colour is the square ?", "red blue green red blue", ())
    small = Batcher(model, processor, max_length=48)
    with pytest.raises(FcitError) as e:
        small.check_max_length([s])
    msg = str(e.value)
    assert msg.startswith("config: train.max_length: 48 tokens cannot hold the prompt of toy/7") and "\n" not in msg
    assert "64 of them image tokens" in msg
    with pytest.raises(FcitError, match="^config: train.max_length"):
        small.train_batch([s])  # never silently cuts image tokens


def test_derived_max_length_fits_the_image_and_long_answers_lose_their_end(many_image_tokens, tmp_path):
    model, processor = many_image_tokens
    (path,) = _images(tmp_path, 1, 112)
    s = Sample("toy", "7", path, "what colour is the square ?", "red blue green red blue", ())
    b = Batcher(model, processor)
    assert b.max_length == 128  # template + 64 image tokens + 256 text tokens, capped at the LM's positions
    assert b.check_max_length([s]) == len(b.prompt_ids(s))
    with torch.no_grad():
        assert torch.isfinite(model(**b.train_batch([s])).loss)
    n_prompt = len(b.prompt_ids(s))
    tight = Batcher(model, processor, max_length=n_prompt + 2)
    batch = tight.train_batch([s])
    assert batch["input_ids"].shape[1] == n_prompt + 2
    assert int((batch["input_ids"][0] == model.config.image_token_index).sum()) == 64
    assert batch["labels"][0, n_prompt:].tolist() == tight.target_ids(s)[:2]  # the answer's start survives
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_embedded_default_length_is_todays(micro_backbone):
    # The embedded model has 256 positions: the derived budget is today's 256, so its batches do not change.
    from fcit.models.backbone import load_backbone as lb

    model, processor = lb(None)
    assert Batcher(model, processor).max_length == 256 == model.config.text_config.max_position_embeddings


# ---- 5. prompt ------------------------------------------------------------------------------------------------
def test_without_a_chat_template_the_prompt_is_vicuna_v1(micro_backbone, micro_samples):
    model, processor = micro_backbone
    assert not getattr(processor, "chat_template", None) and not processor.tokenizer.chat_template
    b = Batcher(model, processor, system_prompt="Be brief.")
    s = micro_samples[0]
    assert b.prefix(s) == "Be brief. USER: " + "<image>" * 4 + "\nwhat colour is the square ? ASSISTANT:"
    assert b.target_ids(s) == b._ids(" " + s.answer) + [processor.tokenizer.eos_token_id]


def test_chat_template_prompt_and_answer_mask(micro_backbone, micro_samples):
    model, base_processor = micro_backbone
    processor = copy.deepcopy(base_processor)
    processor.chat_template = VICUNA_TEMPLATE
    tok = processor.tokenizer
    b = Batcher(model, processor, system_prompt="Be brief.")
    assert b.uses_chat_template
    s = micro_samples[1]
    assert b.prefix(s) == "Be brief. USER: " + "<image>" * 4 + "\nwhat colour is the square ? ASSISTANT:"
    batch = b.train_batch([s])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    target = [t for t in labels if t != IGNORE]
    start = labels.index(target[0])
    assert labels[:start] == [IGNORE] * start and ids[start:] == target
    assert tok.decode(target) == " blue</s>" and target[-1] == tok.eos_token_id
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    # The generation prompt is exactly the training prompt, so the model answers where it learned to.
    p = b.prompt_batch([s])["input_ids"][0].tolist()
    assert p == ids[:start]


# ---- 6. bounded caches ----------------------------------------------------------------------------------------
def test_lru_cap_is_never_exceeded_and_evicts_oldest():
    cache = TensorLRU(cap_mb=0.01)  # 10485 bytes: two 4 KiB entries
    for i in range(50):
        cache.put(i, torch.zeros(1024))
        assert cache.used <= cache.cap
    assert len(cache) == 2 and cache.evictions == 48 and 49 in cache and 0 not in cache
    cache.get(48)
    cache.put(100, torch.zeros(1024))
    assert 48 in cache and 49 not in cache  # the recently read entry survives
    off = TensorLRU(0)
    off.put("x", torch.zeros(1))
    assert not off.enabled and len(off) == 0


def test_small_caps_bound_both_image_caches_and_zero_turns_both_off(micro_backbone, tmp_path):
    base, processor = micro_backbone
    paths = _images(tmp_path, 40, 16, seed=1)
    samples = [Sample("toy", str(i), p, "what colour is the square ?", "red", ()) for i, p in enumerate(paths)]
    model = attach_lora(copy.deepcopy(base), ModelConfig())
    per_image_feats = 5 * 32 * 4  # (4 patches + CLS) x hidden 32 x fp32
    cap_mb = 10 * per_image_feats / 2**20
    vc = VisionFeatureCache(model, cap_mb)
    b = Batcher(model, processor, cache_mb=10 * 3 * 16 * 16 * 4 / 2**20)
    for i in range(0, 40, 8):
        with torch.no_grad():
            model(**b.train_batch(samples[i : i + 8]))
        assert vc.used <= vc.store.cap and b._cache.used <= b._cache.cap
    assert len(vc.store) == 10 and vc.store.evictions == 30 and len(b._cache) == 10 and b._cache.evictions == 30

    off_model = attach_lora(copy.deepcopy(base), ModelConfig())
    off_vc = VisionFeatureCache(off_model, 0)
    off_b = Batcher(off_model, processor, cache_mb=0)
    with torch.no_grad():
        off_model(**off_b.train_batch(samples[:8]))
        off_model(**off_b.train_batch(samples[:8]))
    assert len(off_b._cache) == 0 and len(off_vc.store) == 0 and off_vc.hits == off_vc.misses == 0


def test_vision_cache_is_a_swapped_module_not_a_patched_forward(micro_backbone):
    from fcit.models.vision_cache import CachedVisionTower

    model = attach_lora(copy.deepcopy(micro_backbone[0]), ModelConfig())
    tower = model.base_model.model.model.vision_tower
    VisionFeatureCache(model, 1)
    swapped = model.base_model.model.model.vision_tower
    assert isinstance(swapped, CachedVisionTower) and swapped.tower is tower and "forward" not in vars(tower)
    assert swapped.config is tower.config


# ---- 7. preset ------------------------------------------------------------------------------------------------
def test_llava_preset_needs_a_model_directory(tmp_path):
    with pytest.raises(FcitError) as e:
        load_config(preset="llava-1.5-7b")
    assert str(e.value).startswith("config: model.path: preset llava-1.5-7b needs") and "\n" not in str(e.value)
    with pytest.raises(FcitError, match="^config: model.path"):
        load_config(preset="llava-1.5-7b", overrides=[f"model.path={tmp_path / 'missing'}"])
    cfg = load_config(preset="llava-1.5-7b", overrides=[f"model.path={tmp_path}"])
    lc, t = cfg.model.lora, cfg.train
    assert (lc.r, lc.alpha, lc.dropout) == (64, 128.0, 0.05) and cfg.model.dtype == "bfloat16"
    assert (t.lr, t.batch_size, t.local_epochs, t.warmup_ratio, t.gradient_checkpointing) == (2e-4, 128, 1, 0.03, True)
    assert t.micro_batch_size < t.batch_size and cfg.eval.max_new_tokens == 128 and cfg.device == "auto"
    assert cfg.model.system_prompt.startswith("A chat between a curious user")
