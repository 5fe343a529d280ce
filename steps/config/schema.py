"""The run config's sections as typed dataclasses, each with its own rules (``check``): one validation layer (the
training sections are in steps.config.training). The converter (steps.config.convert) types YAML values and runs
``check``; errors come out at dotted keys."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from steps.config.convert import INTERNAL, ConfigError, to_dict
from steps.config.convert import require as _require
from steps.config.training import PreferenceConfig, SFTConfig
from steps.data.oasst_feedback import OasstFeedbackRule
from steps.evaluate.benchmark_specs import parse_benchmarks
from steps.evaluate.judges import DEFAULT_CONCURRENCY, DEFAULT_JUDGE, DEFAULT_JUDGE_MAX_CHARS, DEFAULT_TIMEOUT_S
from steps.evaluate.settings import JUDGE_OPTIONS, EngineSettings, GenerationSettings
from steps.evaluate.verifiable.ifbench_prompts import IFBENCH_PROMPTS
from steps.models import DEFAULT_MODEL
from steps.train.gang import JOIN_ACROSS_MACHINES_S, JOIN_ON_ONE_MACHINE_S

#: Metaflow's rule for @project names.
PROJECT_NAME = re.compile(r"^[a-z0-9_]+$")
#: ``resources.env`` names: NCCL and torch's NCCL/distributed settings, libfabric (AWS EFA: FI_*, the aws-ofi-nccl
#: plugin's OFI_NCCL_*, RDMAV_FORK_SAFE), UCX, gloo, and CUDA_DEVICE_MAX_CONNECTIONS.
ENV_NAME_RULE = (
    "NCCL_*, TORCH_NCCL_*, TORCH_DISTRIBUTED_DEBUG, FI_*, OFI_NCCL_*, RDMAV_*, UCX_*, GLOO_*, "
    "CUDA_DEVICE_MAX_CONNECTIONS (upper-case letters, digits, underscores)"
)
ENV_NAME = re.compile(
    r"(NCCL|TORCH_NCCL|FI|OFI_NCCL|RDMAV|UCX|GLOO)_[A-Z0-9_]+|TORCH_DISTRIBUTED_DEBUG|CUDA_DEVICE_MAX_CONNECTIONS"
)
#: Refused in ``resources.env`` even under an allowed prefix: it is written into the deployed workflow in clear.
SECRET_WORDS = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL")


@dataclass(frozen=True)
class DataConfig:
    """Data preparation (see steps.data.prepare.prepare_data): one reader per format, the same files out."""

    format: Literal["oasst", "preference", "hh_rlhf", "ultrafeedback", "fairseq2", "unpaired"] = "oasst"
    input: str = "embedded"  # "embedded" (oasst only), a Hub id, a JSONL(.gz)/Parquet file, or a directory
    split: str | None = None  # None: the format's training split (train; train_prefs for UltraFeedback)
    langs: list[str] = field(default_factory=lambda: ["en"])
    pair_strategy: Literal["best_vs_rest", "best_vs_worst", "all_ordered_pairs"] = "best_vs_rest"
    sft_rank: int = 0
    tree_states: list[str] = field(default_factory=lambda: ["ready_for_export"])
    include_synthetic: bool = False
    include_deleted: bool = False
    require_review: bool = True
    dev_fraction: float = 0.1
    seed: int = 333
    max_trees: int | None = None
    # how OpenAssistant replies become KTO examples (kto.{train,dev}.jsonl): steps.data.oasst_feedback
    oasst_feedback: OasstFeedbackRule = field(default_factory=OasstFeedbackRule)

    #: settings that only OpenAssistant trees have
    OASST_ONLY = (
        "langs",
        "pair_strategy",
        "sft_rank",
        "tree_states",
        "include_synthetic",
        "include_deleted",
        "require_review",
        "max_trees",
        "oasst_feedback",
    )

    def check(self) -> None:
        _require(0 <= self.dev_fraction < 1, "dev_fraction", f"got {self.dev_fraction!r}; must be in [0, 1)")
        _require(self.sft_rank >= 0, "sft_rank", f"got {self.sft_rank!r}; must be >= 0")
        if self.format != "oasst":
            _require(
                self.input != "embedded",
                "input",
                f"the embedded sample is OpenAssistant data; with format {self.format} give a Hub id, a file or a "
                "directory",
            )
            defaults = DataConfig()
            for name in self.OASST_ONLY:
                _require(
                    getattr(self, name) == getattr(defaults, name),
                    name,
                    f"is an OpenAssistant setting; it has no effect with format {self.format}: remove it",
                )


@dataclass(frozen=True)
class ModelConfig:
    """The base model every run starts from, as a loader spec (see steps.models)."""

    base: str = DEFAULT_MODEL
    # COMPUTE dtype of training (matmuls, activations; reference log-probs and dev evaluation too).
    # auto: bf16 on a CUDA GPU that supports it, else fp32. bf16 with fp32 master weights = mixed precision.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # dtype of the weights, gradients and AdamW state that the optimizer updates (and checkpoints and the
    # model handed to the next step keep). bfloat16 only when memory forces it: small updates are lost.
    master_dtype: Literal["float32", "bfloat16"] = "float32"
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None

    def check(self) -> None:
        _require(
            self.dtype != "float16",
            "dtype",
            "float16 compute needs loss scaling, which the trainer does not do; use bfloat16 (or float32)",
        )
        _require(
            not (self.dtype == "float32" and self.master_dtype == "bfloat16"),
            "dtype",
            "float32 compute with master_dtype bfloat16 computes more precisely than the weights are kept; "
            "use dtype: bfloat16 (or master_dtype: float32)",
        )


@dataclass(frozen=True)
class IFBenchConfig:
    """IFBench (steps.evaluate.verifiable): verifiable instruction following, judge-free, on every evaluated model,
    answered with the AlpacaEval generation settings, dtype and backend."""

    enabled: bool = True
    # the type-balanced first `limit` of the 294 prompts (57: every instruction type once); null: all 294
    limit: int | None = 57

    def check(self) -> None:
        if self.limit is not None:
            _require(
                1 <= self.limit <= IFBENCH_PROMPTS,
                "limit",
                f"got {self.limit!r}; must be between 1 and {IFBENCH_PROMPTS} (IFBench's prompts), or null for all",
            )


@dataclass(frozen=True)
class EvaluationConfig:
    """AlpacaEval 2 settings; the generation knobs are validated once, as ``generation`` (GenerationSettings)."""

    enabled: bool = True
    eval_set: str = "embedded"  # "embedded" | "alpaca_eval" (Hub) | path to a JSON eval set
    max_instructions: int | None = None
    reference: str = "auto"  # auto: the eval set's outputs if present, else generated by the base model
    judge: str = DEFAULT_JUDGE  # "local_logprob", "alpaca_eval:<annotator config>" or "openai_compatible" (served)
    judge_model: str = DEFAULT_MODEL  # local judge: a model spec; openai_compatible: the served model's name
    judge_max_chars: int = DEFAULT_JUDGE_MAX_CHARS
    judge_base_url: str | None = None  # openai_compatible: e.g. http://localhost:8000/v1 (vLLM serve)
    judge_api_key_env: str | None = None  # the NAME of the variable holding the key; null sends none
    judge_max_requests: int | None = None  # request budget per evaluation (null: twice the pairs plus 10)
    judge_timeout_s: float = DEFAULT_TIMEOUT_S
    judge_concurrency: int = DEFAULT_CONCURRENCY
    heldout_preference: bool = True  # accuracy on the dev preference pairs, no judge needed
    heldout_max_pairs: int | None = None
    agreement_registry: str | None = None  # where `python -m steps.evaluate agreement` records judge agreement
    paired_baseline: str | None = "sft"  # each row's paired WR difference from this variant (null: none)
    paired_resamples: int = 10000
    paired_seed: int = 0
    # generation defaults: GenerationSettings owns them (and EngineSettings the engine's below)
    max_new_tokens: int = GenerationSettings.max_new_tokens
    temperature: float = GenerationSettings.temperature
    top_p: float = GenerationSettings.top_p
    seed: int = GenerationSettings.seed
    batch_size: int = GenerationSettings.batch_size
    lc_assets_dir: str | None = None
    # weights dtype of the generating model and held-out scoring; auto: bf16 on a CUDA GPU that supports it (and
    # for vLLM), else fp32. bf16 can round a small update away: each row records whether the scored model still
    # differs from its init in this dtype (weight_change_check)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    backend: Literal["auto", "hf", "vllm"] = "auto"  # auto: vLLM when installed and a GPU is present, else HF
    # vLLM: the share of the GPU's memory the engine may take (weights, activations, KV cache), in (0, 1]
    gpu_memory_utilization: float = EngineSettings.gpu_memory_utilization
    # vLLM: the longest prompt + answer it plans for; null: the eval set's longest prompt + max_new_tokens rounded
    # up to a multiple of 256, at most the model's max_position_embeddings
    max_model_len: int | None = None
    # where answers are generated: auto = vLLM in a subprocess (its GPU memory is free again before held-out
    # scoring loads models), HF in the step's own process; subprocess / in_process force one for both backends
    generation_process: Literal["auto", "subprocess", "in_process"] = "auto"
    generation_timeout_s: float = EngineSettings.timeout_s  # a generation subprocess still running after this is killed
    # record the share of weight entries that differ from the init model in the evaluation dtype (reads both
    # models' safetensors tensor by tensor; a Hub init is fetched unless cached)
    weight_change_check: bool = True
    # lm-evaluation-harness tasks run on every evaluated model beside AlpacaEval (the `benchmarks` extra), with
    # the generation settings and dtype above: names (ifeval) or mappings {task, num_fewshot, limit, metric,
    # chat_template, generation, task_dir}; checked by steps.evaluate.benchmark_specs.parse_benchmarks
    benchmarks: list[Any] = field(default_factory=list)
    ifbench: IFBenchConfig = field(default_factory=IFBenchConfig)
    generation: GenerationSettings = field(init=False, repr=False, compare=False, metadata=INTERNAL)
    engine: EngineSettings = field(init=False, repr=False, compare=False, metadata=INTERNAL)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "generation",
            GenerationSettings(
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                seed=self.seed,
                batch_size=self.batch_size,
            ),
        )
        object.__setattr__(
            self,
            "engine",
            EngineSettings(
                gpu_memory_utilization=self.gpu_memory_utilization,
                max_model_len=self.max_model_len,
                process=self.generation_process,
                timeout_s=self.generation_timeout_s,
            ),
        )

    def check(self) -> None:
        if self.max_instructions is not None:
            _require(
                self.max_instructions >= 1, "max_instructions", f"got {self.max_instructions!r}; must be >= 1 or null"
            )
        _require(self.judge_max_chars >= 1, "judge_max_chars", f"got {self.judge_max_chars!r}; must be >= 1")
        served = self.judge == "openai_compatible" or self.judge.startswith("openai_compatible:")
        if served:
            _require(
                self.judge_base_url is not None,
                "judge_base_url",
                "judge openai_compatible needs the server's URL, e.g. http://localhost:8000/v1",
            )
            _require(
                ":" in self.judge or not self.judge_model.startswith(("embedded:", "tiny")),
                "judge_model",
                f"got {self.judge_model!r}; with openai_compatible name the served model, "
                "e.g. meta-llama/Llama-3.1-70B-Instruct",
            )
        if self.judge_base_url is not None:
            _require(
                self.judge_base_url.startswith(("http://", "https://")),
                "judge_base_url",
                f"got {self.judge_base_url!r}; must start with http:// or https://",
            )
        if self.judge_api_key_env is not None:
            _require(
                re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.judge_api_key_env) is not None,
                "judge_api_key_env",
                "must be the NAME of an environment variable (e.g. JUDGE_API_KEY), never the key itself",
            )
        for name in ("judge_max_requests", "heldout_max_pairs"):
            value = getattr(self, name)
            _require(value is None or value >= 1, name, f"got {value!r}; must be >= 1 or null")
        _require(self.judge_timeout_s > 0, "judge_timeout_s", f"got {self.judge_timeout_s!r}; must be > 0")
        _require(self.judge_concurrency >= 1, "judge_concurrency", f"got {self.judge_concurrency!r}; must be >= 1")
        _require(self.paired_resamples >= 100, "paired_resamples", f"got {self.paired_resamples!r}; must be >= 100")
        parse_benchmarks(self.benchmarks)

    def judge_options(self) -> dict[str, Any]:
        """The judge knobs as make_judge / evaluate_model take them (``steps.evaluate.settings.JudgeOptions``)."""
        return {name: getattr(self, name) for name in JUDGE_OPTIONS}


@dataclass(frozen=True)
class StepResources:
    cpu: int = 2
    memory: int = 8000  # MB
    gpu: int = 0
    # MB of /dev/shm on Kubernetes (NCCL's intra-node transport lives there); None: a quarter of memory with GPUs
    shared_memory: int | None = None

    def check(self) -> None:
        for name, least in (("cpu", 1), ("memory", 1), ("gpu", 0)):
            value = getattr(self, name)
            _require(value >= least, name, f"got {value!r}; must be >= {least}")
        if self.shared_memory is not None:
            _require(
                1 <= self.shared_memory <= self.memory,
                "shared_memory",
                f"got {self.shared_memory!r}; must be >= 1 and at most memory ({self.memory} MB): /dev/shm counts "
                "against the pod's memory",
            )

    def shared_memory_mb(self) -> int | None:
        """What the Kubernetes pod gets as /dev/shm: the setting, else a quarter of memory when it has GPUs."""
        if self.shared_memory is not None:
            return self.shared_memory
        return max(1, self.memory // 4) if self.gpu else None


@dataclass(frozen=True)
class ResourcesConfig:
    """What each heavy step asks the scheduler for (flows/mutators.py adds @resources; local runs ignore it), how
    many nodes train one model, and how steps hand each other files."""

    train: StepResources = field(default_factory=StepResources)
    evaluate: StepResources = field(default_factory=StepResources)
    output_dir: str = "runs"  # where checkpoints and eval files go; shared storage when scaling out
    kubernetes: bool = False  # send the heavy steps to Kubernetes (flows/mutators.py)
    image: str | None = None
    nproc_per_node: int = 1
    # > 1: sft and preference train as a Metaflow @parallel gang of this many nodes (torchrun on each, HSDP for fsdp)
    num_nodes: int = 1
    master_port: int = 29500  # the gang's rendezvous on node 0 (the next port too) on Kubernetes
    # how files reach later steps: "shared" (output_dir is one filesystem for every step and node), "datastore"
    # (pushed to Metaflow's datastore and pulled where needed: pods that share nothing), "auto" (datastore on
    # Kubernetes unless a persistent_volume_claim is output_dir, else shared)
    model_store: Literal["auto", "shared", "datastore"] = "auto"
    persistent_volume_claim: str | None = None  # Kubernetes: a PVC mounted at output_dir (absolute) on every step
    serialize_cpu_steps: bool = True  # without a GPU, one heavy step at a time (parallel branches thrash cores)
    # with GPUs (local runs, not Kubernetes): steps that use them take turns on the machine, never share them
    serialize_gpu_steps: bool = True
    # how long a rank waits in a collective (checkpoint writes of big models included) before the job fails
    process_group_timeout_s: int = 1800
    # how long node 0 of a gang waits for every other node to join before the gang fails naming the missing node;
    # null: 90 s when every node runs on this machine, 600 s across machines (pods may still pull their image)
    gang_join_timeout_s: int | None = None
    # environment of the training processes (the heavy steps' pods, torchrun's ranks): NCCL and fabric settings
    # only, names matching ENV_NAME (e.g. NCCL_SOCKET_IFNAME: eth0, FI_PROVIDER: efa, NCCL_DEBUG: INFO); never
    # secrets (those come from the cluster's secret store)
    env: dict[str, str | int] = field(default_factory=dict)

    def check(self) -> None:
        for name in ("nproc_per_node", "num_nodes"):
            value = getattr(self, name)
            _require(value >= 1, name, f"got {value!r}; must be >= 1")
        _require(
            1024 <= self.master_port <= 65534,
            "master_port",
            f"got {self.master_port!r}; must be in 1024..65534 (the next port is used too)",
        )
        _require(
            self.process_group_timeout_s >= 1,
            "process_group_timeout_s",
            f"got {self.process_group_timeout_s!r}; must be >= 1 (seconds)",
        )
        if self.gang_join_timeout_s is not None:
            _require(
                self.gang_join_timeout_s >= 1,
                "gang_join_timeout_s",
                f"got {self.gang_join_timeout_s!r}; must be >= 1 (seconds) or null",
            )
        for name in self.env:
            _require(
                ENV_NAME.fullmatch(name) is not None and not SECRET_WORDS.search(name),
                f"env.{name}",
                f"not a variable this section passes on; allowed: {ENV_NAME_RULE} (no secrets: those come from the "
                "cluster's secret store)",
            )
        if self.persistent_volume_claim is not None:
            _require(
                self.kubernetes,
                "persistent_volume_claim",
                "mounts on Kubernetes pods only: set resources.kubernetes: true (or remove it)",
            )
            _require(
                self.output_dir.startswith("/"),
                "output_dir",
                f"got {self.output_dir!r}; with persistent_volume_claim the claim is mounted at output_dir, which "
                "must be an absolute path (e.g. /mnt/prefflow)",
            )
        _require(
            not (self.kubernetes and self.model_store == "shared" and self.persistent_volume_claim is None),
            "model_store",
            "shared on Kubernetes needs a volume every pod mounts: set persistent_volume_claim, or use "
            "model_store: datastore (or auto)",
        )

    def join_timeout_s(self, across_machines: bool) -> int:
        """``gang_join_timeout_s`` resolved for a gang on this machine or across machines."""
        if self.gang_join_timeout_s is not None:
            return self.gang_join_timeout_s
        return JOIN_ACROSS_MACHINES_S if across_machines else JOIN_ON_ONE_MACHINE_S

    def env_vars(self) -> dict[str, str]:
        """``env`` as the environment takes it (YAML reads FI_EFA_USE_DEVICE_RDMA: 1 as a number)."""
        return {name: str(value) for name, value in self.env.items()}

    def handoff(self) -> Literal["shared", "datastore"]:
        """``model_store`` resolved: auto is the datastore on Kubernetes without a shared volume, else shared."""
        if self.model_store != "auto":
            return self.model_store
        return "datastore" if self.kubernetes and self.persistent_volume_claim is None else "shared"


@dataclass(frozen=True)
class DeploymentConfig:
    schedule_cron: str | None = None  # 6-field AWS cron, e.g. "0 3 * * ? *"
    project: str = "prefflow"
    trigger_event: str | None = None

    def check(self) -> None:
        _require(
            bool(PROJECT_NAME.match(self.project)),
            "project",
            f"got {self.project!r}; use lowercase letters, digits and underscores",
        )
        if self.schedule_cron is not None:
            _require(
                len(self.schedule_cron.split()) == 6,
                "schedule_cron",
                f"got {self.schedule_cron!r}; use the 6-field AWS form, e.g. '0 3 * * ? *'",
            )


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment trackers that every training and evaluation metric goes to (steps/tracking.py)."""

    backends: list[str] = field(default_factory=list)  # any of tensorboard, mlflow, wandb; [] = metrics.jsonl only
    project: str = "prefflow"  # W&B project (WANDB_PROJECT overrides) and MLflow experiment

    def check(self) -> None:
        from steps.tracking import BACKENDS

        for i, name in enumerate(self.backends):
            _require(name in BACKENDS, f"backends[{i}]", f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
        _require(len(set(self.backends)) == len(self.backends), "backends", f"lists a backend twice: {self.backends}")
        _require(bool(self.project.strip()), "project", "must not be empty")


@dataclass(frozen=True)
class PushToHubConfig:
    """Upload trained models with their cards to the Hugging Face Hub (steps/hub.py); token from HF_TOKEN."""

    repo_id: str | None = None  # "owner/name", may use {variant} and {run_id}; None: no upload
    private: bool = True
    variants: list[str] | None = None  # which variants to upload; None: every one
    dry_run: bool = False  # check and list the files, upload nothing

    def check(self) -> None:
        if self.repo_id is not None:
            from steps.hub import PublishError, repo_id_for

            try:
                repo_id_for(self.repo_id, "sft", "0")
            except PublishError as exc:
                raise ConfigError("", "repo_id", str(exc).removeprefix("push_to_hub.repo_id: ")) from exc


@dataclass(frozen=True)
class RunConfig:
    name: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    push_to_hub: PushToHubConfig = field(default_factory=PushToHubConfig)
    source: str = field(default="<dict>", compare=False, metadata=INTERNAL)  # the file, for error messages

    def to_dict(self) -> dict:
        return to_dict(self)


#: The top-level keys of a run config file.
SECTIONS = [f.name for f in dataclasses.fields(RunConfig) if not f.metadata.get("internal")]
