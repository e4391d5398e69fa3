"""The sections of a run config: data, teacher, student, baseline, distill, evaluate."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from alambic.config.augment import AugmentSettings
from alambic.config.base import ModelConfig, StrictModel, Term, TrainConfig
from alambic.losses import get_loss_spec


def _default_ce() -> list[Term]:
    return [Term(loss="ce")]


class TransferConfig(StrictModel):
    """A transfer set: inputs without labels that only the teacher labels, seen by the distill stage only.

    ``path``: a ``.txt`` / ``.jsonl`` file for text-classification sets; a ``.npy`` / ``.npz`` array or a
    folder of images for image sets (:mod:`alambic.data.transfer_files`). ``ratio``: transfer rows per
    labelled row in an epoch (``1.0``: as many as the training set has); null: every transfer row once
    per epoch.

    ``augment`` (instead of ``path``, text sets only): the training sentences augmented with the teacher's
    tokenizer and embedding table once the teacher exists (:mod:`alambic.data.augment`), written to
    ``RUN_DIR/transfer/augmented.txt`` with its sidecar and reused by a resumed run."""

    path: str | None = None
    augment: AugmentSettings | None = None
    ratio: float | None = Field(None, gt=0)
    max_rows: int | None = Field(None, ge=1)  # the file's first rows only
    field: str = "text"  # .jsonl: the key holding each example's text
    key: str | None = None  # .npz: the array holding the inputs (default: its only array)

    @model_validator(mode="after")
    def _one_source(self) -> TransferConfig:
        if (self.path is None) == (self.augment is None):
            raise ValueError(
                "give data.transfer one source: path (a file or folder) or augment (the training sentences "
                "augmented with the teacher's vocabulary)"
            )
        return self


class TeacherSamplesConfig(StrictModel):
    """``data.dataset: teacher-samples``: a causal-LM data set made of the teacher's own generations (a
    teacher without a tokenizer, such as a llama2.c checkpoint, works on token ids). Each row is ``prompt``
    (default: the teacher's BOS token) continued by ``new_tokens`` sampled tokens; ``samples`` rows train,
    ``validation`` fresh rows (another seed) are held out. Written once to ``RUN/teacher_samples/``."""

    samples: int = Field(2000, ge=1)
    validation: int = Field(200, ge=1)
    new_tokens: int = Field(255, ge=1)
    prompt: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)  # None: [bos_token_id]
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)  # None: the run's seed
    batch_size: int = Field(64, ge=1)  # rows generated at once


class DataConfig(StrictModel):
    """Which data set, where it lies, and how it is batched."""

    dataset: str = "digits"
    data_dir: str | None = None
    factory: str | None = None  # package.module:function, for dataset: custom
    factory_kwargs: dict[str, Any] = Field(default_factory=dict)
    augment: bool = False  # random crop with padding (+ horizontal flip for CIFAR)
    train_subset: int | None = Field(None, ge=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)  # for data sets without a test split (digits)
    eval_batch_size: int = Field(256, ge=1)
    num_workers: int = Field(0, ge=0)
    # text sets (sst2): a transformers tokenizer (folder or hub id); default: the hf: teacher's own.
    # language-model sets (text, jsonl): also "bytes" or "chars" (built in, for small models)
    tokenizer: str | None = None
    max_length: int = Field(128, ge=2)
    # token batches cut to their longest row (trailing padding dropped): text and language-model sets
    dynamic_padding: bool = False
    # training batches drawn from rows of similar length (then cut): far less padding; implies dynamic_padding
    group_by_length: bool = False
    # language-model sets: dataset text (plain text cut into blocks) or jsonl (prompt / completion, chat)
    train_file: str | None = None
    valid_file: str | None = None  # else the last valid_fraction of the training text
    valid_fraction: float = Field(0.1, gt=0, lt=1)
    block_size: int = Field(128, ge=2)  # tokens per training window
    stride: int | None = Field(None, ge=1)  # tokens between window starts; default block_size
    packing: bool = False  # jsonl: rows concatenated into blocks of block_size instead of padded
    transfer: TransferConfig | None = None  # unlabelled inputs the teacher labels (distill stage only)
    teacher_samples: TeacherSamplesConfig | None = None  # dataset teacher-samples: how they are generated

    @model_validator(mode="before")
    @classmethod
    def _grouping_cuts_padding(cls, data: Any) -> Any:
        # grouping rows by length pays only when the batches are then cut to their longest row. It turns
        # dynamic_padding on whatever that says: a resolved config (run directories, --set) writes every
        # default out, so a dynamic_padding: false there cannot be told from one a user wrote
        if isinstance(data, dict) and data.get("group_by_length") is True:
            return {**data, "dynamic_padding": True}
        return data


class TeacherConfig(StrictModel):
    model: ModelConfig
    train: TrainConfig | None = None  # trains the teacher when no checkpoint is given
    terms: list[Term] = Field(default_factory=_default_ce)


class StudentConfig(StrictModel):
    model: ModelConfig


class BaselineConfig(StrictModel):
    """The student trained alone on labels, same budget as the distilled one unless ``train`` is given."""

    terms: list[Term] = Field(default_factory=_default_ce)
    train: TrainConfig | None = None

    @field_validator("terms")
    @classmethod
    def _no_teacher(cls, terms: list[Term]) -> list[Term]:
        for term in terms:
            if get_loss_spec(term.loss).needs_teacher:
                raise ValueError(
                    f"the baseline trains without a teacher, so it cannot use loss {term.loss!r}"
                )
        return terms


class SequenceKDConfig(StrictModel):
    """Sequence-level KD (Kim & Rush 2016): the distilled student trains on the teacher's generations.

    Prompts are the first ``prompt_tokens`` tokens of ``samples`` training windows (a seeded draw; a
    window is drawn again when ``samples`` exceeds their number); the teacher continues each by
    ``new_tokens`` tokens, written once to ``RUN/teacher_generations/`` and reused on resume.

    ``prompts_file`` (JSONL, :func:`alambic.data.lm.read_prompts`) replaces the window prompts: the teacher
    answers each of its prompts once, rendered with the chat template's generation prompt, in at most
    ``new_tokens`` tokens ending at its EOS; the student trains on prompt + answer, the loss on the answer
    (``samples`` and ``prompt_tokens`` do not apply)."""

    samples: int = Field(256, ge=1)
    prompt_tokens: int = Field(8, ge=1)
    new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)  # 1: greedy decoding (Kim & Rush's beam of one)
    batch_size: int = Field(64, ge=1)  # prompts continued at once (a prompts_file's: one by one)
    # a JSONL file of prompts ({"messages": [...]} or {"prompt": str}) the teacher answers
    prompts_file: str | None = None


class RougeConfig(StrictModel):
    """``evaluate.rouge``: ROUGE-L F-measure (:mod:`alambic.core.rouge`) of each model's greedy answers to
    the first ``max_prompts`` prompts of ``file`` (held-out; :func:`alambic.data.lm.read_prompts`) against
    the file's answers (each row's final assistant message or ``completion``), as MiniLLM and DistiLLM
    report; answers stop at the tokenizer's EOS or after ``new_tokens`` tokens."""

    file: str
    max_prompts: int | None = Field(64, ge=1)  # null: every prompt of the file
    new_tokens: int = Field(64, ge=1)
    samples: int = Field(3, ge=0)  # answers shown side by side in summary.json and report.md


class OnPolicyConfig(StrictModel):
    """On-policy KD (GKD, Agarwal et al. 2024): with probability ``mix`` (GKD's lambda) a batch's
    completions are the student's own samples, scored by the live teacher through the token terms."""

    mix: float = Field(0.5, ge=0, le=1)
    temperature: float = Field(1.0, gt=0)
    # text windows: the first prompt_tokens tokens are the prompt, the rest of the window (block_size -
    # prompt_tokens tokens) is sampled; null: the data's own prompts (jsonl prompt / completion rows)
    prompt_tokens: int | None = Field(None, ge=1)


class DistillConfig(StrictModel):
    terms: list[Term] = Field(
        default_factory=lambda: [
            Term(loss="ce", weight=0.1),
            Term(loss="kd", weight=0.9, params={"temperature": 4.0}),
        ]
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    # the teacher's weights in bfloat16 / float16 take half the memory (outputs come back as float32);
    # int8 stores its Linear weights in int8, a quarter (torchao weight-only; alambic[quant])
    teacher_dtype: Literal["float32", "bfloat16", "float16", "int8"] = "float32"
    # a folder written by `alambic cache-teacher`: the teacher's stored outputs replace its forward pass
    teacher_cache: str | None = None
    # a Hugging Face causal-LM student: its token terms (lm_ce, forward_kl, ...) project its last hidden
    # states one chunk of tokens at a time, so its whole [B, T, V] logits never exist (core/fused_output.py)
    fused_output: bool = False
    sequence_kd: SequenceKDConfig | None = None  # task causal-lm: train on the teacher's generations
    on_policy: OnPolicyConfig | None = None  # task causal-lm: train on the student's own samples (GKD)


TokenBudget = Annotated[int, Field(ge=1)] | Literal["auto", "all"]


class EvaluateConfig(StrictModel):
    """How a run evaluates its models. A causal-LM run reads at most ``max_tokens`` held-out tokens for
    ``summary.json`` and ``epoch_max_tokens`` for each stage's per-epoch evaluation: whole windows spread
    evenly over the held-out set, the same for every model of one evaluation (KL to the teacher, bits per
    unit and the samples' prompts from them too). ``all``: every window; ``auto``: every window unless the
    largest model evaluated times the held-out tokens passes 10^12, then 10^12 / its parameters tokens
    (:func:`alambic.run.evaluation.held_out_windows`)."""

    max_tokens: TokenBudget = "auto"
    epoch_max_tokens: TokenBudget = "auto"

    @field_validator("max_tokens", "epoch_max_tokens", mode="before")
    @classmethod
    def _token_budget(cls, value: Any) -> Any:
        if value in ("auto", "all") or (type(value) is int and value >= 1):
            return value
        raise ValueError(f"give a number of held-out tokens >= 1, 'auto' or 'all' (got {value!r})")

    rouge: RougeConfig | None = None  # task causal-lm: ROUGE-L of greedy answers to held-out prompts
    latency_repeats: int = Field(20, ge=1)
    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 64], min_length=1)
    # CPU threads while timing: 1 by default, as on a phone or an edge core, and because on a shared
    # machine several threads make small models' timings swing by 100x. null keeps torch's default.
    latency_threads: int | None = Field(1, ge=1)
