"""The settings: seven groups (:data:`GROUPS`), ``TrainingConfig`` made of them with flat
names, and the two loaders that build it: fresh and from a checkpoint.

Fresh precedence, lowest first: field defaults < presets (GPT-2 fine-tuning, ``TEST_MODE``)
< config file (TOML) < environment variables < command-line flags. On resume the checkpoint's
saved hyperparameters replace defaults and presets; explicit settings may override training
settings, and an explicit architecture setting that contradicts the checkpoint is an error.
Every value remembers where it came from (:attr:`LoadedConfig.sources`).
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lmtrain.errors import UserError
from lmtrain.paths import not_a_file, path_problem, user_path
from lmtrain.unicode_text import not_text

DEFAULT_CORPUS = str(resources.files("lmtrain") / "corpus" / "shakespeare.txt")


class Settings(BaseModel):
    """What every settings group shares: unknown names, non-finite numbers and changes after
    validation are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _text(cls, value: Any) -> Any:
        """Text settings hold text (no invalid UTF-8 from an argument or env var)."""
        problem = not_text(value) if isinstance(value, str) else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("training_data_source", "cache_dir", "gpt2_model_name", "checkpoint_dir",
                     "checkpoint_path", "log_dir", "output_dir", check_fields=False)
    @classmethod
    def _usable_path(cls, value: Any) -> Any:
        """A path setting the OS can use (a name it can hold, a ``~user`` it knows)."""
        problem = path_problem(value) if isinstance(value, str) else None
        if problem:
            raise ValueError(f"not a usable path: {problem}")
        return value


class ModelSettings(Settings):
    """What the network is: architecture, shape, the pretrained base and its LoRA adapters."""

    model_type: Literal["from_scratch", "gpt2"] = Field(
        "from_scratch", description="from_scratch GPT or pretrained gpt2")
    use_lora: bool = Field(False, description="train LoRA adapters instead of all weights")
    arch: Literal["gpt2", "llama"] = Field(
        "llama", description="from-scratch architecture: gpt2 | llama (rotary, RMSNorm, SwiGLU)")
    qk_norm: bool = Field(True, description="ARCH=llama: RMSNorm on queries and keys")
    n_layer: int = Field(4, ge=0, description="transformer blocks (0 = bigram model)")
    n_head: int = Field(4, ge=1, description="attention heads")
    n_embd: int = Field(128, ge=1, description="embedding width")
    block_size: int = Field(64, ge=1, description="context length in tokens")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout probability")
    gpt2_model_name: str = Field(
        "gpt2", description="GPT-2 folder (save_pretrained layout) or hub id in the local cache")
    allow_download: bool = Field(
        False, description="let MODEL_TYPE=gpt2 and hf: data sources download from the hub")
    lora_r: int = Field(8, ge=1, description="LoRA rank")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha (scale = alpha / r)")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout")
    lora_targets: str = Field("c_attn,c_proj,c_fc", description="comma-separated module names")
    gradient_checkpointing: bool = Field(
        False, description="MODEL_TYPE=gpt2: recompute activations in backward (less memory)")

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelSettings:
        if self.model_type == "from_scratch" and self.n_layer > 0 and self.n_embd % self.n_head:
            raise ValueError(
                f"N_EMBD={self.n_embd} must be divisible by N_HEAD={self.n_head}")
        if (self.model_type == "from_scratch" and self.arch == "llama" and self.n_layer > 0
                and (self.n_embd // self.n_head) % 2):
            raise ValueError(f"ARCH=llama needs an even head width for rotary positions; "
                             f"N_EMBD / N_HEAD = {self.n_embd // self.n_head}")
        if self.gradient_checkpointing and self.model_type != "gpt2":
            raise ValueError("GRADIENT_CHECKPOINTING=1 needs MODEL_TYPE=gpt2")
        return self

    @property
    def lora_target_list(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]


class DataSettings(Settings):
    """What the model reads: the source, its tokenizer, the token cache and the split."""

    training_data_source: str = Field(
        DEFAULT_CORPUS, description="text file, folder, glob, .jsonl, .parquet/.arrow file or "
                                    "folder, or hf:NAME[:CONFIG][@SPLIT] (default: bundled "
                                    "corpus)")
    text_field: str = Field(
        "text", description="field (column) holding the text in .jsonl and dataset sources")
    tokenization_method: Literal["character", "gpt2", "custom_bpe"] = Field(
        "character", description="character | gpt2 | custom_bpe (from-scratch model)")
    custom_vocab_size: int = Field(
        1024, ge=260, le=65535, description="vocabulary size of the learned BPE")
    drop_unknown_chars: bool = Field(
        False, description="on resume, drop characters outside the saved vocabulary")
    cache_dir: str | None = Field(None, description="token-array cache (default: user cache)")
    train_split: float = Field(
        0.9, gt=0.0, lt=1.0,
        description="fraction of tokens for training (of records, for question/answer records)")
    data_format: Literal["auto", "text", "qa", "alpaca", "chat"] = Field(
        "auto", description="auto (from the first record's fields) | text | qa {question, "
                            "answer} | alpaca {instruction, input, output} | chat {messages}")
    qa_template: str = Field(
        "QUESTION: {question} ANSWER: {answer}",
        description="how a question/answer record is rendered; the end of text follows each "
                    "answer")
    loss_on: Literal["auto", "all", "answers"] = Field(
        "auto", description="auto (answers for question/answer records, else all) | all | "
                            "answers (answer tokens and the end of text only)")
    answer_prefix: str = Field(
        "ANSWER:", min_length=1,
        description="LOSS_ON=answers on plain text: text that starts an answer")

    @field_validator("qa_template")
    @classmethod
    def _check_template(cls, value: str) -> str:
        counts = [value.count(f"{{{name}}}") for name in ("question", "answer")]
        if counts != [1, 1] or value.index("{question}") > value.index("{answer}"):
            raise ValueError("it must hold {question} once, then {answer} once")
        return value


class OptimizationSettings(Settings):
    """How the weights move: steps, batch, optimizer, schedule, seed and the NaN policy."""

    training_steps: int = Field(800, ge=0, description="planned total optimizer steps")
    learning_rate: float = Field(
        3e-3, gt=0.0, description="peak learning rate (AdamW; with Muon: embeddings, head, norms)")
    optimizer: Literal["adamw", "muon"] = Field(
        "muon", description="adamw | muon (Muon for hidden matrices, AdamW for the rest)")
    muon_learning_rate: float = Field(
        0.01, gt=0.0, description="OPTIMIZER=muon: peak learning rate of the Muon matrices")
    batch_size: int = Field(32, ge=1, description="sequences per step (per process)")
    grad_accum_steps: int = Field(1, ge=1, le=1_000_000,
                                  description="micro-batches per optimizer step")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW weight decay (matrices only)")
    grad_clip: float = Field(1.0, ge=0.0, description="max gradient norm (0 = off)")
    lr_scheduler: Literal["none", "cosine"] = Field("cosine", description="none | cosine")
    warmup_steps: int = Field(50, ge=0, description="linear warmup steps")
    lr_decay_steps: int | None = Field(
        None, ge=1, description="cosine horizon (default: TRAINING_STEPS, saved with the run)")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final lr / peak lr (cosine)")
    seed: int = Field(1337, ge=0, lt=2**63, description="random seed")
    on_nan: Literal["stop", "skip"] = Field("stop", description="non-finite loss: stop | skip")

    @property
    def decay_horizon(self) -> int:
        return self.lr_decay_steps or max(self.training_steps, 1)


class EvaluationSettings(Settings):
    """How often a run measures itself and says so."""

    eval_interval: int = Field(250, ge=1, description="steps between evaluations")
    eval_iters: int = Field(
        50, ge=0, le=1_000_000,
        description="batches per evaluation (0 = no evaluation, not even at the end)")
    log_interval: int = Field(50, ge=1, description="steps between progress lines")
    eval_answers: int = Field(
        256, ge=0, description="held-out questions answered greedily at each evaluation of "
                               "question/answer records (0 = off)")


class GenerationSettings(Settings):
    """How text is sampled at the end of a run and by ``lmtrain sample``."""

    max_new_tokens: int = Field(
        300, ge=0, le=1_000_000,
        description="tokens generated per sample (at the end of a run; lmtrain sample)")
    prompt: str | None = Field(
        None, description="generation prompt (gpt2 default 'QUESTION: ', else empty)")
    temperature: float = Field(0.8, ge=1e-3, description="sampling temperature")
    top_k: int | None = Field(200, ge=1, description="sample from the k most likely tokens")
    top_p: float = Field(
        1.0, gt=0.0, le=1.0, description="sample from the most likely tokens holding this "
                                         "probability mass (nucleus; 1 = off)")
    stop_at_eot: bool = Field(True, description="generation stops at the end-of-text token")


class CheckpointSettings(Settings):
    """Whether, where and how often checkpoints are written, and what to resume from."""

    enable_checkpoints: bool = Field(True, description="write checkpoints")
    checkpoint_interval: int = Field(500, ge=1, description="steps between checkpoints")
    checkpoint_dir: str = Field("checkpoints", description="checkpoints go to DIR/<run name>/")
    keep_last_checkpoints: int = Field(3, ge=1, description="step checkpoints kept (+ best)")
    checkpoint_path: str | None = Field(
        None, description="checkpoint to resume from, or 'auto' for the run's newest")
    resume_steps: int | None = Field(None, ge=0, description="steps to run after resuming")


class RunSettings(Settings):
    """Where this run reports (name, logs, trackers, outputs) and the machine it runs on."""

    log_dir: str = Field("logs", description="run logs, metrics and plots go to DIR/<run name>/")
    metrics: str = Field(
        "jsonl", description="comma list of jsonl (always on), tensorboard, wandb, mlflow")
    enable_output_to_file: bool = Field(False, description="write settings+losses+sample file")
    output_dir: str = Field("outputs", description="where ENABLE_OUTPUT_TO_FILE writes")
    run_name: str | None = Field(
        None, description="run name (default: model-data-timestamp; model-data with "
                          "CHECKPOINT_PATH=auto)")

    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto | fp32 | bf16 | fp16 (autocast)")
    compile: bool = Field(False, description="torch.compile the model")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: ddp (each process holds the model) | fsdp (weights, "
                           "gradients and optimizer state sharded; sharded checkpoints)")
    test_mode: bool = Field(False, description="tiny preset that finishes in seconds")

    @field_validator("metrics", mode="before")
    @classmethod
    def _metrics_list(cls, value: Any) -> str:
        from lmtrain.trackers import normalize_metrics

        return normalize_metrics(value)


#: The settings groups in the order ``--help`` and the README list them. Each module takes the
#: group(s) it needs (``config.model``, ``config.optimization``...), never the whole config.
GROUPS: dict[str, type[Settings]] = {
    "model": ModelSettings, "data": DataSettings, "optimization": OptimizationSettings,
    "evaluation": EvaluationSettings, "generation": GenerationSettings,
    "checkpointing": CheckpointSettings, "run": RunSettings,
}
#: Each setting's group name (flat name -> group label).
GROUP_OF = {name: label for label, group in GROUPS.items() for name in group.model_fields}


class TrainingConfig(Settings):
    """Every setting of a run, composed of its seven groups (:data:`GROUPS`): ``config.model``
    is a :class:`ModelSettings`, ``config.optimization`` an :class:`OptimizationSettings`...
    A function typed with one group takes that group, never the whole config.

    Users name settings flat: field ``x`` of any group is env var ``X``, flag ``--x`` and TOML
    key ``x``. The flat names are mapped onto the groups here, once (:meth:`_nest`), and
    :meth:`flat` gives them back (checkpoints save them flat). Cross-group rules live in the
    loaders.
    """

    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    optimization: OptimizationSettings = OptimizationSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    generation: GenerationSettings = GenerationSettings()
    checkpointing: CheckpointSettings = CheckpointSettings()
    run: RunSettings = RunSettings()

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, values: Any) -> Any:
        """Flat setting names (``{"n_layer": 2}``) onto their groups (``{"model": {...}}``);
        an unknown name stays at the top, where it is refused by name."""
        if not isinstance(values, Mapping):
            return values
        nested: dict[str, Any] = {}
        for name, value in values.items():
            label = GROUP_OF.get(name)
            if label is None:
                nested[name] = value
            else:
                nested.setdefault(label, {})[name] = value
        return nested

    @classmethod
    def from_flat(cls, **settings: Any) -> TrainingConfig:
        """A validated config from flat setting names (``from_flat(n_layer=2)``)."""
        return cls.model_validate(settings)

    def flat(self) -> dict[str, Any]:
        """Every setting by its flat name (what checkpoints and the settings lines show)."""
        return {name: value for label in GROUPS
                for name, value in getattr(self, label).model_dump().items()}

    def value(self, name: str) -> Any:
        """One setting by its flat name."""
        return getattr(getattr(self, GROUP_OF[name]), name)

    def replace(self, **changes: Any) -> TrainingConfig:
        """A validated copy with some settings (flat names) changed."""
        return TrainingConfig.model_validate({**self.flat(), **changes})

    def with_facts(self, **facts: Any) -> TrainingConfig:
        """A copy with values lmtrain settled itself once the config was validated (a run's
        name and resume file, the schedule's horizon, a GPT-2 folder's real shape), set
        without validating the whole config again."""
        groups: dict[str, dict[str, Any]] = {}
        for name, value in facts.items():
            groups.setdefault(GROUP_OF[name], {})[name] = value
        return self.model_copy(update={label: getattr(self, label).model_copy(update=update)
                                       for label, update in groups.items()})


#: Every setting, group by group (model first), as pydantic ``FieldInfo``s.
FIELDS = {name: info for group in GROUPS.values() for name, info in group.model_fields.items()}

#: Settings fixed by the checkpoint: an explicit different value on resume is an error.
#: (GPT2_MODEL_NAME may change, e.g. a moved folder: LoRA checks the base's fingerprint and a
#: full fine-tune's weights must fit the model built from it.)
ARCHITECTURE_FIELDS = frozenset({
    "model_type", "use_lora", "n_layer", "n_head", "n_embd", "block_size", "arch", "qk_norm",
    "optimizer",
    "lora_r", "lora_alpha", "lora_targets", "tokenization_method", "custom_vocab_size",
})
#: A GPT-2 run's shape: its model decides it (``lmtrain.models.gpt2.gpt2_shape``, recorded by
#: the plan).
GPT2_SHAPE_FIELDS = ("n_layer", "n_head", "n_embd")
#: Run settings added with the llama/Muon recipe, as every checkpoint without them was trained.
SETTINGS_BEFORE_RECIPE: dict[str, Any] = {"arch": "gpt2", "qk_norm": False, "optimizer": "adamw"}
#: Where *this invocation* works, never what the run *is*: what to resume, every path lmtrain
#: writes or deletes under, the run's name, rotation, downloads, the machine and the outputs.
#: Never taken from a checkpoint (a file someone hands you is data, not a command).
INVOCATION_FIELDS = frozenset({
    "checkpoint_path", "resume_steps", "test_mode", "run_name", "checkpoint_dir", "log_dir",
    "output_dir", "cache_dir", "keep_last_checkpoints", "allow_download",
    "enable_output_to_file", "enable_checkpoints", "metrics", "device", "compile",
    "gradient_checkpointing", "parallel",
})

TEST_MODE_PRESET: dict[str, Any] = {
    "training_steps": 20, "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32,
    "batch_size": 4, "eval_interval": 10, "eval_iters": 2, "log_interval": 5,
    "checkpoint_interval": 10, "warmup_steps": 2, "max_new_tokens": 40,
    "custom_vocab_size": 300,
}
GPT2_PRESET: dict[str, Any] = {
    "learning_rate": 5e-5, "batch_size": 8, "block_size": 128, "training_steps": 500,
    "warmup_steps": 50, "eval_interval": 100, "eval_iters": 20, "checkpoint_interval": 100,
    "tokenization_method": "gpt2", "max_new_tokens": 100, "optimizer": "adamw",
}
GPT2_LORA_PRESET: dict[str, Any] = {"learning_rate": 3e-4}
GPT2_TEST_MODE_PRESET: dict[str, Any] = {
    "training_steps": 6, "batch_size": 2, "block_size": 32, "eval_interval": 3, "eval_iters": 2,
    "log_interval": 2, "checkpoint_interval": 3, "warmup_steps": 1, "max_new_tokens": 10,
}


@dataclass(frozen=True)
class Preset:
    """Defaults a fresh run takes when ``applies`` to its explicit settings."""

    label: str  #: how ``lmtrain train --help`` names it
    source: str  #: where a value it sets came from, in the run's settings lines
    values: dict[str, Any]
    #: whether it applies, given :data:`PRESET_SWITCHES` (checked values, defaults filled in)
    applies: Callable[[Mapping[str, Any]], bool]


#: The presets, in the order they apply (a later one wins).
PRESETS: tuple[Preset, ...] = (
    Preset("MODEL_TYPE=gpt2", "gpt2 preset", GPT2_PRESET, lambda v: v["model_type"] == "gpt2"),
    Preset("gpt2 + USE_LORA", "gpt2 lora preset", GPT2_LORA_PRESET,
           lambda v: v["model_type"] == "gpt2" and v["use_lora"]),
    Preset("TEST_MODE", "test_mode preset", TEST_MODE_PRESET, lambda v: v["test_mode"]),
    Preset("TEST_MODE gpt2", "test_mode preset", GPT2_TEST_MODE_PRESET,
           lambda v: v["test_mode"] and v["model_type"] == "gpt2"),
)
#: The settings that decide which presets apply.
PRESET_SWITCHES = ("model_type", "use_lora", "test_mode")


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "unset" if value is None else str(value)


def setting_help(name: str, default_text: str | None = None) -> str:
    """A setting's help: what it does, its env twin, its default and what presets set it to;
    ``default_text`` replaces the default and presets (``lmtrain sample``: "the run's")."""
    info = FIELDS[name]
    text = info.description or ""
    default = _shown(info.default)
    said = re.search(r"\s*\(default: ([^)]*)\)", text)  # a default the description explains
    if said:
        text, default = text[:said.start()] + text[said.end():], said.group(1)
    if default_text is not None:
        return f"{text} [env {env_name(name)}; default: {default_text}]"
    presets = "".join(f"; {p.label}: {_shown(p.values[name])}" for p in PRESETS
                      if name in p.values)
    return f"{text} [env {env_name(name)}; default: {default}{presets}]"


def env_name(name: str) -> str:
    return name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class LoadedConfig:
    """A validated config plus, for each field, the name of the source that set it."""

    config: TrainingConfig
    sources: dict[str, str] = field(default_factory=dict)

    def explicit(self) -> dict[str, str]:
        return {k: v for k, v in self.sources.items() if v not in ("default",)}

    def describe(self) -> list[str]:
        """One line per non-default setting: ``name = value  (source)``."""
        data = self.config.flat()
        return [f"{k} = {data[k]!r}  ({src})" for k, src in sorted(self.sources.items())
                if src != "default"]


def read_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The settings present in the environment (empty values count as unset)."""
    environ = os.environ if environ is None else environ
    out = {}
    for name in FIELDS:
        value = environ.get(env_name(name))
        if value is not None and value.strip() != "":
            out[name] = value.strip()
    return out


#: First words that several settings share: an unknown variable starting with one is a typo.
SETTING_PREFIXES = frozenset(
    word for word in (n.split("_")[0] for n in FIELDS)
    if sum(m.startswith(word + "_") for m in FIELDS) > 1)


def env_typos(environ: Mapping[str, str] | None = None) -> list[str]:
    """Warnings for environment variables that look like a misspelt setting: close to a
    setting's name, or starting with a word that settings share (``TRAINING_``, ``LORA_``)."""
    environ = os.environ if environ is None else environ
    names = [env_name(n) for n in FIELDS]
    out = []
    for var in sorted(environ):
        if var in names or not var.isupper():
            continue
        prefix = var.split("_")[0]
        close = difflib.get_close_matches(var, names, n=1, cutoff=0.85)
        if not close and "_" in var and prefix.lower() in SETTING_PREFIXES:
            family = [n for n in names if n.startswith(prefix + "_")]
            close = difflib.get_close_matches(var, family, n=1, cutoff=0.5) or [
                " or ".join(family)]
        if close:
            out.append(f"{var} is not a setting and is ignored; did you mean {close[0]}?")
    return out


def read_config_file(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Settings from a TOML file; keys are setting names in any case (``training_steps``)."""
    if not path:
        return {}
    p = user_path(path, "--config")
    problem = not_a_file(p)
    if problem:
        raise UserError(f"--config {path}: {problem}; pass a TOML file of settings")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--config {path}: not valid TOML ({exc})") from None
    raw = raw.get("lmtrain", raw) if isinstance(raw.get("lmtrain"), dict) else raw
    out = {}
    for key, value in raw.items():
        name = key.lower().replace("-", "_")
        if name not in FIELDS:
            close = difflib.get_close_matches(name, list(FIELDS), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UserError(f"--config {path}: unknown setting '{key}'; {hint}"
                            f"see `lmtrain train --help`")
        if isinstance(value, bool) and bool not in _annotation_types(name):
            raise UserError(f"--config {path}: {key} = {str(value).lower()} is true/false, "
                            f"not {_expected(name)}; write the value itself")
        out[name] = value
    return out


def _annotation_types(name: str) -> tuple[Any, ...]:
    """The types a setting's annotation names (``int | None`` -> ``(int, NoneType)``)."""
    ann = FIELDS[name].annotation
    return getattr(ann, "__args__", None) or (ann,)


def settle(values: dict[str, Any], sources: dict[str, str]) -> LoadedConfig:
    """The one validation of a run's merged settings ``values`` (flat names; ``sources``
    says where each came from, and names it in the one-line error)."""
    try:
        return LoadedConfig(TrainingConfig.model_validate(values), sources)
    except ValidationError as exc:
        raise UserError(_explain(exc, values, sources)) from None


def _explain(exc: ValidationError, values: dict[str, Any], sources: dict[str, str]) -> str:
    err = exc.errors()[0]
    loc = [str(part) for part in err.get("loc") or ()]
    name = loc[1] if len(loc) > 1 and loc[0] in GROUPS else (loc[0] if loc else "")
    if name in FIELDS:
        shown = values.get(name, FIELDS[name].default)
        return _invalid(name, f"{env_name(name)}={shown!r} (from {sources.get(name, 'default')})",
                        err["msg"])
    return f"invalid settings: {err['msg'].removeprefix('Value error, ')}"


def _invalid(name: str, given: str, msg: str) -> str:
    """The one line for a bad value of setting ``name``: ``given`` (``X=value``, and where it
    came from), pydantic's ``msg``, what the setting expects and what it does."""
    return (f"{given} is invalid: {msg.lower()}; expected {_expected(name)} — "
            f"{FIELDS[name].description or ''}")


def check_value(name: str, value: Any, label: str) -> Any:
    """``value`` checked against setting ``name``'s field alone (type, bounds, finiteness) and
    converted; otherwise its one-line error, naming ``label`` (a flag or env var)."""
    return _check_alone(name, value, f"{label}={value!r}")


def _check_alone(name: str, value: Any, given: str) -> Any:
    """``value`` checked and converted as setting ``name``'s field alone; ``given`` names it
    in the one-line error."""
    from pydantic import TypeAdapter

    info = FIELDS[name]
    kind: Any = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
    adapter: TypeAdapter[Any] = TypeAdapter(kind, config=ConfigDict(allow_inf_nan=False))
    try:
        checked = adapter.validate_python(value)
    except ValidationError as exc:
        raise UserError(_invalid(name, given, exc.errors()[0]["msg"])) from None
    problem = not_text(checked) if isinstance(checked, str) else None
    if problem:
        raise UserError(_invalid(name, given, problem))
    return checked


def _checked(name: str, values: Mapping[str, Any], sources: Mapping[str, str]) -> Any:
    """Explicit setting ``name`` checked alone and converted; its default when not given."""
    if name not in values:
        return FIELDS[name].default
    given = f"{env_name(name)}={values[name]!r} (from {sources.get(name, 'default')})"
    return _check_alone(name, values[name], given)


def _expected(name: str) -> str:
    ann = str(FIELDS[name].annotation)
    for word, text in (("Literal", "one of the listed values"), ("bool", "1/0 or true/false"),
                       ("int", "a whole number"), ("float", "a number"), ("str", "text")):
        if word in ann:
            if word == "Literal":
                choices = getattr(FIELDS[name].annotation, "__args__", ())
                return "one of " + ", ".join(map(str, choices))
            return text
    return "a valid value"


def _layer(values: dict[str, Any], sources: dict[str, str], new: Mapping[str, Any], src: str):
    for k, v in new.items():
        values[k] = v
        sources[k] = src


def explicit_settings(
    *, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge config file < env < flags; returns (values, sources)."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    _layer(values, sources, read_config_file(config_file), "config file")
    _layer(values, sources, read_env(env), "env")
    _layer(values, sources, dict(flags or {}), "flag")
    return values, sources


def merge_fresh(values: dict[str, Any], sources: dict[str, str],
                ) -> tuple[dict[str, Any], dict[str, str]]:
    """A fresh run's settings, not yet validated: defaults < presets < explicit ``values``;
    returns (values, where each came from)."""
    switches = {name: _checked(name, values, sources) for name in PRESET_SWITCHES}
    merged: dict[str, Any] = {}
    merged_src: dict[str, str] = {k: "default" for k in FIELDS}
    for preset in PRESETS:
        if preset.applies(switches):
            _layer(merged, merged_src, preset.values, preset.source)
    _layer(merged, merged_src, values, "")
    for k in values:
        merged_src[k] = sources[k]
    return merged, merged_src


def load_fresh(values: dict[str, Any], sources: dict[str, str]) -> LoadedConfig:
    """Fresh run: defaults < presets < explicit settings, validated."""
    return settle(*merge_fresh(values, sources))


def check_settings(values: dict[str, Any], sources: dict[str, str]) -> None:
    """Check each explicit setting alone before any checkpoint is read or torch imported, so a
    bad value fails in a fraction of a second. Their combination (with presets, defaults or,
    on resume, the checkpoint's) is validated once, by the run's plan."""
    for name in values:
        if name in FIELDS:
            _checked(name, values, sources)


def saved_run_settings(saved: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint's hyperparameters say the run *is*: every setting but this
    invocation's (:data:`INVOCATION_FIELDS`); a checkpoint from before the llama/Muon recipe
    gets the settings it was trained with (:data:`SETTINGS_BEFORE_RECIPE`)."""
    base = {k: v for k, v in saved.items() if k in FIELDS and k not in INVOCATION_FIELDS}
    for k, v in SETTINGS_BEFORE_RECIPE.items():
        base.setdefault(k, v)
    return base


def merge_resumed(saved: Mapping[str, Any], values: dict[str, Any], sources: dict[str, str],
                  ) -> tuple[dict[str, Any], dict[str, str]]:
    """A resumed run's settings, not yet validated: the checkpoint's hyperparameters, then the
    explicit overrides it allows; returns (values, where each came from)."""
    base = saved_run_settings(saved)
    merged_src = {k: "checkpoint" for k in base}
    for k in FIELDS:
        merged_src.setdefault(k, "default")
    merged = dict(base)
    for k, v in values.items():
        if k in GPT2_SHAPE_FIELDS and base.get("model_type") == "gpt2":
            pass  # checked against the model itself (older checkpoints saved the defaults)
        elif k in ARCHITECTURE_FIELDS and k in base:
            if _checked(k, values, sources) != base[k]:
                raise UserError(
                    f"{env_name(k)}={v!r} (from {sources[k]}) contradicts the checkpoint, which "
                    f"was trained with {env_name(k)}={base[k]!r}; unset it to resume, or start "
                    f"a fresh run without CHECKPOINT_PATH")
            continue
        merged[k] = v
        merged_src[k] = sources[k]
    return merged, merged_src


def load_resumed(saved: Mapping[str, Any], values: dict[str, Any], sources: dict[str, str],
                 ) -> LoadedConfig:
    """Resume: the checkpoint's hyperparameters, then allowed explicit overrides, validated."""
    return settle(*merge_resumed(saved, values, sources))
