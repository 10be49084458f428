"""The job config: one typed section per pipeline stage, validated when loaded.

A YAML file is read with a safe loader that also refuses a key given twice in one mapping (with both
line numbers), `--set key.sub=value` overrides are applied, and the
result is validated as a whole: unknown keys are rejected and every problem is reported at once,
each naming its dotted key, the value given and what is expected. Relative paths are relative to
the current working directory, as with any command-line tool.
"""

from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import pydantic
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

from puzzle.blocks.costs import Scenario
from puzzle.blocks.space import SpaceOptions
from puzzle.blocks.specs import BlockChoice, Engine
from puzzle.errors import ConfigError, PuzzleError
from puzzle.search.budgets import Budget, BudgetKind, parse_budget
from puzzle.search.hardware import GPUS, gpu

DType = Literal["auto", "float32", "bfloat16", "float16"]


class Section(BaseModel):
    # No infinite or NaN numbers: a learning rate of .inf is a typo, not a setting.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


def _parse_memory(value: Any) -> float | None:
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    budget = None
    try:
        budget = parse_budget(f"memory={value}")
    except PuzzleError:
        pass
    if budget is None or budget.relative:
        raise ValueError(f"expected an amount of memory with a unit, e.g. 20GiB or 500MB; got {value!r}")
    return budget.value


MemorySize = Annotated[
    Optional[float],
    BeforeValidator(_parse_memory),
    PlainSerializer(lambda n: None if n is None else f"{n / 2**30:.6g}GiB"),
]


class RunSection(Section):
    dir: Path = Field(Path("runs/default"), description="Run directory: one folder per stage, see docs/run-directory.md.")
    seed: int = Field(0, description="Seed for every random choice of the run (data order, initializations).")
    job: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Name of this job: its search, child, kd, eval and report go to run.dir/jobs/NAME, sharing "
        "the run's library, scores and profile with other jobs. Set for each entry of a file's `jobs:` mapping.",
    )
    parent_placement: Literal["auto", "replicated", "layers"] = Field(
        "auto", description="BLD and scoring with several processes: 'replicated', every rank loads the whole "
        "parent; 'layers', each rank loads only its contiguous share of the layers (a dense local parent) and the "
        "hidden states pass rank to rank, so a parent larger than one device fits; 'auto', replicated when the "
        "memory plan says it fits, else layers where the parent allows. Libraries and scores are the same either way.",
    )
    memory_limit: MemorySize = Field(
        None, gt=0, description="Memory this run may use on one machine, e.g. 20GiB, shared by its processes (CPU) or "
        "per GPU: the memory plan checks every stage against it and BLD packs its candidate groups under it. "
        "Default: the GPU's memory, or this machine's RAM.",
    )


class ParentSection(Section):
    path: str = Field(..., description="Parent checkpoint: a local directory, or a hub id when online.")
    dtype: DType = Field("float32", description="Dtype the parent is loaded in; 'auto' keeps the checkpoint's.")
    device: str = Field("cpu", description="Torch device for the parent: 'cpu', 'cuda', 'cuda:1', or 'auto'.")
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa", description="Attention kernel of the parent. GPT-OSS always runs 'eager' (sdpa cannot take its sinks)."
    )
    trust_remote_code: bool = Field(
        False, description="Run modeling code shipped with the parent. Off unless you trust its author."
    )


class HubDataset(Section):
    name: str = Field(..., description="Dataset id on the hub (needs network access).")
    split: str = Field("train", description="Dataset split to read.")


class DataSection(Section):
    files: list[str] = Field(
        default_factory=list, description="Local files or glob patterns: a text file is one document; a .jsonl, .json, "
        ".parquet or .arrow file gives one document per row.",
    )
    hub: HubDataset | None = Field(None, description="A hub dataset instead of local files (one document per row).")
    text_column: str = Field("text", description="The column of table files and hub datasets that holds the text.")
    messages_column: str | None = Field(
        None, description="Instead of text_column: a column of chat messages ([{role, content}, …]) rendered with the "
        "tokenizer's chat template, as post-training distillation data is.",
    )
    tokenizer: str | None = Field(None, description="Tokenizer directory; defaults to the parent's.")
    sequence_length: int = Field(512, gt=1, description="Tokens per block.")
    validation_fraction: float = Field(
        0.05, gt=0.0, lt=1.0, description="Share of blocks held out for validation, chosen once by split_seed."
    )
    split_seed: int = Field(1234, description="Seed of the fixed train/validation split (independent of run.seed).")
    calibration_blocks: int = Field(16, ge=1, description="Training blocks used for calibration statistics.")

    @pydantic.model_validator(mode="after")
    def _one_source(self) -> DataSection:
        if bool(self.files) == (self.hub is not None):
            raise ValueError("give exactly one of data.files (local text) or data.hub (a hub dataset)")
        return self


# The library section is the search space's own options type, so the two cannot drift apart.
LibrarySection = SpaceOptions


def _parse_block(value: Any) -> BlockChoice:
    try:
        return BlockChoice.from_id(str(value), coupled=True)
    except ValueError as e:
        raise ValueError(str(e)) from None


CoupledPair = Annotated[BlockChoice, BeforeValidator(_parse_block), PlainSerializer(lambda c: c.id)]


def _parse_budgets(value: Any) -> dict[BudgetKind, Budget]:
    if not isinstance(value, dict):
        raise ValueError("expected a mapping of budget kinds to values, e.g. {latency: 0.5x, memory: 40GiB}")
    budgets, problems = {}, []
    for kind, text in value.items():
        try:
            budget = parse_budget(f"{kind}={text}")
        except PuzzleError as e:
            problems.append(str(e))
            continue
        budgets[budget.kind] = budget
    if problems:
        raise ValueError("; ".join(problems))
    return budgets


Budgets = Annotated[
    dict[BudgetKind, Budget],
    BeforeValidator(_parse_budgets),
    PlainSerializer(lambda budgets: {kind.value: b.value_text for kind, b in budgets.items()}),
]


Metric = Literal["kl", "lm_loss", "top1", "top5", "top10"]


class TrainingSchedule(Section):
    """Optimization settings shared by the training stages (BLD, KD)."""

    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW, no weight decay).")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="Learning-rate schedule after warm-up.")
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="Share of steps with linear warm-up.")
    batch_size: int = Field(4, ge=1, description="Blocks per step.")
    checkpoint_every: int = Field(20, ge=1, description="Steps between resumable checkpoints.")


class BldSection(TrainingSchedule):
    mode: Literal["decoupled", "coupled"] = Field(
        "decoupled", description="decoupled: attention and FFN candidates apart; coupled: every pair together."
    )
    coupled_pairs: list[CoupledPair] = Field(
        default_factory=list,
        description="(attention, FFN) pairs also trained together in every layer, as 'attention.kv1+ffn.i256'.",
    )
    tokens_per_candidate: int = Field(131_072, ge=1, description="Training tokens each candidate sees.")
    sequence_length: int = Field(256, gt=1, description="Tokens per block; training blocks of data are cut to it.")
    eval_blocks: int = Field(16, ge=1, description="Held-out blocks for each candidate's initial and final loss.")


class ScoringSection(Section):
    metric: Metric = Field("kl", description="Block score used by the search (top-k = 1 − agreement).")
    validation_blocks: int = Field(8, ge=1, description="Held-out blocks per score.")
    batch_size: int = Field(4, ge=1, description="Blocks per forward pass.")


class ProfileSection(Section):
    device: str = Field(
        "local", description=f"'local' measures here; a GPU name ({', '.join(GPUS)}) uses its roofline."
    )
    weight_dtype: Literal["float32", "bfloat16", "float16", "fp8"] = Field("bfloat16", description="Weight dtype.")
    kv_dtype: Literal["float32", "bfloat16", "float16", "fp8"] = Field(
        "bfloat16", description="KV-cache dtype. 'fp8': the child checkpoints (realize, KD) also carry FP8 KV scales "
        "calibrated on data.calibration_blocks, in the layout vLLM reads (not for target.engine llama.cpp).")
    batch_size: int = Field(1, ge=1, description="Sequences per batch.")
    gpus: int = Field(
        1, ge=1, description="GPUs a model is split over by tensor parallelism, for the roofline's fit check (weights "
        "and KV cache divided evenly; the times are one GPU's)."
    )
    prefill_length: int = Field(256, ge=1, description="Prompt tokens.")
    decode_length: int = Field(128, ge=1, description="Generated tokens.")
    warmup: int = Field(3, ge=0, description="Untimed runs before measuring.")
    repeats: int = Field(20, ge=1, description="Timed runs; the fastest is kept (slower ones measure the machine's other load).")

    @pydantic.field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value == "local":
            return value
        try:
            return gpu(value).name
        except PuzzleError as e:
            raise ValueError(str(e)) from None

    @pydantic.model_validator(mode="after")
    def _fp8_where_it_exists(self) -> ProfileSection:
        if self.weight_dtype == "fp8" and (self.device == "local" or gpu(self.device).fp8_tflops is None):
            where = "here" if self.device == "local" else f"on {self.device}"
            raise ValueError(f"profile.weight_dtype fp8 cannot be profiled {where}; name a GPU with FP8 tensor cores "
                             "in profile.device (h100, h200, l40s, b200, rtx4090) or choose bfloat16")
        return self

    @property
    def scenario(self) -> Scenario:
        return Scenario(batch_size=self.batch_size, prefill_length=self.prefill_length,
                        decode_length=self.decode_length, weight_dtype=self.weight_dtype, kv_dtype=self.kv_dtype)


class SearchSection(Section):
    @property
    def solver_settings(self):
        from puzzle.search.mip import SolverSettings

        return SolverSettings(self.solver, self.gap, self.time_limit)

    budgets: Budgets = Field(
        default_factory=dict,
        description="Budgets, e.g. {latency: 0.5x, memory: 40GiB, params: 2.5M}: KIND: VALUE with x (a ratio of "
        "the parent) or a unit. Kinds: " + ", ".join(k.value for k in BudgetKind) + ". `--budget KIND=VALUE` sets one.",
    )
    metric: Metric = Field("kl", description="Objective.")
    method: Literal["mip", "evolve", "depth-mip", "greedy", "shortgpt", "llm-drop", "uniform-ffn", "random"] = Field(
        "mip",
        description="How the architecture is chosen: mip (Puzzle), evolve (the MIP's diverse solutions refined by "
        "an evolutionary search on the children's measured KL), depth-mip (search.depth whole layers removed by "
        "Block Influence first, then the MIP on the rest), or a baseline on the same scores, profile and "
        "budgets: greedy (the paper's greedy search), shortgpt (drop whole layers by Block Influence), llm-drop "
        "(drop attention by Block Influence), uniform-ffn (one library FFN width in every layer), random "
        "(seeded by run.seed).",
    )
    candidates: int = Field(
        1, ge=1, description="Diverse MIP solutions measured whole (KL to the parent on search.measure_blocks "
        "training blocks, the realized children in memory); the lowest measured is chosen. 1: the MIP's best by "
        "the sum of scores, unmeasured. With method evolve: the seeds (at least 2).",
    )
    measure_blocks: int = Field(8, ge=1, description="Training blocks a child is measured on (search.candidates, "
                                "search.rounds, method evolve); eval's held-out blocks stay unseen by the search.")
    rounds: int = Field(
        0, ge=0, description="Rounds of re-scoring in the chosen child's context (method mip): every block scored "
        "again as the child with that one layer replaced, measured whole; the MIP solved on those scores; its "
        "child kept only if it measures lower. Stops early when the architecture stops changing.",
    )
    depth: int = Field(2, ge=0, description="Whole layers method depth-mip removes before the MIP.")
    tournament: int = Field(
        0, ge=0, description="The best this many children of the search (by measured KL when it measured them, "
        "else in the MIP's order) each get a short KD of search.tournament_tokens, with the kd settings; the "
        "lowest KL after it is chosen. A child's damage before healing need not rank it after. 0: off.",
    )
    tournament_tokens: int = Field(65_536, ge=1, description="Training tokens of each tournament child's short KD.")
    generations: int = Field(40, ge=1, description="Generations of method evolve.")
    offspring: int = Field(8, ge=2, description="Children each generation of method evolve tries.")
    solver: Literal["cbc", "highs"] = Field("cbc", description="MIP solver behind PuLP.")
    gap: float = Field(
        1e-4, ge=0, lt=1, description="The solver stops once its solution is proven within this relative gap of "
        "the optimum (0: proven optimal, which can take minutes on a 70B parent's 80 layers).",
    )
    time_limit: float | None = Field(
        60.0, gt=0, description="Seconds each solve may take; then the best solution found so far is used "
        "(marked feasible, not optimal, in solutions.json). null: no limit.",
    )
    solutions: int = Field(1, ge=1, description="Number of diverse solutions.")
    min_diff: int = Field(1, ge=1, description="Layers in which each solution differs from every earlier one.")
    batch_sizes: list[int] = Field(default_factory=list, description="Batch sizes to sweep; empty = profile's.")
    allow_unreliable_profile: bool = Field(
        False, description="Search on measured costs that stayed unreliable after the profile re-measured them (a wide "
        "spread, a zero time, a pruned subblock slower than the parent's); off: the search stops and says which.",
    )

    @pydantic.model_validator(mode="after")
    def _several_need_the_mip(self) -> SearchSection:
        for key in ("solutions", "candidates"):
            if getattr(self, key) > 1 and self.method not in ("mip", "evolve"):
                raise ValueError(f"search.{key}: {getattr(self, key)} solutions need search.method mip or evolve; "
                                 f"{self.method} gives one")
        return self


class TargetSection(Section):
    engine: Engine = Field(
        Engine.transformers, description="The engine the child is served with: the library and the search offer only "
        "blocks it serves (puzzle.engines' rules; `puzzle validate` lists what it removes), and a parent it cannot "
        "take at all stops the job before any work.",
    )


class RealizeSection(Section):
    solution: int = Field(0, ge=0, description="Index of the solution to build.")
    dtype: DType = Field(
        "auto", description="Dtype the child is saved in (realize, KD, fuse); 'auto': the narrower of the parent "
        "checkpoint's own dtype and parent.dtype (a bf16 parent's child is bf16, whatever it was computed in).",
    )


class KdSection(TrainingSchedule):
    child: str | None = Field(
        None, description="Child checkpoint to distill; defaults to the one this job realized (RUN_DIR/child/checkpoint)."
    )
    tokens: int = Field(1_048_576, ge=1, description="Training tokens of global distillation (data.sequence_length per block).")
    learning_rate: float = Field(3e-4, gt=0, description="Peak learning rate (AdamW, no weight decay).")
    kl_weight: float = Field(1.0, ge=0, description="Weight of KL(parent ‖ child) on logits.")
    cosine_weight: float = Field(1.0, ge=0, description="Weight of Σ (1 − cos) over layer hidden states.")
    lm_weight: float = Field(0.0, ge=0, description="Weight of the LM loss (off by default: it hurt in the paper).")
    eval_blocks: int = Field(8, ge=1, description="Held-out blocks for the loss before and after distillation.")
    shard: bool = Field(
        False, description="With several processes, shard the child, its gradients and AdamW states, and the parent "
        "(the teacher), over them (FSDP2), each read a layer at a time, instead of holding both whole on every rank "
        "(DDP).",
    )
    offload: bool = Field(
        False, description="With kd.shard: keep the child's fp32 shards, gradients and AdamW states in host memory "
        "(FSDP2 CPU offload; the optimizer steps on the CPU): a child too large for the GPUs' memory, for slower "
        "steps.",
    )
    activation_checkpointing: bool = Field(
        False, description="Keep only each layer's input for the backward pass and recompute the rest: less memory "
        "for about a third more compute.",
    )

    @pydantic.model_validator(mode="after")
    def _some_loss(self) -> KdSection:
        if self.kl_weight == self.cosine_weight == self.lm_weight == 0:
            raise ValueError("kd.kl_weight, kd.cosine_weight and kd.lm_weight are all 0: nothing to train on")
        if self.offload and not self.shard:
            raise ValueError("kd.offload: true offloads FSDP2's shards; set kd.shard: true too")
        return self


class EvalSection(Section):
    validation_blocks: int = Field(32, ge=1, description="Held-out blocks for KL, perplexity and agreement.")
    batch_size: int = Field(4, ge=1, description="Blocks per forward pass.")
    tasks: list[str] = Field(
        default_factory=list, description="lm-evaluation-harness tasks run on parent and child (needs `pip install "
        "lm-eval`): a task's name, or the path of a task YAML of one's own over local data "
        "(examples/tasks/shakespeare_cloze.yaml).",
    )
    task_limit: int | None = Field(None, ge=1, description="Examples per lm-evaluation-harness task (all when unset).")
    speed_warmup: int = Field(1, ge=0, description="Untimed generations before the speed is measured.")
    speed_repeats: int = Field(5, ge=1, description="Timed rounds (every model once per round); each model's fastest is reported.")
    kv_dtype: Literal["model", "fp8"] = Field(
        "model", description="KV cache of the evaluated models: 'model' (their own dtype) or 'fp8' (simulated E4M3, "
        "per-layer scales calibrated on data.calibration_blocks; reports the KL it adds to each model).",
    )


class PuzzleConfig(Section):
    """A puzzle job: one section per stage."""

    run: RunSection = Field(default_factory=RunSection, description="Where and how the run is stored.")
    parent: ParentSection = Field(..., description="The model to compress.")
    data: DataSection = Field(..., description="Text for calibration, training and validation.")
    library: LibrarySection = Field(default_factory=LibrarySection, description="Candidate subblocks per layer.")
    bld: BldSection = Field(default_factory=BldSection, description="Blockwise local distillation.")
    scoring: ScoringSection = Field(default_factory=ScoringSection, description="Replace-1-block scores.")
    profile: ProfileSection = Field(default_factory=ProfileSection, description="Cost model scenario.")
    search: SearchSection = Field(default_factory=SearchSection, description="MIP architecture search.")
    target: TargetSection = Field(default_factory=TargetSection, description="Where the child will be served.")
    realize: RealizeSection = Field(default_factory=RealizeSection, description="Building the child checkpoint.")
    kd: KdSection = Field(default_factory=KdSection, description="Global knowledge distillation.")
    eval: EvalSection = Field(default_factory=EvalSection, description="Evaluation of parent and child.")

    @property
    def kd_steps(self) -> int:
        """Steps of global KD: its token budget over the tokens of one batch."""
        return self.kd.tokens // (self.kd.batch_size * self.data.sequence_length)

    def kd_settings(self, tokens: int | None = None):
        """Global KD's training settings from the kd section, for `tokens` (default kd.tokens; the search's
        tournament distills each child for fewer)."""
        from puzzle.distill.kd import KdSettings

        kd = self.kd
        steps = self.kd_steps if tokens is None else max(1, tokens // (kd.batch_size * self.data.sequence_length))
        return KdSettings(
            learning_rate=kd.learning_rate, schedule=kd.schedule, warmup_fraction=kd.warmup_fraction, steps=steps,
            batch_size=kd.batch_size, seed=self.run.seed, checkpoint_every=kd.checkpoint_every,
            kl_weight=kd.kl_weight, cosine_weight=kd.cosine_weight, lm_weight=kd.lm_weight,
        )


# --- loading --------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """'kd.tokens=1000' -> (['kd', 'tokens'], 1000). The value is read as YAML, so types come out right."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"--set {text!r}: expected KEY.SUB=VALUE, for example --set kd.tokens=1000"], "--set")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            child = node.get(k)
            if not isinstance(child, dict):
                child = node[k] = {}
            node = child
        node[keys[-1]] = value
    return out


def budget_overrides(texts: list[str]) -> list[str]:
    """`--budget KIND=VALUE` options as `--set search.budgets.KIND=VALUE` overrides (a flag replaces the config
    file's budget of its kind); every malformed budget and every kind given twice is a problem."""
    out, problems = budget_flags(texts)
    if problems:
        raise ConfigError(problems, "--budget")
    return out


def budget_flags(texts: list[str]) -> tuple[list[str], list[str]]:
    """The overrides of the well-formed `--budget` options, and one problem per other one."""
    problems, seen, out = [], {}, []
    for text in texts:
        try:
            budget = parse_budget(text)
        except PuzzleError as e:
            problems.append(str(e))
            continue
        if budget.kind in seen:
            problems.append(f"--budget {text!r}: {budget.kind.value} is already given as {seen[budget.kind]!r}; "
                            "give each kind once")
            continue
        seen[budget.kind] = text
        out.append(f"search.budgets.{budget.kind.value}={budget.value_text}")
    return out, problems


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with a key given twice (SafeLoader keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None,
                    f"duplicate key {key!r} (first at line {seen[key] + 1}, again at line {key_node.start_mark.line + 1}); "
                    "give each key once", key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError([f"{path} is a directory; give a YAML config file"], str(path))
    if not path.is_file():
        raise ConfigError([f"file not found: {path}"], str(path))
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError([f"malformed YAML{where}: {problem}"], str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError(["not a text file (UTF-8 expected)"], str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping of sections, got {type(data).__name__}"], str(path))
    return data


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """Field names of the model that owns the location `loc[:-1]`, to suggest on an unknown key."""
    current: Any = model
    for part in loc[:-1]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def format_validation_error(error: pydantic.ValidationError, model: type[BaseModel]) -> list[str]:
    problems = []
    for e in error.errors(include_url=False):
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("function-", "literal["))))
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc) or []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            hint += f"{'' if close else ';'} allowed keys here: {', '.join(allowed)}" if allowed else ""
            problems.append(f"{key}: unknown key{hint}")
        elif e["type"] == "missing":
            problems.append(f"{key}: required, not given")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            # A section's own check names its keys and values itself; the whole section would only be noise.
            problems.append(msg if msg.startswith(f"{key}.") else f"{key}: got {e['input']!r}; {msg}")
    return problems


def validate(raw: dict[str, Any], model: type[Section] = PuzzleConfig, source: str = "config") -> Section:
    """The validated config, or a ConfigError with every problem; the error carries, when it can be made, the
    config with each bad key left at its default (`partial`), so that the checks of files and data can still
    report their problems in the same run."""
    try:
        return model.model_validate(raw)
    except pydantic.ValidationError as e:
        error = ConfigError(format_validation_error(e, model), source)
        partial = _without_errors(raw, e, model)
        error.partial = None if partial is None else [partial]
        raise error from None


def _without_errors(raw: dict[str, Any], error: pydantic.ValidationError, model: type[Section]) -> Section | None:
    stripped = copy.deepcopy(raw)
    for e in error.errors(include_url=False):
        keys = [p for p in e["loc"] if isinstance(p, str) and not p.startswith(("function-", "literal["))]
        node = stripped
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not keys or not isinstance(node, dict) or keys[-1] not in node:
            return None  # a missing required key or a whole-section problem: no default to fall back on
        del node[keys[-1]]
    try:
        return model.model_validate(stripped)
    except pydantic.ValidationError:
        return None


def load_config(
    path: str | Path, overrides: list[str] | None = None, model: type[Section] = PuzzleConfig
) -> Section:
    raw = apply_overrides(read_yaml(path), overrides or [])
    return validate(raw, model, str(path))


# What each job of a multi-job file may set; the other sections are shared by all jobs of the run.
JOB_SECTIONS = ("search", "realize", "kd", "eval")


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _job_raws(raw: dict[str, Any]) -> tuple[list[tuple[str | None, dict[str, Any]]], list[str]]:
    """The file's jobs, each as the shared sections merged with its own, and problems with the `jobs` key."""
    if "jobs" not in raw:
        return [(None, raw)], []
    jobs, base = raw["jobs"], {k: v for k, v in raw.items() if k != "jobs"}
    example = "e.g. jobs: {half: {search: {budgets: {latency: 0.5x}}}}"
    if not isinstance(jobs, dict) or not jobs:
        return [], [f"jobs: got {jobs!r}; expected a mapping of job names to the sections they set, {example}"]
    out, problems = [], []
    for name, body in jobs.items():
        body = {} if body is None else body
        if not isinstance(body, dict):
            problems.append(f"jobs.{name}: got {body!r}; expected a mapping of sections, {example}")
            continue
        for key in body:
            if key not in JOB_SECTIONS:
                problems.append(
                    f"jobs.{name}.{key}: a job can set only {', '.join(JOB_SECTIONS)}; '{key}' is shared by every "
                    "job of the run, set it once at the top level"
                )
        merged = _merge(base, body)
        merged["run"] = {**(merged.get("run") or {}), "job": str(name)}
        out.append((str(name), merged))
    return out, problems


def load_jobs(path: str | Path, overrides: list[str] | None = None) -> list[PuzzleConfig]:
    """Every job of a job file: one, or one per entry of its `jobs:` mapping (all validated together)."""
    raw = apply_overrides(read_yaml(path), overrides or [])
    jobs, problems = _job_raws(raw)
    per_job: list[list[str]] = []
    configs, partial = [], []
    for _, job_raw in jobs:
        try:
            configs.append(validate(job_raw, PuzzleConfig, str(path)))
            partial.append(configs[-1])
            per_job.append([])
        except ConfigError as e:
            per_job.append(e.problems)
            partial += e.partial or []
    # A problem in the shared sections shows up in every job: report it once, without a job name.
    shared = set.intersection(*(set(p) for p in per_job)) if per_job else set()
    problems += sorted(shared, key=per_job[0].index) if shared else []
    for (name, _), found in zip(jobs, per_job):
        problems += [f"jobs.{name}: {p}" for p in found if p not in shared]
    if problems:
        error = ConfigError(problems, str(path))
        error.partial = partial if len(partial) == len(jobs) and jobs else None
        raise error
    return configs


def dump_config(config: Section) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def describe_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every field, for --help and docs."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _model_in(field.annotation)
        if sub is not None and sub is not model:
            rows.append((key, "", field.description or ""))
            rows.extend(describe_fields(sub, key + "."))
            continue
        if field.is_required():
            default = "(required)"
        elif field.default_factory is not None:
            default = repr(field.default_factory())
        else:
            default = repr(field.default.as_posix() if isinstance(field.default, Path) else field.default)
        rows.append((key, default, field.description or ""))
    return rows


# --- the parent-training job (`puzzle train-parent`) ----------------------------------------------


class TokenizerSection(Section):
    vocab_size: int = Field(4096, ge=300, description="BPE vocabulary size, including 3 special and 256 byte tokens.")


HybridLayer = Literal["mamba", "attention", "mlp", "moe"]


class ParentArchitecture(Section):
    model_type: Literal["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "gpt_oss", "nemotron_h"] = Field(
        "llama",
        description="llama: dense FFNs; mistral: llama with every layer's attention in a sliding_window; qwen2: "
        "q/k/v biases; qwen3: q/k norms; mixtral: mixture-of-experts FFNs (num_local_experts, top-k routing); "
        "qwen3_moe: mixtral's routing with q/k norms; gpt_oss: experts with biases and a clamped activation, "
        "attention sinks, sliding-window and full layers alternating; nemotron_h: a hybrid whose layers are each one "
        "mixer, named by layers_block_type.",
    )
    hidden_size: int = Field(192, ge=8, description="Width of the residual stream.")
    intermediate_size: int = Field(
        512, ge=1, description="FFN width (of each expert for the MoE families); a multiple of 256 keeps pruned sizes "
        "servable.",
    )
    head_dim: Optional[int] = Field(
        None, ge=1, description="Size of an attention head; None: hidden_size / num_attention_heads.")
    num_local_experts: int = Field(8, ge=2, description="MoE families: routed experts per layer.")
    num_experts_per_tok: int = Field(2, ge=1, description="MoE families: experts each token is routed to.")
    router_aux_loss_coef: float = Field(
        0.02, ge=0, description="mixtral, qwen3_moe, gpt_oss: weight of the load-balancing loss."
    )
    sliding_window: int = Field(
        128, ge=1, description="mistral: every layer's window; gpt_oss: window of the sliding layers (the first, "
        "third, … layer; the others are full).",
    )
    num_hidden_layers: int = Field(8, ge=1, description="Decoder layers (nemotron_h: the length of layers_block_type).")
    num_attention_heads: int = Field(6, ge=1, description="Query heads.")
    num_key_value_heads: int = Field(2, ge=1, description="KV heads (GQA); divides num_attention_heads.")
    max_position_embeddings: int = Field(512, ge=2, description="Longest context.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base (nemotron_h's attention has no RoPE).")
    tie_word_embeddings: bool = Field(False, description="Share input embeddings and lm_head.")
    layers_block_type: Optional[list[HybridLayer]] = Field(
        None, description="nemotron_h: each layer's mixer, mamba (Mamba-2), attention, mlp (ReLU² FFN) or moe (routed "
        "ReLU² experts and a shared one); None: mamba and mlp alternating, with attention as every fourth mixer.",
    )
    mamba_num_heads: int = Field(8, ge=1, description="nemotron_h: Mamba-2 heads per mamba layer.")
    mamba_head_dim: int = Field(16, ge=1, description="nemotron_h: channels per Mamba-2 head.")
    n_groups: int = Field(2, ge=1, description="nemotron_h: Mamba-2 B/C groups; divides mamba_num_heads.")
    ssm_state_size: int = Field(16, ge=1, description="nemotron_h: Mamba-2 state per head channel.")
    conv_kernel: int = Field(4, ge=1, description="nemotron_h: width of the Mamba-2 causal convolution.")

    @pydantic.model_validator(mode="after")
    def _heads(self) -> ParentArchitecture:
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError("num_attention_heads must divide hidden_size (or set head_dim)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_key_value_heads must divide num_attention_heads")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError("num_experts_per_tok must be at most num_local_experts")
        if self.mamba_num_heads % self.n_groups:
            raise ValueError("n_groups must divide mamba_num_heads")
        if self.layers_block_type is not None and self.model_type != "nemotron_h":
            raise ValueError("layers_block_type is for model_type nemotron_h only")
        if self.layers_block_type is not None and len(self.layers_block_type) != self.num_hidden_layers:
            raise ValueError(f"layers_block_type names {len(self.layers_block_type)} layers; num_hidden_layers is "
                             f"{self.num_hidden_layers}")
        return self

    def hybrid_layers(self) -> list[str]:
        """nemotron_h's layer types: the given ones, or the default pattern over num_hidden_layers."""
        if self.layers_block_type is not None:
            return list(self.layers_block_type)
        return ["attention" if i % 4 == 2 else "mamba" if i % 2 == 0 else "mlp" for i in range(self.num_hidden_layers)]


class ParentTrainingSection(Section):
    steps: int = Field(1000, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Blocks per step.")
    learning_rate: float = Field(2e-3, gt=0, description="Peak learning rate (AdamW).")
    min_learning_rate: float = Field(2e-4, ge=0, description="Learning rate at the end of the cosine decay.")
    warmup_steps: int = Field(50, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    eval_every: int = Field(100, ge=1, description="Steps between validation estimates.")
    eval_blocks: int = Field(16, ge=1, description="Validation blocks per estimate during training.")
    checkpoint_every: int = Field(50, ge=1, description="Steps between resumable checkpoints.")
    save_dtype: Literal["bfloat16", "float32"] = Field("bfloat16", description="Dtype of the shipped weights.")


class ParentTrainingConfig(Section):
    """`puzzle train-parent`: a tokenizer and a small parent of any supported family trained from text,
    deterministically."""

    output: Path = Field(..., description="Directory of the finished parent (replaced atomically at the end).")
    work_dir: Path = Field(Path("runs/train-parent"), description="Resumable checkpoints while training.")
    seed: int = Field(0, description="Seed of initialization and batch order.")
    data: DataSection = Field(..., description="Training text (data.tokenizer is ignored: one is trained).")
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection, description="The tokenizer to train.")
    model: ParentArchitecture = Field(default_factory=ParentArchitecture, description="The parent's family and sizes.")
    training: ParentTrainingSection = Field(default_factory=ParentTrainingSection, description="Optimization.")
