"""One typed, validated configuration for a whole experiment.

Every knob lives here so a run directory's ``config.json`` fully describes the run. Validation happens before any
work starts and fails with one line naming the key (see ``load_config``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fcit.errors import FcitError


class _Strict(BaseModel):
    # No NaN/Infinity anywhere: `--set scenario.beta=Infinity` parses as JSON and would pass every bound.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# numpy's SeedSequence and torch.manual_seed both take this range; outside it they fail deep inside a run.
SEED_MAX = 2**32 - 1


class SynthConfig(_Strict):
    """FCIT-Synth generation knobs; the generated benchmark is cached per distinct value of this block."""

    seed: int = Field(0, ge=0, le=SEED_MAX)
    n_train: int = Field(1000, ge=10, description="training samples per dataset")
    n_test: int = Field(100, ge=5, description="test samples per dataset")
    n_pretrain: int = Field(20000, ge=10, description="samples in the generic description mixture (pre-training phase 1)")
    n_instruct: int = Field(20000, ge=10, description="samples in the generic instruction mixture (pre-training phase 2)")
    image_size: int = Field(48, ge=16, le=512)
    # 5: ImageNet-R and super-CLEVR asked in LLaVA-1.5's phrasing ("What is the object in the image?"), so two
    # tasks' identity tokens overlap as on real data (README "FCIT-Synth v5"). 4: the data of the tables measured
    # before 2026-12-07 (results/embedded-2026-12-01 and -12-06).
    version: Literal[4, 5] = Field(5, description="FCIT-Synth generator version (4: the tables before 2026-12-07)")


class DataConfig(_Strict):
    kind: Literal["synth", "real"] = "synth"
    # real: the folder holding instructions/<Dataset>/...; synth: where FCIT-Synth is cached (default: user cache dir)
    root: Optional[str] = None
    image_root: Optional[str] = None  # real: image root the `image` fields are relative to (default: root)
    partitions: Optional[str] = None  # released partitioned_data/ folder to import as-is instead of our Dirichlet draw
    synth: SynthConfig = SynthConfig()


class ScenarioConfig(_Strict):
    setting: Literal["task", "capability"] = "task"
    mode: Literal["hom", "het"] = "hom"
    num_clients: int = Field(50, ge=1)
    clients_per_round: int = Field(5, ge=1)
    rounds: int = Field(10, ge=1, description="communication rounds per stage")
    beta: float = Field(1.0, gt=0, description="Dirichlet quantity-skew concentration")
    min_size: int = Field(1, ge=1, description="minimum training samples per client and stage")
    stages: Optional[int] = Field(None, ge=1, description="run only the first N stages")
    task_order: Optional[list[str]] = None  # default: registry.TASK_ORDER
    capability_order: Optional[list[list[str]]] = None  # default: registry.CAPABILITY_ORDER
    het_table: Optional[list[list[int]]] = None  # per stage: position -> task index; default: reference section 4
    het_table_seed: Optional[int] = Field(None, ge=0, le=SEED_MAX)  # draw a Het table with this seed instead of the default

    @model_validator(mode="after")
    def _check(self) -> "ScenarioConfig":
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"clients_per_round ({self.clients_per_round}) must be <= num_clients ({self.num_clients})"
            )
        return self


class LoraConfig(_Strict):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # "ffn": every linear layer of the language model's feed-forward blocks, found from the model's structure
    # (fcit.models.structure); any other value is a regex of module names (re.fullmatch, as PEFT applies it).
    target: str = "ffn"


class ModelConfig(_Strict):
    path: Optional[str] = None  # local HF directory (e.g. llava-1.5-7b-hf); None = the embedded tiny base
    # With path None: the sha256 of the embedded base's weights, recorded by load_config (like compute_dtype auto),
    # so config.json and the run's identity say which base ran; a run recorded on another base is refused.
    embedded_base: Optional[str] = Field(None, pattern="^[0-9a-f]{64}$")
    # bfloat16/float16: a frozen base in that dtype, fp32 trainable tensors, autocast around every forward.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # The matmuls' dtype under autocast: None (or float32) = the base's dtype (no autocast for float32). bfloat16 on
    # an fp32 base keeps fp32 weights and trainables (the masters) and runs the matmuls on the CPU's bf16 units;
    # attention stays fp32 on the CPU. auto = bfloat16 for an fp32 base on a CPU with bf16 matrix instructions (AMX
    # or AVX512-BF16), where it is the faster path, else the base's dtype; load_config resolves it, so config.json
    # and the run's identity hold what ran. Not bit-equal to float32 (README "Speed of the embedded engine").
    compute_dtype: Optional[Literal["auto", "float32", "bfloat16", "float16"]] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "sdpa"

    # The embedded default freezes the projector: with one projector shared by every task, its drift was all of
    # DISCO's forgetting on the embedded benchmark (README "What was tried"). The reference trains it, and so do the
    # llava-1.5-7b preset and any run that sets it.
    train_projector: bool = False
    # Each of the two image caches (processed pixels by path, frozen vision-tower features by content) is an LRU of
    # at most this many MB; 0 = both off; None = min(2048 MB, 5% of RAM).
    vision_cache_mb: Optional[float] = Field(None, ge=0)
    system_prompt: str = ""  # set LLaVA-1.5's system sentence when tuning the real 7B checkpoint
    lora: LoraConfig = LoraConfig()
    # Load a checkpoint whose weights do not cover every parameter (those keep their random init): only for a
    # deliberately partial checkpoint; by default missing or misnamed weights are an error.
    allow_missing: bool = False

    @model_validator(mode="after")
    def _embedded_base(self) -> "ModelConfig":
        if self.path is not None and self.embedded_base is not None:
            raise ValueError("model.embedded_base names the embedded base: leave it unset with model.path")
        return self

    @model_validator(mode="after")
    def _compute_dtype(self) -> "ModelConfig":
        if self.compute_dtype == "float32" and self.dtype != "float32":
            raise ValueError(f"compute_dtype float32 needs dtype float32: a {self.dtype} base computes in {self.dtype}")
        return self


class TrainConfig(_Strict):
    lr: float = Field(2e-3, gt=0)
    # The shared projector's rate as a fraction of lr (reference scripts: mm_projector_lr 2e-5 with lr 2e-4).
    projector_lr_scale: float = Field(0.1, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    # 4 local passes: the embedded tiny model needs them to learn a task within one stage (measured, README)
    local_epochs: int = Field(4, ge=1)
    batch_size: int = Field(16, ge=1)
    # Gradient accumulation: each optimizer step still sees batch_size samples, in micro-batches of this size.
    micro_batch_size: Optional[int] = Field(None, ge=1, description="None = batch_size")
    gradient_checkpointing: bool = False
    max_grad_norm: float = Field(1.0, gt=0)
    # The fused LoRA forward and the loss on answer positions only (issue 13); False is the reference computation,
    # equal up to float rounding.
    fused: bool = True
    # Compile the decoder layers for local training (fcit.models.compiled): auto = on the CPU. How fast, not what is
    # computed (float rounding only), so it is not part of a run's identity.
    compile: bool | Literal["auto"] = "auto"
    # None = template + image tokens + 256 text tokens, capped at the LM's positions (256 for the embedded model).
    max_length: Optional[int] = Field(None, ge=16, description="token budget of one training sequence")


class MethodConfig(_Strict):
    name: str = "finetune"
    params: dict[str, Any] = {}


class FederationConfig(_Strict):
    # inprocess: every client in this process; flower-sim: Flower's simulation engine (Ray); flower: a Flower
    # deployment (a SuperLink and one SuperNode per institution, see the `flower` section and `fcit node`).
    engine: Literal["inprocess", "flower-sim", "flower"] = "inprocess"
    # inprocess: a round's clients train in this many worker processes at once (threads split between them); 1 = all
    # in this process. None = the CPU cores (at most the clients per round) on a CPU, 1 on a GPU.
    workers: Optional[int] = Field(None, ge=1, description="in-process engine: client worker processes (None = auto)")
    # Flower engines: a round goes on with the clients that replied if there are at least this many, else the run
    # stops (resumable from the last finished stage).
    min_replies: int = Field(1, ge=1)
    round_timeout: float = Field(3600.0, gt=0, description="seconds to wait for a round's replies (Flower engines)")
    # Server optimizer over the pseudo-gradient of whatever tensors a method aggregates (reference 3.1).
    aggregator: Literal["fedavg", "fedavgm", "fedadam", "fedadagrad", "fedyogi"] = "fedavg"
    server_lr: Optional[float] = Field(
        None, gt=0, description="server step size; default 1.0 for fedavg/fedavgm, 1e-3 for the adaptive ones"
    )
    weighting: Literal["samples", "uniform"] = "samples"  # client weights in the pseudo-gradient
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    # Off: Reddi et al.'s Algorithm 2 as written. On: Kingma & Ba's correction per tensor slot (Flower's FedAdam
    # applies it), so a subspace added mid-run steps at full size from its first round; see server_opt.py.
    bias_correction: bool = Field(
        False, description="bias-correct the server optimizers' moments (per tensor slot; FedAvg has none)"
    )
    # Reddi et al. call it tau; named for what it is, so it is not mistaken for DISCO's routing threshold tau.
    adaptivity: float = Field(1e-3, gt=0, description="adaptivity (Reddi et al.'s tau) of FedAdam/FedAdagrad/FedYogi")
    prox_mu: float = Field(0.0, ge=0, description="FedProx proximal coefficient on the client (0 = off)")
    # The clients train the projector at train.projector_lr_scale x their rate, and FedAvg's step inherits that
    # ratio; an adaptive server step normalises each coordinate and loses it. Setting this to the same factor keeps
    # it (1 = one server rate for every tensor, as Reddi et al.).
    projector_rate_scale: float = Field(
        1.0, gt=0, description="server step of the projector's tensors as a multiple of server_lr (not FedAvg's)"
    )


class FlowerConfig(_Strict):
    """Where and how the Flower engines run (ignored by the in-process engine)."""

    superlink: Optional[str] = Field(None, description="flower: the SuperLink's address HOST:PORT")
    insecure: bool = Field(False, description="flower: plain-text gRPC; only on a trusted network or for tests")
    root_certificates: Optional[str] = Field(None, description="flower: CA certificate (PEM) of the SuperLink")
    client_cpus: Optional[float] = Field(None, gt=0, description="flower-sim: CPUs per client actor (default 1)")
    client_gpus: float = Field(0.0, ge=0, description="flower-sim: GPUs per client actor")
    cpus: Optional[int] = Field(None, ge=1, description="flower-sim: CPUs Ray may use (default: all cores)")
    ray_address: Optional[str] = Field(None, description="flower-sim: join this Ray cluster instead of a local one")

    @model_validator(mode="after")
    def _check(self) -> "FlowerConfig":
        if self.insecure and self.root_certificates:
            raise ValueError("set at most one of insecure and root_certificates")
        return self


class EvalConfig(_Strict):
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(24, ge=1)
    max_test: Optional[int] = Field(None, ge=1, description="cap on test samples per dataset")
    # reference: the reference's decisions (exact match; "contains" for FigureQA/DVQA); lenient: read the letter,
    # the first number or the first word out of the prediction (fcit.eval.scorers).
    scoring: Literal["reference", "lenient"] = "reference"
    # After the last stage, also score the benchmark's datasets that no task of the setting holds (zero-shot
    # transfer; Task-related: AOKVQA, Grounding, DVQA, TabMWP): metrics.json "unseen", outside the matrix.
    unseen: bool = False
    # Score the general set (FCIT-Synth's held-out generic instructions, the analogue of MME/POPE) on the base before
    # stage 1 and on the final model after the last stage: metrics.json "retention" (fcit.eval.general).
    retention: bool = False


class Config(_Strict):
    seed: int = Field(0, ge=0, le=SEED_MAX)
    device: str = Field("auto", description="auto (a GPU when one is visible, else the CPU), cpu, cuda or cuda:N")
    threads: Optional[int] = Field(None, ge=1, description="torch CPU threads (default: all cores)")
    out_dir: str = "runs"
    run_name: Optional[str] = None
    data: DataConfig = DataConfig()
    scenario: ScenarioConfig = ScenarioConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    method: MethodConfig = MethodConfig()
    federation: FederationConfig = FederationConfig()
    flower: FlowerConfig = FlowerConfig()
    eval: EvalConfig = EvalConfig()

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        import re

        from fcit.env import DEVICE_PATTERN

        if not re.match(DEVICE_PATTERN, v):
            raise ValueError("expected auto, cpu, cuda or cuda:N")
        return v


# LLaVA-1.5's vicuna_v1 system sentence (conv_vicuna_v1; the reference trains and evaluates with it, section 1.1).
LLAVA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the user's questions.")

# Presets are overrides on top of the defaults above, so the defaults stay the single source of truth.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "smoke": {
        "data": {"synth": {"n_train": 40, "n_test": 8, "n_pretrain": 200, "n_instruct": 200}},
        "scenario": {"num_clients": 4, "clients_per_round": 2, "rounds": 2, "stages": 2},
        # Seconds of training: starting worker processes (about 4 s) would cost more than they save.
        "federation": {"workers": 1},
        # A compile (5-20 s a process) would cost more than the few steps it speeds up.
        "train": {"batch_size": 8, "local_epochs": 1, "compile": False},
        "eval": {"batch_size": 16, "max_new_tokens": 12},
    },
    # The reference's Task-related setting on LLaVA-1.5-7B (reference section 2): LoRA 64/128/0.05 on the FFN,
    # AdamW 2e-4, warmup 0.03 + cosine, one local epoch, effective batch 128, bf16, checkpointing; greedy 128 tokens.
    # The projector is trained, as the reference does, at fcit's lr/10 (the reference asked for it; its trainer
    # ignored it). model.path is required.
    "llava-1.5-7b": {
        "device": "auto",
        "model": {"dtype": "bfloat16", "system_prompt": LLAVA_SYSTEM, "train_projector": True,
                  "lora": {"r": 64, "alpha": 128.0, "dropout": 0.05}},
        "train": {"lr": 2e-4, "weight_decay": 0.0, "warmup_ratio": 0.03, "local_epochs": 1, "batch_size": 128,
                  "micro_batch_size": 16, "gradient_checkpointing": True, "max_grad_norm": 1.0},
        "eval": {"batch_size": 64, "max_new_tokens": 128},
    },
}
# Presets of a real checkpoint: there is no default for model.path.
_NEEDS_MODEL_PATH = {"llava-1.5-7b"}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise FcitError(f"config: {dotted}: {k} is not a section")
    d[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``key.sub=value``; the value is read as JSON when it parses (numbers, lists, null), else as a string."""
    if "=" not in item:
        raise FcitError(f"config override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def one_line(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]) or "config"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    got = e.get("input")
    tail = "" if e["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"config: {loc}: {msg}{tail}{more}"


def _parse_error(exc: Exception) -> str:
    """One line with the position: YAML's own message puts the line number on a later line of the text."""
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        return f"line {mark.line + 1} col {mark.column + 1}: {what}"
    if isinstance(exc, json.JSONDecodeError):
        return f"line {exc.lineno} col {exc.colno}: {exc.msg}"
    return str(exc).splitlines()[0]


def resolve_auto(cfg: Config) -> Config:
    """Settle the settings whose default depends on the machine (``model.compute_dtype=auto``) or on the installed
    fcit (``model.embedded_base``), in place, so that config.json and the run's identity hold what the run computes
    with."""
    if cfg.model.compute_dtype == "auto":
        from fcit.hardware import auto_compute_dtype

        cfg.model.compute_dtype = auto_compute_dtype(cfg.model.dtype, cfg.device)
    if cfg.model.path is None:
        from fcit.embedded import check_embedded_base, embedded_base_sha256

        check_embedded_base(cfg.model.embedded_base)
        cfg.model.embedded_base = embedded_base_sha256()  # None before `fcit pretrain` builds it; loading says so
    return cfg


def load_config(
    path: str | Path | None = None, preset: str = "default", overrides: list[str] | dict[str, Any] | None = None
) -> Config:
    """Defaults <- preset <- file <- overrides, validated once. Raises FcitError with one line on any problem."""
    if preset not in PRESETS:
        raise FcitError(f"config: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    raw: dict[str, Any] = copy.deepcopy(PRESETS[preset])  # overrides mutate nested dicts: never the preset itself
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FcitError(f"config: file not found: {p}")
        text = p.read_text()
        try:
            if p.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as exc:  # noqa: BLE001 - any parse error becomes one line
            raise FcitError(f"config: cannot parse {p}: {_parse_error(exc)}") from None
        if not isinstance(data, dict):
            raise FcitError(f"config: {p}: top level must be a mapping")
        raw = _merge(raw, data)
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for k, v in items:
        _set_dotted(raw, k, v)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise FcitError(one_line(err)) from None
    resolve_auto(cfg)
    if preset in _NEEDS_MODEL_PATH and not (cfg.model.path and Path(cfg.model.path).expanduser().is_dir()):
        raise FcitError(f"config: model.path: preset {preset} needs the local checkpoint directory, e.g. "
                        f"--set model.path=/models/llava-1.5-7b-hf (got {cfg.model.path!r})")
    return cfg
