import copy
import dataclasses
import json
import math
import warnings

import pytest
import torch

from fcit.config import Config
from fcit.data.scenario import Assignment
from fcit.errors import FcitError
from fcit.eval.evaluate import generate
from fcit.training.aggregation import fedavg
from fcit.training.local import local_train
from fcit.engines.inprocess import InProcessTransport
from fcit.engines.loop import StageLoop
from fcit.methods.base import StageInfo, Upload
from fcit.methods.disco import (
    NEW,
    Disco,
    assign_slots,
    cosine_matrix,
    gates,
    greedy_threshold_clusters,
    route,
    update_centres,
)
from fcit.methods.disco import routing
from fcit.models.identity import (
    CLIPTextEncoder,
    ImageTokenEncoder,
    identity_token,
    instruction_from_prompt,
    instruction_text,
)
from fcit.models.inputs import Batcher
from fcit.models.lora import state_bytes
from fcit.models.subspace_lora import get_gate, split_state, subspace_index, subspace_layers


def _unit(*xs):
    v = torch.tensor(xs, dtype=torch.float32)
    return v / v.norm()


# ---------------------------------------------------------------------------------------------------------------
# server functions on hand-made tokens
# ---------------------------------------------------------------------------------------------------------------
def test_greedy_clusters_are_disjoint_where_the_reference_overlaps():
    # a~b and b~c above tau, a~c below: the reference lists b in two clusters
    a, b, c = _unit(1, 0), _unit(math.cos(0.4), math.sin(0.4)), _unit(math.cos(0.8), math.sin(0.8))
    tokens = torch.stack([a, b, c])
    tau = 0.9  # cos(0.4) = 0.921 >= tau, cos(0.8) = 0.697 < tau
    groups = greedy_threshold_clusters(tokens, tau)
    assert groups == [[0, 1], [2]]
    flat = [i for g in groups for i in g]
    assert sorted(flat) == [0, 1, 2]
    far = torch.stack([_unit(1, 0, 0), _unit(0, 1, 0), _unit(0.99, 0.1, 0), _unit(0, 0, 1)])
    assert greedy_threshold_clusters(far, 0.9) == [[0, 2], [1], [3]]


def test_greedy_clusters_anchor_on_the_largest_client():
    # b (the big client) is within tau of both a and c, which are not within tau of each other: anchored on the
    # first item the round splits in two groups, anchored on the heaviest it stays one (seed 2's FigureQA case).
    a, b, c = _unit(1, 0), _unit(math.cos(0.4), math.sin(0.4)), _unit(math.cos(0.8), math.sin(0.8))
    tokens = torch.stack([a, b, c])
    assert greedy_threshold_clusters(tokens, 0.9) == [[0, 1], [2]]
    assert greedy_threshold_clusters(tokens, 0.9, weights=[3, 19, 8]) == [[0, 1, 2]]
    # groups come back in order of their first member whatever the anchor order, so slot numbering is stable
    far = torch.stack([_unit(1, 0, 0), _unit(0, 1, 0), _unit(0.99, 0.1, 0), _unit(0, 0, 1)])
    assert greedy_threshold_clusters(far, 0.9, weights=[1, 1, 5, 9]) == [[0, 2], [1], [3]]


def test_route_threshold_and_unused_slots():
    C = torch.stack([_unit(1, 0), _unit(0, 1), torch.zeros(2)])
    N = torch.tensor([5.0, 3.0, 0.0])
    at = _unit(math.cos(math.acos(0.9) - 1e-4), math.sin(math.acos(0.9) - 1e-4))  # just above cos 0.9 to slot 0
    below = _unit(math.cos(math.acos(0.9) + 1e-3), math.sin(math.acos(0.9) + 1e-3))
    assert route(torch.stack([at, below, _unit(0.1, 1)]), C, N, tau=0.9) == [0, NEW, 1]
    # unused slots never match, even with a (stale) centre
    used = torch.tensor([False, True, False])
    assert route(_unit(1, 0)[None], C, N, used=used, tau=0.9) == [NEW]


def test_assign_slots_new_groups_get_fresh_slots_and_matched_ones_reuse():
    C = torch.stack([_unit(1, 0, 0, 0), torch.zeros(4), torch.zeros(4), torch.zeros(4)])
    used = torch.tensor([True, False, False, False])
    tokens = torch.stack([_unit(0, 1, 0, 0), _unit(1, 0.01, 0, 0), _unit(0, 0, 1, 0), _unit(0, 1, 0.01, 0)])
    slots, kinds = assign_slots(cosine_matrix(tokens, C), cosine_matrix(tokens, tokens), used, 0.9)
    assert slots == [1, 0, 2, 1] and kinds == ["new", "matched", "new", "new"]
    # later rounds, late_route="tau": the client within tau of the used slot keeps it; the others are below tau to
    # it and open slots as in round 0
    slots, kinds = assign_slots(cosine_matrix(tokens, C), cosine_matrix(tokens, tokens), used, 0.9, allow_new=False,
                                late_route="tau")
    assert slots == [1, 0, 2, 1] and kinds == ["new", "nearest", "new", "new"]
    # the default, the reference's rule: every later-round client takes the nearest slot of the stage
    slots, kinds = assign_slots(cosine_matrix(tokens, C), cosine_matrix(tokens, tokens), used, 0.9, allow_new=False)
    assert slots == [0, 0, 0, 0] and kinds == ["nearest"] * 4


def test_capacity_overflow_falls_back_to_the_nearest_slot_and_warns():
    C = torch.stack([_unit(1, 0, 0), _unit(0, 1, 0)])
    used = torch.tensor([True, True])
    tokens = torch.stack([_unit(0.3, 0.1, 1)])  # new, but nearer to slot 0
    with pytest.warns(RuntimeWarning, match="all 2 subspaces are in use"):
        slots, kinds = assign_slots(cosine_matrix(tokens, C), cosine_matrix(tokens, tokens), used, 0.9)
    assert slots == [0] and kinds == ["overflow"]
    # within one plan: three new groups, two slots -> the third joins its nearest freshly opened group
    tokens = torch.stack([_unit(1, 0, 0), _unit(0, 1, 0), _unit(0.2, 1, 0.5)])
    none = torch.zeros(2, dtype=torch.bool)
    with pytest.warns(RuntimeWarning):
        slots, kinds = assign_slots(cosine_matrix(tokens, torch.zeros(2, 3)), cosine_matrix(tokens, tokens), none, 0.9)
    assert slots == [0, 1, 1] and kinds == ["new", "new", "overflow"]


def test_update_centres_is_the_correct_running_mean():
    C = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    N = torch.tensor([3.0, 0.0])
    tokens = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    counts = torch.tensor([1.0, 2.0])
    C2, N2 = update_centres(C, N, 0, tokens, counts)
    # (3*[1,0] + 1*[0,1] + 2*[1,1]) / (3 + 3)
    assert torch.allclose(C2[0], torch.tensor([5 / 6, 3 / 6])) and N2.tolist() == [6.0, 0.0]
    assert torch.equal(C, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # pure: inputs untouched
    C3, N3 = update_centres(C2, N2, 1, tokens[:1], counts[:1])  # a new slot: the plain mean
    assert torch.allclose(C3[1], tokens[0]) and N3.tolist() == [6.0, 1.0]
    assert C3.dtype == torch.float32


def test_gate_variants_on_hand_made_similarities():
    sim = torch.tensor([[0.9, 0.5, 0.99], [0.2, 0.3, 0.0]])
    used = torch.tensor([True, True, False])
    soft = gates(sim, "softmax", 0.05, used)
    e = math.exp((0.9 - 0.5) / 0.05)
    assert torch.allclose(soft[0], torch.tensor([e / (e + 1), 1 / (e + 1), 0.0]))
    assert torch.allclose(soft.sum(1), torch.ones(2))
    assert gates(sim, "concat", used=used).tolist() == [[1, 1, 0], [1, 1, 0]]
    assert torch.allclose(gates(sim, "cosine", used=used), torch.tensor([[0.9, 0.5, 0.0], [0.2, 0.3, 0.0]]))
    assert gates(sim, "argmax", used=used).tolist() == [[1, 0, 0], [0, 1, 0]]
    assert gates(sim, "softmax", used=torch.zeros(3, dtype=torch.bool)).abs().sum() == 0
    with pytest.raises(ValueError):
        gates(sim, "nope")


# ---------------------------------------------------------------------------------------------------------------
# identity encoders
# ---------------------------------------------------------------------------------------------------------------
def test_instruction_text_and_reading_it_back_from_a_prompt(micro_backbone, micro_samples):
    _, processor = micro_backbone
    s = dataclasses.replace(micro_samples[0], prompt="<image>\nwhat colour is the square ?")
    assert instruction_text(s) == "what colour is the square ?"
    batcher = Batcher(micro_backbone[0], processor)
    ids = batcher.prompt_batch([micro_samples[0]])["input_ids"][0]
    decoded = processor.tokenizer.decode(ids, skip_special_tokens=True)
    assert instruction_from_prompt(decoded) == micro_samples[0].prompt
    assert instruction_from_prompt("plain text") == "plain text"


def test_minilm_separates_tasks_and_keeps_paraphrases_close():
    from fcit.models.identity import get_text_encoder

    enc = get_text_encoder("minilm")
    texts = [
        "What colour is the square in the image?",
        "Which colour does the square in this picture have?",
        "Write a short caption that describes the image.",
        "How many objects are left after removing all red cubes?",
    ]
    f = enc.encode(texts)
    assert f.shape == (4, 384) and torch.allclose(f.norm(dim=1), torch.ones(4), atol=1e-5)
    sim = cosine_matrix(f, f)
    assert sim[0, 1] > 0.8
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[0, 3] + 0.3
    assert torch.equal(enc.encode(texts[:1])[0], f[0])  # cached per text
    tok, n = identity_token(enc, texts[:2])
    assert n == 2 and torch.allclose(tok, f[:2].mean(0))


def test_task_overlap_is_the_cosine_of_the_tasks_mean_tokens_highest_first():
    from fcit.methods.disco.routing import task_overlap

    class Table:  # an encoder that maps each text to a fixed unit vector
        dim = 2
        vectors = {"a1": [1.0, 0.0], "a2": [0.0, 1.0], "b": [1.0, 0.0], "c": [-1.0, 0.0]}

        def encode(self, texts):
            return torch.tensor([self.vectors[t] for t in texts])

    tokens = {t: identity_token(Table(), texts)[0] for t, texts in {"A": ["a1", "a2"], "B": ["b"], "C": ["c"]}.items()}
    pairs = task_overlap(tokens)
    # A's token is the mean (0.5, 0.5): cos 1/sqrt(2) to B's (1, 0) and -1/sqrt(2) to C's; B and C point apart
    assert [(a, b) for _, a, b in pairs] == [("A", "B"), ("A", "C"), ("B", "C")]
    assert [round(c, 4) for c, _, _ in pairs] == [0.7071, -0.7071, -1.0]
    assert task_overlap({"A": tokens["A"]}) == [] and task_overlap({}) == []


def test_clip_text_encoder_from_a_local_tiny_model(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "what", "colour", "is", "the", "square", "count", "cubes", "?"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.save_pretrained(tmp_path)
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, projection_dim=16)
    CLIPTextModel(cfg).save_pretrained(tmp_path)
    enc = CLIPTextEncoder(str(tmp_path))
    texts = ["what colour is the square ?", "count the cubes"]
    f = enc.encode(texts)
    assert f.shape == (2, 16) and f.dtype == torch.float32
    model = CLIPTextModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        want = model(**{k: v for k, v in tok(texts[1:], return_tensors="pt").items() if k != "token_type_ids"})
    assert torch.allclose(f[1], want.pooler_output[0], atol=1e-5)  # padding in the batch does not change it
    with pytest.raises(FcitError):
        CLIPTextEncoder(str(tmp_path / "missing"))


def test_image_token_encoder_uses_the_frozen_vision_tower(micro_backbone, micro_samples):
    model, processor = micro_backbone
    px = Batcher(model, processor)._pixels(micro_samples[:3])
    enc = ImageTokenEncoder(model)
    f = enc.encode(px)
    with torch.no_grad():
        hs = model.model.vision_tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert f.shape == (3, enc.dim) and torch.allclose(f, hs.mean(1), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# the method, through its hooks
# ---------------------------------------------------------------------------------------------------------------
class KeywordEncoder:
    """A stand-in identity encoder: one direction per task keyword, a little within-task jitter."""

    dim = 6
    keys = ("colour", "count", "caption")

    def encode(self, texts):
        out = torch.zeros(len(texts), self.dim)
        for i, t in enumerate(texts):
            k = next((j for j, key in enumerate(self.keys) if key in t), 3)
            out[i, k] = 1.0
            out[i, 4] = 0.05 * (len(t) % 3)
        return out


PROMPTS = {
    "colour": "what colour is the square ?",
    "count": "count the squares , how many are there in this small picture ?",
    "caption": "caption",
}


def _task(samples, name):
    return [dataclasses.replace(s, dataset=name, prompt=PROMPTS[name], id=f"{name}{s.id}") for s in samples]


def _disco(monkeypatch, E=3, train_projector=True, **params):
    # The projector trained by default here, as the reference trains it: then it travels with every upload.
    cfg = Config.model_validate({
        "seed": 0,
        "model": {"train_projector": train_projector},
        "method": {"name": "disco", "params": {"num_subspaces": E, "rank": 2, **params}},
        "train": {"batch_size": 3, "lr": 1e-2},
        "scenario": {"rounds": 2, "num_clients": 3, "clients_per_round": 2},
    })
    monkeypatch.setattr(Disco, "text_encoder", property(lambda self: KeywordEncoder()))
    return Disco(cfg)


def _disco_on_micro(micro_backbone, monkeypatch, train_projector=True):
    """DISCO set up on a copy of the micro backbone: (method, model, batcher, initial global state)."""
    base, processor = micro_backbone
    disco = _disco(monkeypatch, train_projector=train_projector)
    model = disco.setup(copy.deepcopy(base))
    batcher = Batcher(model, processor)
    disco.bind(processor, batcher)
    return disco, model, batcher, disco.initial_state(model)


def test_params_are_validated():
    bad = Config.model_validate({"method": {"name": "disco", "params": {"encoder": "bert"}}})
    with pytest.raises(FcitError, match="method.params.encoder"):
        Disco(bad)
    with pytest.raises(FcitError, match="unknown key"):
        Disco(Config.model_validate({"method": {"name": "disco", "params": {"tua": 0.8}}}))


def test_a_client_lost_after_planning_leaves_the_tokens_of_the_others(micro_backbone, micro_samples, monkeypatch):
    # A Flower node that crashes between plan and upload: aggregation gets fewer uploads than planned clients.
    disco, model, batcher, gs = _disco_on_micro(micro_backbone, monkeypatch)
    colour, count = _task(micro_samples, "colour"), _task(micro_samples, "count")
    info = StageInfo(stage=0, num_stages=1, tasks=[0], round=0)
    shards = [colour[:3], colour[3:5], count[:4]]
    ids = [disco.client_identity(model, s, info) for s in shards]
    plan = disco.plan_round(info, ids, gs)
    kept = [1, 2]  # client 0 never replies
    uploads = []
    for i in kept:
        disco.before_local(model, plan.clients[i])
        uploads.append(Upload(i, local_train(model, batcher, gs, shards[i], disco.cfg.train, seed=i)))
    disco.aggregate(info, plan, uploads, gs)
    tok = torch.stack([i["text"] for i in ids])
    assert torch.allclose(disco.C["text"][0], tok[1]) and torch.allclose(disco.C["text"][1], tok[2])
    assert disco.N.tolist()[:2] == [2.0, 4.0]



def test_a_frozen_projector_neither_trains_nor_travels(micro_backbone, micro_samples, monkeypatch):
    """The embedded default (model.train_projector false): the global state and every upload hold the subspaces only,
    and the projector keeps the base's weights bit for bit through local training and aggregation."""
    disco, model, batcher, gs = _disco_on_micro(micro_backbone, monkeypatch, train_projector=False)
    assert gs and all(subspace_index(k) is not None for k in gs)
    proj = {n: p.detach().clone() for n, p in model.named_parameters() if "multi_modal_projector" in n}
    assert proj and not any(p.requires_grad for n, p in model.named_parameters() if n in proj)
    colour = _task(micro_samples, "colour")
    info = StageInfo(stage=0, num_stages=1, tasks=[0], round=0)
    shards = [colour[:3], colour[3:]]
    plan = disco.plan_round(info, [disco.client_identity(model, s, info) for s in shards], gs)
    uploads = []
    for i, shard in enumerate(shards):
        disco.before_local(model, plan.clients[i])
        res = local_train(model, batcher, gs, shard, disco.cfg.train, seed=i)
        assert set(res.state) <= set(gs) and any(not torch.equal(res.state[k], gs[k]) for k in res.state)
        uploads.append(Upload(i, res))
    new = disco.aggregate(info, plan, uploads, gs)
    assert set(new) == set(gs)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], w) for n, w in proj.items())

def test_disco_rounds_by_hand_then_through_the_engine(micro_backbone, micro_samples, monkeypatch, tmp_path):
    disco, model, batcher, gs = _disco_on_micro(micro_backbone, monkeypatch)
    processor = micro_backbone[1]
    assert {subspace_index(k) for k in gs} == {0, 1, 2, None}
    colour, count, caption = (_task(micro_samples, n) for n in ("colour", "count", "caption"))

    # ---- stage 0, round 0, by hand: two clients of "colour", one of "count"
    info = StageInfo(stage=0, num_stages=2, tasks=[0], round=0, assigned=[["colour"], ["colour"], ["count"]])
    shards = [colour[:3], colour[3:5], count[:4]]
    ids = [disco.client_identity(model, s, info) for s in shards]
    assert ids[0]["count"] == 3 and set(ids[0]) == {"count", "text"}  # no word on which datasets it holds
    plan = disco.plan_round(info, ids, gs)
    plans = plan.clients
    assert [p["subspace"] for p in plans] == [0, 0, 1] and len(plan.server["counts"]) == 3
    # The routing log's ground truth is what the server assigned, not anything the clients reported.
    assert [e["datasets"] for e in disco.routing_log] == [["colour"], ["colour"], ["count"]]
    results = []
    for i, (s, p) in enumerate(zip(shards, plans)):
        disco.before_local(model, p)
        res = local_train(model, batcher, gs, s, disco.cfg.train, seed=i)
        per, rest = split_state(res.state)
        assert set(per) == {p["subspace"]} and all("multi_modal_projector" in k for k in rest)
        results.append(res)
    new = disco.aggregate(info, plan, [Upload(i, r) for i, r in enumerate(results)], gs)
    sub0 = fedavg([split_state(r.state)[0][0] for r in results[:2]], [3, 2])
    for k, v in sub0.items():
        assert torch.allclose(new[k], v)
    for k, v in split_state(results[2].state)[0][1].items():
        assert torch.equal(new[k], v)
    for k in split_state(gs)[0][2]:
        assert torch.equal(new[k], gs[k])  # nobody trained subspace 2
    proj = fedavg([split_state(r.state)[1] for r in results], [3, 2, 4])
    for k, v in proj.items():
        assert torch.allclose(new[k], v)
    tok = torch.stack([i["text"] for i in ids])
    assert torch.allclose(disco.C["text"][0], (3 * tok[0] + 2 * tok[1]) / 5)
    assert torch.allclose(disco.C["text"][1], tok[2])
    assert disco.N.tolist() == [5.0, 4.0, 0.0] and disco.used.tolist() == [True, True, False]
    gs = new

    # ---- stage 0, round 1: no new slots; each client goes to its task's subspace
    info = dataclasses.replace(info, round=1, assigned=[["count"], ["colour"]])
    shards = [count[4:], colour[:2]]
    plan = disco.plan_round(info, [disco.client_identity(model, s, info) for s in shards], gs)
    assert [p["subspace"] for p in plan.clients] == [1, 0]
    uploads = []
    for i, (s, p) in enumerate(zip(shards, plan.clients)):
        disco.before_local(model, p)
        uploads.append(Upload(i, local_train(model, batcher, gs, s, disco.cfg.train, seed=10 + i)))
    gs = disco.aggregate(info, plan, uploads, gs)

    # ---- stage 1 through the round loop (Het-like: an old task recurs next to a new one)
    class Scenario:
        tasks = [["colour"], ["count"], ["caption"]]

        def assignments(self, t, r):
            return [Assignment(client_id=r, position=0, task=0), Assignment(client_id=2 + r, position=1, task=2)]

        def client_data(self, task, cid):
            return colour[cid:cid + 3] if task == 0 else caption[cid - 2:cid + 2]

    sc = Scenario()
    loop = StageLoop(disco, model, sc, InProcessTransport(disco.cfg, model, batcher, sc, disco, progress=False),
                     rounds=2, seed=0)
    gs, logs = loop.run(StageInfo(stage=1, num_stages=2, tasks=[0, 2]), gs, bar=False)
    stage1 = [e for e in disco.routing_log if e["stage"] == 1]
    assert [(e["round"], e["subspace"], e["kind"]) for e in stage1] == [
        (0, 0, "matched"), (0, 2, "new"), (1, 0, "nearest"), (1, 2, "nearest")]
    one_subspace = state_bytes(split_state(gs)[0][0]) + state_bytes(split_state(gs)[1])
    assert all(log.bytes_up == 2 * one_subspace for log in logs)
    assert disco.used.all()

    # ---- inference: per-sample gates, whatever order and batching generate() uses
    tests = [colour[0], caption[1], count[2], colour[3], count[4], caption[5]]
    seen = []

    def check(module, args, kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[1] == 1:
            return
        g = get_gate(model)
        assert g is not None and g.shape == (ids.shape[0], 3)
        mask = kwargs.get("attention_mask", torch.ones_like(ids))
        for row, m, gate in zip(ids, mask, g):
            text = processor.tokenizer.decode(row[m.bool()], skip_special_tokens=True)
            want = 0 if "colour" in text else 1 if "count" in text else 2
            assert int(gate.argmax()) == want and float(gate[want]) > 0.99
            seen.append(want)

    with disco.inference_gate(model, tests, 1):
        h = model.register_forward_pre_hook(check, with_kwargs=True)  # runs after DISCO's own hook
        try:
            preds = generate(model, batcher, tests, batch_size=4, max_new_tokens=3)
        finally:
            h.remove()
    assert len(preds) == len(tests) and sorted(seen) == [0, 0, 1, 1, 2, 2]
    assert get_gate(model) is None  # the context restores the previous mode

    from fcit.report.artifacts import write_artifacts

    summary = write_artifacts(disco.artifacts(), tmp_path)
    assert summary["subspaces_formed"] == 3 and summary["routing_accuracy"] == 1.0
    assert summary["slot_of_dataset"] == {"caption": 2, "colour": 0, "count": 1}
    C = torch.nn.functional.normalize(disco.C["text"][:3], dim=-1)
    want = max(float(C[i] @ C[j]) for i in range(3) for j in range(3) if i != j)
    assert summary["max_cross_cosine"] == pytest.approx(want, abs=1e-6) and want < 0.9
    for f in summary["files"]:
        assert (tmp_path / f).is_file()

    # ---- resume: the server state survives a safetensors round trip
    from safetensors.torch import load_file, save_file

    save_file({k: v.contiguous() for k, v in disco.state_dict().items()}, str(tmp_path / "m.safetensors"))
    again = _disco(monkeypatch)
    again.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    again.load_state_json(json.loads(json.dumps(disco.state_json())))
    assert torch.equal(again.C["text"], disco.C["text"]) and torch.equal(again.N, disco.N)
    assert torch.equal(again.used, disco.used) and again.routing_log == disco.routing_log
    assert again.gate_stats == disco.gate_stats


def test_disco_overflow_and_image_identity(micro_backbone, micro_samples, monkeypatch):
    base, processor = micro_backbone
    disco = _disco(monkeypatch, E=2, identity="text+image")
    model = disco.setup(copy.deepcopy(base))
    batcher = Batcher(model, processor)
    disco.bind(processor, batcher)
    info = StageInfo(stage=0, num_stages=1, tasks=[0], round=0)
    shards = [_task(micro_samples[:2], "colour"), _task(micro_samples[2:4], "count"),
              _task(micro_samples[4:], "caption")]
    ids = [disco.client_identity(model, s, info) for s in shards]
    assert ids[0]["image"].shape == (ImageTokenEncoder(model).dim,)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        plans = disco.plan_round(info, ids, disco.initial_state(model)).clients
    assert any("subspaces are in use" in str(x.message) for x in w)
    assert all(0 <= p["subspace"] < 2 for p in plans)
    # the gate layers accept per-sample gates computed from text + image
    want = ImageTokenEncoder(model).encode(batcher._pixels(shards[0])).mean(0)
    assert torch.allclose(ids[0]["image"], want, atol=1e-6)
    disco.used[:] = True
    disco.C = {m: torch.stack([i[m] for i in ids[:2]]) for m in ("text", "image")}
    images_seen = []
    real = disco.sample_similarity

    def spy(texts, image_tokens=None, has_image=None):
        images_seen.append(None if image_tokens is None else image_tokens.shape)
        return real(texts, image_tokens, has_image)

    monkeypatch.setattr(disco, "sample_similarity", spy)
    with disco.inference_gate(model, micro_samples[:3], 0):
        generate(model, batcher, micro_samples[:3], batch_size=2, max_new_tokens=2)
    assert images_seen == [(2, want.shape[0]), (1, want.shape[0])]  # one prefill per batch, pixels of that batch
    assert sum(st["n"] for st in disco.gate_stats["0"].values()) == 3
    assert len(subspace_layers(model)) == 6


def test_a_small_client_of_a_new_task_far_from_every_group_opens_its_own_subspace():
    # Issue 16: a client with 3% of the round's samples, of a task new in the round, at cosine 0.05 to the round's
    # other group and to the used slot. The min-share rule used to merge it into the nearest group by share alone.
    pair = torch.tensor([[1.0, 0.95, 0.95, 0.05], [0.95, 1.0, 0.95, 0.05], [0.95, 0.95, 1.0, 0.05],
                         [0.05, 0.05, 0.05, 1.0]])
    sim_c = torch.tensor([[0.2, 0.0, 0.0]] * 3 + [[0.05, 0.0, 0.0]])  # slot 0 used by an old task
    used = torch.tensor([True, False, False])
    counts = torch.tensor([10.0, 10.0, 12.0, 1.0])  # 1 / 33 = 3%
    slots, kinds = assign_slots(sim_c, pair, used, 0.9, counts=counts, min_share=0.05)
    assert slots == [1, 1, 1, 2] and kinds == ["new"] * 4
    # Same when the only group it could join is a matched one (its clients within tau of slot 0).
    sim_c2 = torch.tensor([[0.95, 0.0, 0.0]] * 3 + [[0.05, 0.0, 0.0]])
    slots, kinds = assign_slots(sim_c2, pair, used, 0.9, counts=counts, min_share=0.05)
    assert slots == [0, 0, 0, 1] and kinds == ["matched"] * 3 + ["new"]
    # And through DISCO's plan_round with hand-made tokens: cosine 0.05 between the two tasks.
    cfg = Config.model_validate({"method": {"name": "disco", "params": {"num_subspaces": 3}}})
    disco = Disco(cfg)
    a, b = _unit(1, 0, 0), _unit(0.05, math.sqrt(1 - 0.05 ** 2), 0)
    ids = [{"count": 16, "text": a}, {"count": 16, "text": a}, {"count": 1, "text": b}]
    info = StageInfo(stage=0, num_stages=1, tasks=[0], round=0, assigned=[["A"], ["A"], ["B"]])
    plan = disco.plan_round(info, ids, {})
    assert [p["subspace"] for p in plan.clients] == [0, 0, 1]


def test_a_small_group_within_tau_of_a_round_group_joins_it():
    # Client 3 (1 of 31 samples) is below tau to the group's anchor (client 0, the heaviest) but 0.97 to the two
    # others: mean similarity 0.93 >= tau, so it joins the group instead of founding a subspace on a noisy token.
    pair = torch.tensor([[1.0, 0.95, 0.95, 0.85], [0.95, 1.0, 0.95, 0.97], [0.95, 0.95, 1.0, 0.97],
                         [0.85, 0.97, 0.97, 1.0]])
    sim_c = torch.tensor([[0.2, 0.0, 0.0]] * 3 + [[0.75, 0.0, 0.0]])
    used = torch.tensor([True, False, False])
    counts = torch.tensor([10.0, 10.0, 10.0, 1.0])
    slots, kinds = assign_slots(sim_c, pair, used, 0.9, counts=counts, min_share=0.05)
    assert slots == [1, 1, 1, 1] and kinds == ["new"] * 3 + ["merged"]
    # A group above min_share never merges: it opens its own subspace.
    slots, kinds = assign_slots(sim_c, pair, used, 0.9, counts=counts, min_share=0.0)
    assert slots == [1, 1, 1, 2] and kinds == ["new"] * 4


def test_later_rounds_join_a_stage_slot_above_tau_and_open_a_free_slot_below():
    # Slot 0: an old task; slot 1: this stage's task (chosen in round 0); slot 2 free.
    C = torch.stack([_unit(0, 0, 1), _unit(1, 0, 0), torch.zeros(3)])
    used = torch.tensor([True, True, False])
    above = _unit(1, 0.2, 0)                   # cos 0.98 to slot 1
    below = _unit(1, 1.2, 0)                   # cos 0.64 to slot 1, 0 to slot 0
    near_old = _unit(0.5, 0, 1)                # cos 0.89 to slot 0, 0.45 to slot 1: below tau to both
    tokens = torch.stack([above, below, near_old])
    sim_c, pair = cosine_matrix(tokens, C), cosine_matrix(tokens, tokens)
    # the below-tau clients are not within tau of each other (cos 0.43): each opens a slot, but only one is free
    with pytest.warns(RuntimeWarning, match="all 3 subspaces are in use"):
        slots, kinds = assign_slots(sim_c, pair, used, 0.9, allow_new=False, stage_slots=[1], late_route="tau")
    assert slots[:2] == [1, 2] and kinds[:2] == ["nearest", "new"]
    # No free slot left: the overflowing client trains the nearest slot of the stage (the reference's rule), not the
    # nearer old slot 0, with a warning that names the knob.
    assert slots[2] == 1 and kinds[2] == "overflow"
    # A stage slot within tau wins even when an old slot is nearer; below tau to the stage's slots but within tau
    # of another used slot, a client trains that one as round 0 would (no duplicate subspace for a task).
    old_twin = _unit(0.1, 0, 1)                # cos 0.995 to slot 0, 0.1 to slot 1
    tokens = torch.stack([above, old_twin])
    slots, kinds = assign_slots(cosine_matrix(tokens, C), cosine_matrix(tokens, tokens), used, 0.9,
                                allow_new=False, stage_slots=[1], late_route="tau")
    assert slots == [1, 0] and kinds == ["nearest", "matched"]
    # The default, late_route="nearest": the reference's rule, the nearest stage slot at any similarity
    slots, kinds = assign_slots(sim_c, pair, used, 0.9, allow_new=False, stage_slots=[1])
    assert slots == [1, 1, 1] and kinds == ["nearest"] * 3


def test_disco_later_round_client_below_tau_opens_a_free_slot_and_one_above_joins():
    cfg = Config.model_validate({"method": {"name": "disco", "params": {"num_subspaces": 3, "late_route": "tau"}}})
    disco = Disco(cfg)
    a, far = _unit(1, 0, 0), _unit(0.3, 1, 0)  # cos 0.29
    close = _unit(1, 0.1, 0)  # cos 0.995 to a
    info = StageInfo(stage=0, num_stages=1, tasks=[0], round=0, assigned=[["A"], ["A"]])
    plan = disco.plan_round(info, [{"count": 8, "text": a}, {"count": 8, "text": a}], {})
    disco.update_tokens(plan, {0: [0, 1]})
    info = dataclasses.replace(info, round=1)
    plan = disco.plan_round(info, [{"count": 8, "text": close}, {"count": 8, "text": far}], {})
    assert [p["subspace"] for p in plan.clients] == [0, 1]
    assert [e["kind"] for e in disco.routing_log[-2:]] == ["nearest", "new"]
    disco.update_tokens(plan, {0: [0], 1: [1]})
    # round 2: the slot opened in round 1 is one of the stage's slots now
    info = dataclasses.replace(info, round=2)
    plan = disco.plan_round(info, [{"count": 8, "text": far}], {})
    assert [p["subspace"] for p in plan.clients] == [1] and disco.routing_log[-1]["kind"] == "nearest"


def _task_samples(direction: torch.Tensor, n: int, spread: float, gen: torch.Generator) -> torch.Tensor:
    """n unit "instruction embeddings" scattered around a task's direction."""
    x = direction + spread * torch.randn(n, direction.shape[0], generator=gen)
    return torch.nn.functional.normalize(x, dim=1)


def test_same_task_cosine_is_what_sampling_gives():
    gen = torch.Generator().manual_seed(0)
    d = torch.nn.functional.normalize(torch.randn(64, generator=gen), dim=0)
    pop = _task_samples(d, 20000, 0.15, gen)
    rho = float(pop.mean(0).pow(2).sum())
    for n in (1, 3, 30):
        cos = [float(torch.nn.functional.cosine_similarity(pop[torch.randperm(20000, generator=gen)[:n]].mean(0),
                                                          pop.mean(0), dim=0)) for _ in range(200)]
        assert abs(sum(cos) / len(cos) - float(routing.same_task_cosine(n, rho))) < 0.02
    assert float(routing.same_task_cosine(1e9, rho)) == pytest.approx(1.0)
    assert float(routing.same_task_cosine(1, 0.0)) == pytest.approx(0.5)  # never below RHO_MIN's


def test_a_three_sample_client_of_the_rounds_task_joins_its_subspace_with_the_sampling_correction():
    # Seeds 1 and 2 of the v4 comparison: a 3-sample FigureQA client's token sat below tau to the round's other
    # FigureQA clients, opened a subspace of its own (7.3% of the round, so above min_share) and left super-CLEVR,
    # the last task, none. Tokens here: means of unit vectors around two task directions at cosine 0.3, each
    # sample at cosine ~0.77 to its direction (rho ~0.6).
    gen = torch.Generator().manual_seed(3)
    a = torch.nn.functional.normalize(torch.randn(64, generator=gen), dim=0)
    u = torch.randn(64, generator=gen)
    u = torch.nn.functional.normalize(u - (u @ a) * a, dim=0)
    b = 0.3 * a + math.sqrt(1 - 0.09) * u
    counts = torch.tensor([19.0, 8.0, 8.0, 3.0, 3.0])
    tokens = torch.stack([_task_samples(a, int(n), 0.1, gen).mean(0) for n in counts[:4]]
                         + [_task_samples(b, 3, 0.1, gen).mean(0)])
    C = torch.zeros(3, 64)
    C[0] = _task_samples(b, 500, 0.1, gen).mean(0)  # task b had a subspace in an earlier stage
    used = torch.tensor([True, False, False])
    pair, sim_c = routing.cosine_matrix(tokens, tokens), routing.cosine_matrix(tokens, C)
    assert float(pair[0, 3]) < 0.9  # the raw similarity: client 3 is "another task"
    raw, _ = assign_slots(sim_c, pair, used, 0.9, counts=counts, min_share=0.05)
    assert raw[:3] == [1, 1, 1] and raw[3] == 2
    corr_c, corr_pair = routing.sampling_corrected(sim_c, pair, tokens, counts, C)
    slots, kinds = assign_slots(corr_c, corr_pair, used, 0.9, counts=counts, min_share=0.05)
    assert slots[:4] == [1, 1, 1, 1] and kinds[:4] == ["new"] * 4
    # task b's 3-sample client stays far from task a's clients and goes back to its own task's subspace
    assert float(corr_pair[0, 4]) < 0.5 and (slots[4], kinds[4]) == (0, "matched")
    # DISCO's server applies it to the MiniLM identity (means of unit vectors); sampling_correction=false does not
    for correct, want in ((True, [1, 1, 1, 1, 0]), (False, raw)):
        cfg = Config.model_validate({"method": {"name": "disco", "params": {"num_subspaces": 3,
                                                                            "sampling_correction": correct}}})
        disco = Disco(cfg)
        disco.C["text"] = C.clone()
        disco.used[0], disco.N[0] = True, 500.0
        ids = [{"count": int(n), "text": t} for n, t in zip(counts, tokens)]
        info = StageInfo(stage=1, num_stages=2, tasks=[1], round=0, assigned=[["A"]] * 4 + [["B"]])
        assert [p["subspace"] for p in disco.plan_round(info, ids, {}).clients] == want
