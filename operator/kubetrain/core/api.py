"""The TrainingRun resource: the single source of truth.

The CRD's OpenAPI schema (``kubetrain.core.crd``), the README's field reference
(``kubetrain.docgen.fields``) and the validation messages of ``kubetrain validate`` and the
operator all come from the models in this module. Each field carries its
documentation and its default where it is declared.

Cross-field rules are declared twice on purpose, side by side: once as a Python
validator (so ``kubetrain validate`` and the operator give the same message offline)
and once as a CEL expression (``CEL_RULES`` on the model class) that the API server
enforces. Both live on the same class so they cannot drift apart unnoticed; the unit
tests feed the same bad manifests to both.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, ClassVar, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import ErrorDetails

# The one apiVersion a TrainingRun is served at, as a type (what the model's field accepts)
# and as a value; the API group and version are its two halves.
ApiVersion = Literal["kubetrain.dev/v1alpha1"]
API_VERSION: Final[ApiVersion] = "kubetrain.dev/v1alpha1"
GROUP, VERSION = API_VERSION.split("/")
KIND: Final = "TrainingRun"
PLURAL = "trainingruns"
SINGULAR = "trainingrun"
# `kubectl get ktr`. Not `tr`: Tekton's TaskRun has claimed it, and on a cluster with both
# kubectl resolves `tr` to whichever CRD discovery lists first.
SHORT_NAMES = ["ktr"]
# `kubectl get kubetrain` lists every run. Not `all`: `kubectl delete all --all`, a common
# way to clear a namespace of workloads, would delete training runs too, and with them
# their Jobs and the record of what a run has trained and spent.
CATEGORIES = ["kubetrain"]

# The built-in tokenizer is byte-level: 256 byte values plus special tokens (see
# kubetrain_trainer.tokenizer). A smaller vocabulary could not encode arbitrary text.
BYTE_VOCAB_MIN = 260

# Stage names become part of Job, Service and Pod host names (`<run>-<stage>-<index>`),
# which must be DNS-1123 labels of at most 63 characters.
STAGE_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
STAGE_NAME_MAX = 20
URI_PATTERN = r"^(s3|file)://.+$"
DATA_SOURCE_PATTERN = r"^(synthetic:[a-z][a-z0-9-]*|s3://.+|file://.+)$"
# A built-in reward's name, or a Python entry point ``package.module:function``.
REWARD_FUNCTION_PATTERN = (
    r"^(exact-match|format"
    r"|[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*)$"
)
# A non-negative Kubernetes resource.Quantity, as the API server parses it
# (resource.ParseQuantity): a decimal number, then a binary suffix (Ki..Ei), a decimal
# suffix (n, u, m, k, M..E) or a decimal exponent. The API server's looser pattern lets
# "-4" and "1..2" through the CRD, and the Job create then fails for ever.
QUANTITY_PATTERN = (
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE][-+]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
# Label keys (node selectors, toleration keys): an optional DNS-subdomain prefix and a
# name of at most 63 characters (Kubernetes' "qualified name"); label values: at most 63
# characters of the same alphabet, or empty.
LABEL_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]"
LABEL_PREFIX = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
LABEL_KEY_PATTERN = rf"^({LABEL_PREFIX}/)?{LABEL_NAME}$"
LABEL_VALUE_PATTERN = rf"^({LABEL_NAME})?$"


def wire_name(field: str) -> str:
    """snake_case -> the camelCase the manifest uses; units stay upper case (costUSD,
    energyKWh) as in the Kubernetes API conventions for acronyms."""
    return to_camel(field).replace("Usd", "USD").replace("Kwh", "KWh")


class _Model(BaseModel):
    """Base: camelCase names on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=wire_name,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )
    # CEL rules (x-kubernetes-validations) attached to this object in the CRD.
    CEL_RULES: ClassVar[list[dict[str, str]]] = []


class StageType(StrEnum):
    pretrain = "pretrain"
    sft = "sft"
    dpo = "dpo"
    grpo = "grpo"


# Stage types that optimise a policy against a frozen reference (the policy they start
# from): they need a fine-tuned model to start from.
REFERENCE_STAGE_TYPES = (StageType.dpo, StageType.grpo)


# The built-in model's architecture where the manifest leaves a field out (and no Hugging
# Face `from` folder supplies it).
BUILTIN_LAYERS = 2
BUILTIN_HEADS = 2
BUILTIN_DIM = 64
BUILTIN_CONTEXT = 64
# The training sequence length of a stage of a `from` model whose contextLength the
# manifest does not give: TRL's default max_length, so recipes carry over.
FROM_MODEL_SEQ_LEN = 1024


class ModelSpec(_Model):
    """The model to train: the built-in decoder-only transformer (nanoGPT-style, tied
    embeddings), or an existing model given by ``from``."""

    layers: int | None = Field(
        None,
        ge=1,
        le=256,
        description=f"Number of transformer blocks (built-in model: default {BUILTIN_LAYERS}; "
        "with a Hugging Face `from`: config.json's, and a value given here must equal it).",
    )
    heads: int | None = Field(
        None,
        ge=1,
        le=256,
        description=f"Attention heads per block; must divide `dim` (default {BUILTIN_HEADS}; "
        "with a Hugging Face `from`: config.json's).",
    )
    dim: int | None = Field(
        None,
        ge=8,
        le=65536,
        description=f"Model width (embedding size; default {BUILTIN_DIM}; with a Hugging "
        "Face `from`: config.json's hidden size).",
    )
    context_length: int | None = Field(
        None,
        ge=8,
        le=1048576,
        description=f"Longest sequence the model attends over, in tokens (default "
        f"{BUILTIN_CONTEXT}; with a Hugging Face `from`: config.json's "
        "max_position_embeddings, and the training sequence length defaults to "
        f"{FROM_MODEL_SEQ_LEN}).",
    )
    vocab_size: int | None = Field(
        None,
        ge=BYTE_VOCAB_MIN,
        le=1048576,
        description=f"Vocabulary size; at least {BYTE_VOCAB_MIN} for the byte-level tokenizer "
        f"(default {BYTE_VOCAB_MIN}; with a Hugging Face `from`: config.json's).",
    )
    from_: str | None = Field(
        None,
        alias="from",
        pattern=URI_PATTERN,
        description=(
            "Start from an existing model (`s3://...` or `file://...`) instead of random "
            "weights: a Hugging Face model folder (config.json, *.safetensors, tokenizer; "
            "Llama 2/3, Mistral, Qwen2/2.5/3 or GPT-2 architectures), whose config.json "
            "gives the architecture and whose tokenizer and chat template are used; or a "
            "kubetrain checkpoint or stage folder (its FINAL pointer) of the built-in model, "
            "whose architecture the fields above must describe."
        ),
    )

    CEL_RULES: ClassVar[list[dict[str, str]]] = [
        {
            # Without `from`, unset fields take the built-in defaults; with one, only
            # fields given here can be checked (config.json supplies the others).
            "rule": "has(self.from) ? (!has(self.dim) || !has(self.heads) || "
            "self.dim % self.heads == 0) : "
            f"(has(self.dim) ? self.dim : {BUILTIN_DIM}) % "
            f"(has(self.heads) ? self.heads : {BUILTIN_HEADS}) == 0",
            "message": "model.dim must be a multiple of model.heads",
            "fieldPath": ".heads",
        },
    ]

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> ModelSpec:
        heads, dim = self.heads, self.dim
        if self.from_ is None:
            heads, dim = heads or BUILTIN_HEADS, dim or BUILTIN_DIM
        if heads is not None and dim is not None and dim % heads:
            raise ValueError(
                f"model.heads={heads} must divide model.dim={dim} "
                f"(accepted: a divisor of {dim}, e.g. {_divisors_hint(dim)})"
            )
        return self

    @property
    def context_limit(self) -> int | None:
        """The longest sequence the manifest itself allows: contextLength, or the built-in
        default without ``from``; None when a ``from`` model's config decides."""
        if self.context_length is not None:
            return self.context_length
        return BUILTIN_CONTEXT if self.from_ is None else None


class S3Storage(_Model):
    """An S3 bucket (or S3-compatible store) for checkpoints and progress."""

    bucket: str = Field(
        ...,
        min_length=3,
        max_length=63,
        pattern=r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$",
        description="Bucket that holds checkpoints and progress records.",
    )
    prefix: str = Field(
        "kubetrain",
        max_length=512,
        pattern=r"^[A-Za-z0-9._/-]*$",
        description="Key prefix; objects live under `<prefix>/<namespace>/<run>/<stage>/`.",
    )
    endpoint: str | None = Field(
        None,
        pattern=r"^https?://.+$",
        description="Endpoint URL of an S3-compatible store (MinIO, Ceph ...); AWS when unset.",
    )
    region: str = Field("us-east-1", max_length=64, description="Region of the bucket.")
    credentials_secret: str | None = Field(
        None,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description=(
            "Secret in the run's namespace with keys AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, passed to pods by secretKeyRef (never copied). When "
            "unset, pods use their ambient credentials (IRSA, instance profile)."
        ),
    )

    def uri(self) -> str:
        """The store root as an ``s3://bucket/prefix`` URI."""
        prefix = self.prefix.strip("/")
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"


class Storage(_Model):
    """Where the run keeps checkpoints and progress records."""

    s3: S3Storage | None = Field(
        None,
        description=(
            "S3 (or compatible) store for checkpoints. Required on a cluster; a local run "
            "without it uses `file://.kubetrain/store`."
        ),
    )


class DataSpec(_Model):
    """Training and evaluation data of a stage."""

    source: str = Field(
        "synthetic:arithmetic",
        max_length=1024,
        pattern=DATA_SOURCE_PATTERN,
        description=(
            "Where examples come from: `synthetic:<task>` (generated in code, reproducible; "
            "task `arithmetic`), or a `s3://`/`file://` URI. For a Hugging Face model: JSON "
            "Lines, or Parquet (a `.parquet` name), with rows `{text}` for pretrain, "
            "`{messages}` or `{prompt, completion}` for sft and `{prompt, chosen, rejected}` "
            "for dpo (strings, or lists of `{role, content}` messages rendered with the "
            "model's chat template; loss on the completion only). For the built-in model: a "
            "text file for pretrain, JSONL `{prompt, response}` for sft, JSONL "
            "`{prompt, chosen, rejected}` for dpo. For either: JSONL `{prompt, ...}` for grpo "
            "(the other keys, e.g. `answer`, go to the rewards)."
        ),
    )
    eval_examples: int = Field(
        200, ge=0, le=100000, description="Held-out examples used for evaluation (0: none)."
    )
    seed: int = Field(0, ge=0, description="Seed for generating and shuffling the data.")


class Hyperparameters(_Model):
    """Optimisation settings of a stage."""

    max_steps: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="Optimizer steps to train. Set at most one of `maxSteps` and `tokens`; "
        "with neither, 100 steps.",
    )
    tokens: int | None = Field(
        None,
        ge=1,
        le=10**15,
        description="Train until this many tokens were seen (converted to steps from the "
        "global batch and `seqLen`).",
    )
    batch_size: int = Field(
        16,
        ge=1,
        le=65536,
        description="Sequences per process per micro-batch (grpo: prompts, each sampled "
        "`grpo.generations` times).",
    )
    gradient_accumulation: int = Field(
        1, ge=1, le=1024, description="Micro-batches accumulated per optimizer step."
    )
    learning_rate: float = Field(1e-3, gt=0, le=1, description="Peak learning rate (AdamW).")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate decay after warm-up."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW decoupled weight decay.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm (0: off).")
    seq_len: int | None = Field(
        None,
        ge=8,
        description="Training sequence length; at most `model.contextLength` (its default; "
        f"{FROM_MODEL_SEQ_LEN} with a `from` model whose contextLength is not given).",
    )
    beta: float = Field(
        0.1,
        gt=0,
        le=10,
        description="dpo and grpo: strength of the KL penalty to the frozen reference model.",
    )
    eval_every: int = Field(
        0, ge=0, description="Evaluate every N steps (0: only when the stage ends)."
    )
    log_every: int = Field(10, ge=1, description="Write the progress record every N steps.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="`auto`: bf16 autocast on CUDA, fp32 on CPU."
    )
    compile: bool = Field(False, description="Wrap the model in torch.compile.")
    seed: int = Field(0, ge=0, description="Seed for initialisation and data order.")

    CEL_RULES: ClassVar[list[dict[str, str]]] = [
        {
            "rule": "!(has(self.maxSteps) && has(self.tokens))",
            "message": "set at most one of hyperparameters.maxSteps and hyperparameters.tokens",
        },
    ]

    @model_validator(mode="after")
    def _one_length(self) -> Hyperparameters:
        if self.max_steps is not None and self.tokens is not None:
            raise ValueError(
                "set at most one of hyperparameters.maxSteps and hyperparameters.tokens "
                f"(got maxSteps={self.max_steps}, tokens={self.tokens})"
            )
        return self


class Toleration(_Model):
    """A pod toleration, as in the Pod API and checked by its rules."""

    key: str | None = Field(
        None,
        max_length=316,
        pattern=LABEL_KEY_PATTERN,
        description="Taint key the toleration applies to; unset (with operator Exists) "
        "tolerates every taint.",
    )
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: str | None = Field(
        None,
        max_length=63,
        pattern=LABEL_VALUE_PATTERN,
        description="Taint value for operator Equal; empty for Exists.",
    )
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; all effects when unset."
    )
    toleration_seconds: int | None = Field(
        None, description="For NoExecute: how long the pod stays bound after the taint."
    )

    CEL_RULES: ClassVar[list[dict[str, str]]] = [
        {
            "rule": "has(self.key) && self.key != '' || self.operator == 'Exists'",
            "message": "a toleration without a key must use operator Exists",
        },
        {
            "rule": "self.operator != 'Exists' || !has(self.value) || self.value == ''",
            "message": "a toleration with operator Exists must not set a value",
        },
        {
            "rule": "!has(self.tolerationSeconds) || has(self.effect) && "
            "self.effect == 'NoExecute'",
            "message": "tolerationSeconds needs effect NoExecute",
        },
    ]

    @model_validator(mode="after")
    def _pod_api_rules(self) -> Toleration:
        if not self.key and self.operator != "Exists":
            raise ValueError(
                f"operator={self.operator!r} needs a key (accepted: a key with Equal, "
                "or operator Exists without a key to tolerate every taint)"
            )
        if self.operator == "Exists" and self.value:
            raise ValueError(
                f"value={self.value!r} with operator Exists (accepted: no value with Exists, "
                "or operator Equal)"
            )
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError(
                f"tolerationSeconds={self.toleration_seconds} with effect={self.effect!r} "
                "(accepted: tolerationSeconds only with effect NoExecute)"
            )
        return self


LabelKey = Annotated[str, StringConstraints(max_length=316, pattern=LABEL_KEY_PATTERN)]
LabelValue = Annotated[str, StringConstraints(max_length=63, pattern=LABEL_VALUE_PATTERN)]


class Resources(_Model):
    """Pods, GPUs and placement of a stage."""

    # JSON Schema's propertyNames has no place in a structural CRD schema: CEL checks the
    # node selector's keys instead.
    CEL_RULES: ClassVar[list[dict[str, str]]] = [
        {
            # Backslashes doubled: a CEL string literal knows no escape such as '\.'.
            "rule": "!has(self.nodeSelector) || self.nodeSelector.all(k, "
            f"k.matches('{LABEL_KEY_PATTERN.replace(chr(92), chr(92) * 2)}'))",
            "message": "nodeSelector keys must be label keys ([prefix/]name, name at most "
            "63 characters of letters, digits, '-', '_' and '.')",
            "fieldPath": ".nodeSelector",
        },
    ]

    nodes: int = Field(1, ge=1, le=1024, description="Pods (one per node) in the stage's Job.")
    gpus_per_node: int = Field(
        0, ge=0, le=16, description="`nvidia.com/gpu` per pod; 0 trains on CPU."
    )
    processes_per_node: int | None = Field(
        None,
        ge=1,
        le=256,
        description="torchrun processes per pod; defaults to `gpusPerNode` (1 on CPU).",
    )
    gpu_type: str | None = Field(
        None,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="GPU model (e.g. `h100`, `a100`): prices the run, estimates power, and "
        "selects nodes labelled `kubetrain.dev/gpu-type=<gpuType>`.",
    )
    cpu: str | None = Field(
        None, pattern=QUANTITY_PATTERN, description="CPU request and limit per pod (quantity)."
    )
    memory: str | None = Field(
        None, pattern=QUANTITY_PATTERN, description="Memory request and limit per pod (quantity)."
    )
    node_selector: dict[LabelKey, LabelValue] = Field(
        default_factory=dict,
        max_length=16,
        description="Extra node labels the pods require.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Tolerations for GPU node taints."
    )

    @property
    def processes(self) -> int:
        """torchrun processes per pod."""
        return self.processes_per_node or max(self.gpus_per_node, 1)


class BuiltinReward(StrEnum):
    """The verifiable rewards the trainer ships (``kubetrain_trainer.rewards``)."""

    exact_match = "exact-match"
    answer_format = "format"


class Reward(_Model):
    """One reward function of a grpo stage; a completion's reward is the weighted sum."""

    function: str = Field(
        ...,
        max_length=256,
        pattern=REWARD_FUNCTION_PATTERN,
        description="`exact-match` (1 when the completion, stripped, equals the example's "
        "`answer`), `format` (1 when the completion is just a number), or a Python entry "
        "point `package.module:function` importable in the trainer image, called as "
        "`function(prompts, completions, **columns)` with the data's other keys as columns "
        "and returning one number (or None: not applicable) per completion.",
    )
    weight: float = Field(1.0, ge=-100, le=100, description="Multiplier of this reward.")


class GRPO(_Model):
    """Group Relative Policy Optimization (DeepSeekMath; TRL's GRPOTrainer): per prompt,
    sample `generations` completions, score them, normalise the rewards within the
    group, optimise the clipped policy-gradient objective with `hyperparameters.beta`
    times the KL divergence to the frozen starting policy."""

    generations: int = Field(
        8,
        ge=2,
        le=256,
        description="Completions sampled per prompt (G); `hyperparameters.batchSize` counts "
        "prompts, so a micro-batch has batchSize x generations sequences.",
    )
    max_completion_tokens: int = Field(
        16, ge=1, le=65536, description="Longest completion sampled, in tokens."
    )
    temperature: float = Field(1.0, gt=0, le=10, description="Sampling temperature.")
    top_p: float = Field(
        1.0, gt=0, le=1, description="Nucleus sampling: smallest token set of this mass."
    )
    epsilon: float = Field(
        0.2, gt=0, le=1, description="Clip range of the probability ratio (1 ± epsilon)."
    )
    iterations: int = Field(
        1,
        ge=1,
        le=64,
        description="Optimizer steps on each batch of completions (μ); above 1 the ratio to "
        "the sampling policy moves and clipping applies.",
    )
    loss_type: Literal["dapo", "grpo"] = Field(
        "dapo",
        description="Loss normalisation as in TRL: `dapo` averages over every completion "
        "token of the global batch (no length bias), `grpo` averages each completion over "
        "its tokens, then over completions (DeepSeekMath's formula).",
    )
    rewards: list[Reward] = Field(
        default_factory=lambda: [Reward(function=BuiltinReward.exact_match.value)],
        min_length=1,
        max_length=16,
        description="Reward functions, summed with their weights.",
    )


class ParallelStrategy(StrEnum):
    """How a stage's processes share the model."""

    auto = "auto"
    ddp = "ddp"
    fsdp = "fsdp"


class ActivationCheckpointing(StrEnum):
    """Which activations the backward pass recomputes instead of keeping."""

    none = "none"
    selective = "selective"
    full = "full"


class Parallelism(_Model):
    """How the model, its gradients and optimizer state are spread over the processes."""

    strategy: ParallelStrategy = Field(
        ParallelStrategy.auto,
        json_schema_extra={"maxLength": 8},
        description="`ddp`: every process holds the whole model, gradients and AdamW "
        "state (fastest while they fit); `fsdp`: FSDP2, parameters, gradients and "
        "optimizer state sharded over the processes, each transformer block gathered "
        "only while it runs; `auto`: `fsdp` when ~16 bytes per parameter (weights, "
        "gradients, AdamW moments) take more than half of one GPU's memory, else `ddp`.",
    )
    cpu_offload: bool = Field(
        False,
        description="fsdp: keep the sharded parameters, gradients and optimizer state in "
        "host memory and run AdamW on the CPU (fits a bigger model, trains slower).",
    )
    activation_checkpointing: ActivationCheckpointing = Field(
        ActivationCheckpointing.none,
        json_schema_extra={"maxLength": 16},
        description="`none`: keep every activation; `selective`: keep the matmul and "
        "attention outputs of each transformer block, recompute the cheap element-wise "
        "ops in the backward pass; `full`: keep only each block's input and recompute the "
        "block (least memory, ~1/3 more compute).",
    )
    async_checkpoint: bool = Field(
        True,
        description="fsdp: upload checkpoints in the background while training goes on "
        "(the step waits only for a copy of the state in host memory); false: training "
        "waits for every upload.",
    )

    CEL_RULES: ClassVar[list[dict[str, str]]] = [
        {
            "rule": "!self.cpuOffload || self.strategy != 'ddp'",
            "message": "parallelism.cpuOffload needs strategy fsdp or auto (accepted: "
            "cpuOffload false with ddp)",
            "fieldPath": ".cpuOffload",
        },
    ]

    @model_validator(mode="after")
    def _offload_needs_sharding(self) -> Parallelism:
        if self.cpu_offload and self.strategy == ParallelStrategy.ddp:
            raise ValueError(
                "parallelism.cpuOffload=true needs strategy fsdp or auto (got strategy ddp; "
                "accepted: cpuOffload false with ddp)"
            )
        return self


class Stage(_Model):
    """One step of the curriculum, run as an Indexed Job."""

    name: str = Field(
        ...,
        min_length=1,
        max_length=STAGE_NAME_MAX,
        pattern=STAGE_NAME_PATTERN,
        description="Stage name, unique in the run (lowercase letters, digits, '-').",
    )
    # maxLength bounds the cost the API server estimates for the CEL rules over types.
    type: StageType = Field(
        ...,
        json_schema_extra={"maxLength": 16},
        description="Objective: `pretrain` (next token), `sft` (response tokens only), "
        "`dpo` (preference pairs against the frozen previous stage), `grpo` (sampled "
        "completions scored by rewards, against the frozen previous stage).",
    )
    data: DataSpec = Field(default_factory=DataSpec, description="Training data.")
    hyperparameters: Hyperparameters = Field(
        default_factory=Hyperparameters, description="Optimisation settings."
    )
    resources: Resources = Field(default_factory=Resources, description="Pods and GPUs.")
    checkpoint_every: int = Field(
        50, ge=1, description="Save a checkpoint every N steps (and always at the end)."
    )
    keep_checkpoints: int = Field(
        2, ge=1, le=100, description="Complete checkpoints kept; older ones are deleted."
    )
    max_restarts: int = Field(
        3,
        ge=0,
        le=100,
        description="Pod failures retried (resuming from the last checkpoint) before the "
        "run fails.",
    )
    parallelism: Parallelism = Field(
        default_factory=Parallelism,
        description="How the processes share the model: DDP or FSDP2, CPU offload, "
        "activation checkpointing, asynchronous checkpoints.",
    )
    grpo: GRPO | None = Field(
        None,
        description="Sampling, rewards and clipping of a `grpo` stage (its defaults "
        "when unset); only for type `grpo`.",
    )

    CEL_RULES: ClassVar[list[dict[str, str]]] = [
        {
            "rule": "!has(self.grpo) || self.type == 'grpo'",
            "message": "stages[].grpo is only for stages of type grpo",
            "fieldPath": ".grpo",
        },
    ]

    @model_validator(mode="after")
    def _grpo_settings_on_grpo(self) -> Stage:
        if self.grpo is not None and self.type != StageType.grpo:
            raise ValueError(
                f"grpo is set on stage {self.name!r} of type {self.type.value} (accepted: "
                "grpo settings only on a stage of type grpo)"
            )
        return self

    @property
    def grpo_settings(self) -> GRPO:
        """The stage's GRPO settings, defaults filled in."""
        return self.grpo or GRPO()


class Pricing(_Model):
    """Prices and carbon intensity used for cost and CO2."""

    gpu_hour_usd: float | None = Field(
        None,
        ge=0,
        description="Price of one GPU-hour; when unset, the operator's price table by "
        "`gpuType` (chart values).",
    )
    energy_usd_per_kwh: float = Field(
        0.0, ge=0, description="Price of energy, added on top of GPU-hours (0: included)."
    )
    pue: float = Field(1.2, ge=1, le=5, description="Power usage effectiveness of the data centre.")
    carbon_grams_per_kwh: float = Field(
        400.0, ge=0, le=2000, description="Grid carbon intensity, grams CO2 per kWh."
    )


class BudgetAction(StrEnum):
    Suspend = "Suspend"
    Fail = "Fail"


class Budget(_Model):
    """Limits that stop the run when reached."""

    max_cost_usd: float | None = Field(None, gt=0, description="Stop at this cost.")
    max_gpu_hours: float | None = Field(
        None, gt=0, alias="maxGPUHours", description="Stop at this many GPU-hours."
    )
    max_energy_kwh: float | None = Field(None, gt=0, description="Stop at this energy.")
    projected: bool = Field(
        False,
        description="Also stop when the projection to the end of the curriculum exceeds a "
        "limit, instead of waiting until it is reached.",
    )
    action: BudgetAction = Field(
        BudgetAction.Suspend,
        description="`Suspend` (checkpoint, phase Suspended; raise the budget and unsuspend "
        "to go on) or `Fail`.",
    )


class TrainingRunSpec(_Model):
    """What to train, how, where, and within which budget."""

    model: ModelSpec = Field(default_factory=ModelSpec, description="The model to train.")
    image: str | None = Field(
        None, max_length=512, description="Trainer image; the operator's default when unset."
    )
    storage: Storage = Field(default_factory=Storage, description="Where checkpoints live.")
    stages: list[Stage] = Field(
        ..., min_length=1, max_length=16, description="Stages, run strictly in order."
    )
    pricing: Pricing = Field(default_factory=Pricing, description="Prices and carbon.")
    budget: Budget = Field(default_factory=Budget, description="Limits that stop the run.")
    suspend: bool = Field(
        False, description="Stop the active stage after a checkpoint; `false` continues."
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        description="Delete the run's Jobs and Services this long after it finished.",
    )
    queue_name: str | None = Field(
        None,
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Kueue LocalQueue (in the run's namespace) that admits each stage's Job "
        "as one gang; the run's `kueue.x-k8s.io/queue-name` label when unset. Without "
        "either, Jobs start at once (no queueing).",
    )
    automount_service_account_token: bool = Field(
        False,
        description="Mount the pods' ServiceAccount token; off by default, since the trainer "
        "does not call the Kubernetes API.",
    )

    CEL_RULES: ClassVar[list[dict[str, str]]] = [
        {
            "rule": "self.stages.all(s, self.stages.exists_one(t, t.name == s.name))",
            "message": "spec.stages[].name must be unique",
            "fieldPath": ".stages",
        },
        {
            # The API server's cost estimator rejects list-index functions over a
            # mapped list (indexOf, join), so CEL checks "an sft stage exists and dpo is
            # not first"; the Python validator below (kubetrain validate, the operator)
            # also checks the order exactly.
            "rule": (
                "has(self.model.from) || !self.stages.exists(s, s.type == 'dpo') || "
                "(self.stages.exists(s, s.type == 'sft') && self.stages[0].type != 'dpo')"
            ),
            "message": "a dpo stage needs an sft stage before it or model.from",
            "fieldPath": ".stages",
        },
        {
            # The same approximation as for dpo, one rule per type so each message names it.
            "rule": (
                "has(self.model.from) || !self.stages.exists(s, s.type == 'grpo') || "
                "(self.stages.exists(s, s.type == 'sft') && self.stages[0].type != 'grpo')"
            ),
            "message": "a grpo stage needs an sft stage before it or model.from",
            "fieldPath": ".stages",
        },
        {
            "rule": (
                "self.stages.all(s, !has(s.hyperparameters) || !has(s.hyperparameters.seqLen) "
                "|| (has(self.model.contextLength) ? s.hyperparameters.seqLen <= "
                "self.model.contextLength : (has(self.model.from) || "
                f"s.hyperparameters.seqLen <= {BUILTIN_CONTEXT})))"
            ),
            "message": "stages[].hyperparameters.seqLen must be at most model.contextLength",
            "fieldPath": ".stages",
        },
    ]

    @model_validator(mode="after")
    def _cross_field(self) -> TrainingRunSpec:
        seen: dict[str, int] = {}
        for i, stage in enumerate(self.stages):
            if stage.name in seen:
                raise ValueError(
                    f"spec.stages[{i}].name={stage.name!r} repeats spec.stages[{seen[stage.name]}]"
                    ".name (accepted: a name unique in the run)"
                )
            seen[stage.name] = i
        types = [s.type for s in self.stages]
        for kind in REFERENCE_STAGE_TYPES:
            if kind not in types or self.model.from_ is not None:
                continue
            first = types.index(kind)
            if StageType.sft not in types[:first]:
                raise ValueError(
                    f"spec.stages[{first}] ({self.stages[first].name!r}) is a {kind.value} stage "
                    "with no sft stage before it and no model.from (accepted: put an sft stage "
                    "first, or set model.from to a fine-tuned checkpoint)"
                )
        limit = self.model.context_limit
        for i, stage in enumerate(self.stages):
            seq = stage.hyperparameters.seq_len
            if seq is not None and limit is not None and seq > limit:
                raise ValueError(
                    f"spec.stages[{i}].hyperparameters.seqLen={seq} exceeds "
                    f"model.contextLength={limit} (accepted: 8..{limit})"
                )
        return self

    def stage(self, name: str) -> Stage:
        """The stage called ``name``."""
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


class Metadata(_Model):
    """The parts of ObjectMeta kubetrain reads (others are allowed and ignored)."""

    model_config = ConfigDict(extra="allow", alias_generator=wire_name, populate_by_name=True)
    # 40: the name prefixes the run's Job, Service and Pod host names (DNS labels, 63).
    name: str = Field(..., min_length=1, max_length=40, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    namespace: str = Field("default")


# --------------------------------------------------------------------------- status


class RunPhase(StrEnum):
    Pending = "Pending"
    Running = "Running"
    Suspended = "Suspended"
    Succeeded = "Succeeded"
    Failed = "Failed"


class StagePhase(StrEnum):
    Pending = "Pending"
    Running = "Running"
    Suspended = "Suspended"
    Succeeded = "Succeeded"
    Failed = "Failed"


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(_Model):
    """The standard Kubernetes condition shape (metav1.Condition)."""

    type: str = Field(..., description="CamelCase condition type, e.g. `Complete`.")
    status: ConditionStatus = Field(..., description="True, False, Unknown.")
    reason: str = Field("", description="CamelCase machine-readable reason.")
    message: str = Field("", description="Human-readable detail.")
    last_transition_time: str | None = Field(None, description="When status last changed.")
    observed_generation: int | None = Field(None, description="Generation this was based on.")


class StageLedger(_Model):
    """What the operator has counted for a stage, so that observing the same Job or pod
    again never counts it twice."""

    job: str | None = Field(
        None, description="UID of the Job whose pods `gpuSeconds` includes beyond `banked`."
    )
    banked: float = Field(0.0, description="GPU-seconds of the stage's finished attempts.")
    counted: list[str] = Field(
        default_factory=list,
        description="UIDs of the Jobs whose end was counted (newest last).",
    )
    disrupted_job: str | None = Field(
        None,
        description="UID of the Job in which a disruption was counted, until pods created "
        "after `disruptedAt` run in place of all the others (until then, the end of the "
        "Job is the disruption's aftermath).",
    )
    disrupted_at: str | None = Field(
        None,
        description="When the pods of the last counted disruption stopped (pods created "
        "before then belong to it).",
    )
    workload: str | None = Field(
        None, description="UID of the Kueue Workload whose evictions `evictions` counts."
    )
    evictions: int = Field(
        0, description="Evictions of that Workload already counted as preemptions."
    )
    gang_releases: int = Field(
        0,
        description="Jobs released in a row because their gang was not scheduled within "
        "gangScheduleTimeoutSeconds (the backoff before the next grows with it).",
    )

    model_config = ConfigDict(
        alias_generator=wire_name, populate_by_name=True, extra="ignore", validate_default=True
    )


class StageStatus(_Model):
    name: str = Field(..., description="Stage name.")
    phase: StagePhase = Field(StagePhase.Pending, description="Where the stage is.")
    step: int = Field(0, description="Last optimizer step reported.")
    total_steps: int | None = Field(None, description="Steps the stage will take.")
    progress: float = Field(0.0, description="step / totalSteps, 0..1.")
    tokens: int = Field(0, description="Tokens trained on.")
    loss: float | None = Field(None, description="Last training loss.")
    eval: dict[str, float] = Field(
        default_factory=dict, description="Last evaluation metrics (e.g. `accuracy`, `loss`)."
    )
    train: dict[str, float] = Field(
        default_factory=dict,
        description="Last step's diagnostics by TRL's names (grpo: `reward`, `reward_std`, "
        "`kl`, `clip_ratio`, `completion_length`; dpo: `rewards/*`).",
    )
    tokens_per_second: float | None = Field(None, description="Recent training throughput.")
    eta_seconds: float | None = Field(None, description="Estimated seconds to finish the stage.")
    checkpoint: str | None = Field(None, description="URI of the newest complete checkpoint.")
    hf_model: str | None = Field(
        None,
        description="URI of the stage's final model as a Hugging Face folder (safetensors, "
        "config, tokenizer): what `AutoModelForCausalLM.from_pretrained` and vLLM load.",
    )
    restarts: int = Field(
        0,
        description="Failed attempts (a trainer error, an OOM kill, any exit code but 0 "
        "and 75); the stage fails when they exceed `maxRestarts`. Disruptions are counted "
        "in `preemptions` instead.",
    )
    preemptions: int = Field(
        0,
        description="Attempts ended by a disruption: a node drain, an eviction, a spot "
        "reclaim, queue preemption (a pod with the condition DisruptionTarget, or the "
        "trainer's exit code 75 after checkpointing on SIGTERM). They resume from the last "
        "checkpoint and never count against `maxRestarts`.",
    )
    completed_without_final: int = Field(
        0,
        description="Attempts in a row whose pods all exited 0 without writing the stage's "
        "FINAL pointer; the stage fails at the operator's `maxCompletedWithoutFinal`.",
    )
    next_attempt_time: str | None = Field(
        None,
        description="After a failure: when the next attempt starts (exponential backoff).",
    )
    start_time: str | None = Field(None, description="When the stage's Job was created.")
    completion_time: str | None = Field(None, description="When the stage finished.")
    gpu_seconds: float = Field(0.0, description="Pods × GPUs × wall seconds.")
    energy_joules: float = Field(0.0, description="Energy measured or estimated (IT load).")
    energy_source: str | None = Field(None, description="`nvml`, `rapl` or `estimate`.")
    cost_usd: float = Field(0.0, description="GPU-hours × price (+ energy × price × PUE).")
    co2_grams: float = Field(0.0, description="Energy × PUE × carbon intensity.")
    message: str | None = Field(None, description="Why the stage is in its phase.")
    ledger: StageLedger | None = Field(
        None,
        description="The operator's bookkeeping: GPU-seconds of earlier attempts and what "
        "was already counted.",
    )

    # Written by the operator: a newer operator's fields must not break an older one.
    model_config = ConfigDict(
        alias_generator=wire_name, populate_by_name=True, extra="ignore", validate_default=True
    )


class Totals(_Model):
    progress: float = Field(0.0, description="Curriculum progress 0..1, weighted by steps.")
    tokens: int = Field(0, description="Tokens over all stages.")
    gpu_seconds: float = Field(0.0, description="GPU-seconds over all stages.")
    energy_joules: float = Field(0.0, description="Joules over all stages.")
    cost_usd: float = Field(0.0, description="USD over all stages.")
    co2_grams: float = Field(0.0, description="Grams CO2 over all stages.")


class Estimate(_Model):
    parameters: int = Field(0, description="Model parameters.")
    flops: float = Field(0.0, description="Training FLOPs of the curriculum.")
    gpu_hours: float = Field(0.0, description="GPU-hours at the assumed MFU.")
    cost_usd: float = Field(0.0, description="Cost before running.")
    energy_kwh: float = Field(0.0, description="Facility energy (× PUE).")
    co2_grams: float = Field(0.0, description="Grams CO2.")
    parallelism: dict[str, str] = Field(
        default_factory=dict,
        description="Per stage: the strategy `parallelism` resolves to (ddp or fsdp) and why.",
    )


class TrainingRunStatus(_Model):
    phase: RunPhase = Field(RunPhase.Pending, description="Where the run is.")
    current_stage: str | None = Field(None, description="The active (or last) stage.")
    progress: str | None = Field(
        None, description="Human summary for `kubectl get`, e.g. `2/3 41%`."
    )
    stages: list[StageStatus] = Field(default_factory=list, description="Per stage, in order.")
    totals: Totals = Field(default_factory=Totals, description="Sums over the stages.")
    estimate: Estimate | None = Field(None, description="What the run should take, up front.")
    conditions: list[Condition] = Field(default_factory=list, description="Standard conditions.")
    observed_generation: int | None = Field(None, description="Generation last reconciled.")
    applied_spec: str | None = Field(
        None,
        description="The spec the operator acts on, as JSON: stages that started are "
        "frozen to it (written by the operator only).",
    )

    model_config = ConfigDict(
        alias_generator=wire_name, populate_by_name=True, extra="ignore", validate_default=True
    )


class TrainingRun(_Model):
    api_version: ApiVersion = Field(API_VERSION, description=f"`{API_VERSION}`.")
    kind: Literal["TrainingRun"] = Field(KIND, description="`TrainingRun`.")
    metadata: Metadata
    spec: TrainingRunSpec
    status: TrainingRunStatus | None = None


def cel_rules() -> dict[str, list[dict[str, str]]]:
    """The CEL rules of each model that declares some, keyed by class name (the name
    pydantic gives the model's schema), in the order the models are declared."""
    return {
        obj.__name__: list(obj.CEL_RULES)
        for obj in globals().values()
        if isinstance(obj, type) and issubclass(obj, _Model) and obj.__dict__.get("CEL_RULES")
    }


# --------------------------------------------------------------------------- validation


class ManifestError(ValueError):
    """A manifest that does not validate; ``errors`` are one line per problem."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


def _divisors_hint(n: int) -> str:
    divs = [d for d in range(1, min(n, 64) + 1) if n % d == 0]
    return ", ".join(str(d) for d in divs[-4:])


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or "[" in str(part):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


# What each pattern accepts, in words: for error messages and the field reference.
PATTERN_HINTS = {
    STAGE_NAME_PATTERN: "lowercase letters, digits and '-', starting with a letter",
    QUANTITY_PATTERN: "a non-negative Kubernetes quantity such as 8, 500m or 64Gi",
    LABEL_KEY_PATTERN: "a label key: [prefix/]name, the name at most 63 letters, digits, "
    "'-', '_' or '.', starting and ending with a letter or digit",
    LABEL_VALUE_PATTERN: "a label value: at most 63 letters, digits, '-', '_' or '.', "
    "starting and ending with a letter or digit, or empty",
    DATA_SOURCE_PATTERN: "synthetic:<task> (e.g. synthetic:arithmetic), s3://bucket/key "
    "or file:///path",
    URI_PATTERN: "an s3://bucket/key or file:///path URI",
    REWARD_FUNCTION_PATTERN: "exact-match, format, or a Python entry point package.module:function",
}


def _allowed_fields(loc: tuple[Any, ...]) -> list[str]:
    """Wire names of the fields of the model that holds the unknown key at ``loc``."""
    import typing

    model: Any = TrainingRun
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return []
        tp = field.annotation
        while typing.get_args(tp) and not (isinstance(tp, type) and issubclass(tp, BaseModel)):
            tp = next(
                (
                    a
                    for a in typing.get_args(tp)
                    if isinstance(a, type) and issubclass(a, BaseModel)
                ),
                None,
            )
        if tp is None:
            return []
        model = tp
    return [f.alias or n for n, f in model.model_fields.items()]


def _accepted(err: ErrorDetails) -> str:
    """What would be accepted, where pydantic's own message does not already say it."""
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind == "string_pattern_mismatch":
        pattern = ctx.get("pattern", "")
        return f"accepted: {PATTERN_HINTS.get(pattern, f'a string matching {pattern}')}"
    if kind == "extra_forbidden":
        allowed = _allowed_fields(tuple(err["loc"]))
        return f"accepted fields here: {', '.join(allowed)}" if allowed else ""
    return ""


def format_errors(exc: ValidationError) -> list[str]:
    """One actionable line per error: field path, bad value, what is accepted."""
    lines = []
    for err in exc.errors():
        path = _path(err["loc"]) or "(manifest)"
        if err["type"] == "value_error":
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"{path}: {msg}" if not msg.startswith("spec.") else msg)
            continue
        value = err.get("input")
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        accepted = _accepted(err)
        if err["type"] == "missing":
            lines.append(f"{path}: is required but missing")
        else:
            msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            if (
                err["type"] == "string_pattern_mismatch"
                and (err.get("ctx") or {}).get("pattern") in PATTERN_HINTS
            ):
                # The hint says it in words; the regular expression would only bury it.
                msg = "wrong format"
            lines.append(
                f"{path}: {shown} is invalid: {msg}" + (f" ({accepted})" if accepted else "")
            )
    return lines


def parse_run(obj: dict[str, Any]) -> TrainingRun:
    """Validate a TrainingRun manifest (a dict) or raise ManifestError."""
    if not isinstance(obj, dict):
        raise ManifestError([f"(manifest): expected a mapping, got {type(obj).__name__}"])
    try:
        return TrainingRun.model_validate(obj)
    except ValidationError as exc:
        errors = format_errors(exc)
        # Prefix paths with the spec where pydantic located the error in the root object.
        raise ManifestError(errors) from None


def parse_spec(spec: dict[str, Any]) -> TrainingRunSpec:
    """Validate just a spec (what the operator receives) or raise ManifestError."""
    try:
        return TrainingRunSpec.model_validate(spec)
    except ValidationError as exc:
        raise ManifestError(
            [line if line.startswith("spec") else f"spec.{line}" for line in format_errors(exc)]
        ) from None


def dump(model: BaseModel) -> dict[str, Any]:
    """A model as it appears on the wire (camelCase, no unset optionals)."""
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")


__all__ = [
    "API_VERSION",
    "GROUP",
    "GRPO",
    "KIND",
    "PLURAL",
    "VERSION",
    "ApiVersion",
    "Budget",
    "BudgetAction",
    "BuiltinReward",
    "Condition",
    "DataSpec",
    "Estimate",
    "Hyperparameters",
    "ManifestError",
    "ModelSpec",
    "Pricing",
    "Resources",
    "Reward",
    "RunPhase",
    "S3Storage",
    "Stage",
    "StageLedger",
    "StagePhase",
    "StageStatus",
    "StageType",
    "Storage",
    "Toleration",
    "Totals",
    "TrainingRun",
    "TrainingRunSpec",
    "TrainingRunStatus",
    "cel_rules",
    "dump",
    "parse_run",
    "parse_spec",
]
