"""The memory plan (docs/design.md §15): the peak memory every stage needs on one rank, from the parent's
config and the job alone (no weights are read), against what a rank has: a GPU's memory, or
`run.memory_limit` (else this machine's RAM) shared by the processes of a CPU run.

A stage's peak is a sum of named terms (weights, optimizer states, activations, caches), each a formula
of the shapes and the job's batch settings; the formulas follow what the code allocates (docs/design.md
§15 lists them). What the code keeps on the host (BLD's initial-weight snapshot) counts against host
memory only: on a CPU run that is the same memory.

BLD is planned in groups: candidates are packed by bytes into the fewest balanced groups that fit next to
the parent, and the library stage trains exactly these groups (`bld_groups`).
"""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass, replace

from puzzle.blocks.costs import parameters
from puzzle.blocks.specs import ParentShape
from puzzle.config import PuzzleConfig
from puzzle.errors import PuzzleError
from puzzle.rundir import RunDir, Stage
from puzzle.search.hardware import gpu

GIB = 2**30
# The process before any model is loaded: Python, torch, transformers, datasets, tokenizers, pandas
# (resident size measured on this project's CPU machine, torch 2.13).
CPU_RUNTIME = 0.45 * GIB
# CUDA context, kernels and cuBLAS workspaces: outside torch's allocator but in the GPU's memory.
CUDA_RUNTIME = 1.0 * GIB
# BLD packs its groups into this share of what is left beside the parent: the allocator's fragmentation
# and the formulas' rounding take the rest.
PACKING_SHARE = 0.9
# fp32 master weight, its gradient, AdamW's two moments: what every trained parameter costs.
TRAINED_BYTES = 16
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class Phase(str, enum.Enum):
    """A part of a stage whose memory is freed before the next part starts: a stage's peak counts its terms
    of no phase plus the heaviest phase's."""

    calibration = "calibration"
    training = "training"


@dataclass(frozen=True)
class Term:
    name: str
    bytes: float
    host: bool = False  # kept in host memory (counts on the device only when the device is the host)
    phase: Phase | None = None


@dataclass(frozen=True)
class Target:
    """What one rank may use."""

    name: str  # "h100", "this machine"
    capacity: float  # bytes per rank
    ranks: int
    is_gpu: bool
    change: str  # what a user changes for more memory per rank

    @property
    def runtime(self) -> Term:
        return Term("runtime (CUDA context)" if self.is_gpu else "runtime (python, torch)",
                    CUDA_RUNTIME if self.is_gpu else CPU_RUNTIME)


@dataclass(frozen=True)
class StagePlan:
    stage: Stage
    terms: tuple[Term, ...]
    ranks: int  # processes the stage runs on
    groups: int | None = None  # BLD: candidate groups
    note: str = ""
    fix: str = ""  # what to change when it does not fit, where the stage knows better than the target
    bound: bool = False  # planned for a child as large as the parent, the search not having chosen one yet

    def peak(self, target: Target) -> float:
        """Bytes one rank needs at its peak, in the target's memory."""
        held = [t for t in self.terms if not (t.host and target.is_gpu)]
        phases = [sum(t.bytes for t in held if t.phase is p) for p in Phase]
        return sum(t.bytes for t in held if t.phase is None) + max(phases)


@dataclass(frozen=True)
class MemoryPlan:
    target: Target
    stages: tuple[StagePlan, ...]

    def stage(self, stage: Stage) -> StagePlan:
        return next(s for s in self.stages if s.stage is stage)

    def fits(self, stage: Stage) -> bool:
        return self.stage(stage).peak(self.target) <= self.target.capacity

    def problems(self, stages: list[Stage] | None = None, bounds: bool = True) -> list[str]:
        """One line for each stage (of `stages`, default all) that cannot fit, with the numbers and the fix;
        `bounds=False` leaves out stages planned for a child the search has not chosen yet."""
        out = []
        for s in self.stages:
            if (stages is not None and s.stage not in stages) or self.fits(s.stage) or (s.bound and not bounds):
                continue
            biggest = max((t for t in s.terms if not (t.host and self.target.is_gpu)), key=lambda t: t.bytes)
            fix = s.fix or self.target.change
            if any(t.name.startswith("parent") and "weights" in t.name and t.bytes > self.target.capacity
                   for t in s.terms):
                fix = ("the parent's weights alone exceed a rank's memory and this stage holds the whole parent on "
                       "each rank (only a dense parent in a local checkpoint is sharded, and only on several "
                       f"processes): {self.target.change}")
            out.append(
                f"memory plan: stage {s.stage.value} needs {gib(s.peak(self.target))} per rank, more than the "
                f"{gib(self.target.capacity)} a rank has on {self.target.name} (largest part: {biggest.name}, "
                f"{gib(biggest.bytes)}){': ' + s.note if s.note else ''}; {fix}"
            )
        return out


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


@dataclass(frozen=True)
class ModelShape:
    """A model's sizes from its config: what every formula reads."""

    shapes: tuple[ParentShape, ...]
    vocab_size: int
    fixed_params: int  # embeddings, final norm, untied lm_head
    dtype_bytes: int
    tied: bool = False  # lm_head is the embedding matrix
    mapped: bool = False  # loaded on the CPU in its checkpoint's dtype: the safetensors file stays memory-mapped

    @property
    def hidden_size(self) -> int:
        return self.shapes[0].hidden_size

    def layer_params(self, layers: range | None = None) -> list[int]:
        """Each layer's parameters (of `layers`, default all)."""
        chosen = self.shapes if layers is None else self.shapes[layers.start:layers.stop]
        return [parameters(s.attention, s) + parameters(s.ffn, s) for s in chosen]

    @property
    def params(self) -> int:
        return self.fixed_params + sum(self.layer_params())

    @property
    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes

    def parent_weights(self, target: Target, uses_head: bool, name: str = "parent weights") -> Term:
        """The parent's resident weights in a stage. A memory-mapped checkpoint (a CPU run in the file's dtype)
        pages in only what the stage reads: not the embedding matrix (a few rows are read), nor an lm_head
        the stage never applies."""
        if target.is_gpu or not self.mapped:
            return Term(name, self.weight_bytes)
        embedding = self.vocab_size * self.hidden_size * self.dtype_bytes
        unread = 0 if self.tied and uses_head else embedding
        if not self.tied and not uses_head:
            unread += embedding  # the untied lm_head
        return Term(f"{name} (read from the memory-mapped file)", self.weight_bytes - unread)

    def widest(self) -> int:
        """Widest per-token intermediate of a layer: a dense FFN, or the routed experts of an MoE one."""
        return max(s.intermediate_size * (s.experts_per_token or 1) for s in self.shapes)


def model_shape(config: PuzzleConfig, hf_config) -> ModelShape:
    from puzzle.families import parent_shapes
    from puzzle.profiling import fixed_parameters

    dtype = config.parent.dtype
    if dtype == "auto":
        found = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        dtype = str(found).removeprefix("torch.") if found is not None else "float32"
    stored = _stored_dtype(config, hf_config)
    return ModelShape(tuple(parent_shapes(hf_config)), hf_config.vocab_size, fixed_parameters(hf_config),
                      DTYPE_BYTES.get(dtype, 4), bool(getattr(hf_config, "tie_word_embeddings", False)),
                      config.parent.device == "cpu" and stored == dtype)


SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _stored_dtype(config: PuzzleConfig, hf_config) -> str:
    """The dtype of the parent's weights on disk: a local checkpoint's first tensor (its header only), else
    what the config says."""
    from safetensors import safe_open

    from puzzle.parents import local_checkpoint

    directory = local_checkpoint(config.parent)
    for file in sorted(directory.glob("*.safetensors"))[:1] if directory else []:
        with safe_open(file, "pt") as f:
            name = next(iter(f.keys()), None)
            if name is not None:
                return SAFETENSORS_DTYPES.get(f.get_slice(name).get_dtype(), "")
    stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    return str(stored).removeprefix("torch.") if stored is not None else "float32"


# --- targets -----------------------------------------------------------------------------------------


def machine_memory() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def target(config: PuzzleConfig, *, device: str | None = None, gpus: int = 1, processes: int = 1) -> Target:
    """`device` names a GPU of the sheet (`gpus` of them, one rank each); otherwise this machine: its CUDA
    device when the parent runs on one, else `run.memory_limit` (or the RAM) shared by `processes`."""
    if device is not None:
        spec = gpu(device)
        return Target(spec.name, spec.memory_gib * GIB, gpus, True, "use GPUs with more memory")
    if config.parent.device.startswith("cuda") or config.parent.device == "auto":
        import torch

        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            capacity = min(total, config.run.memory_limit) if config.run.memory_limit else total
            return Target(torch.cuda.get_device_name(0), capacity, processes, True, "use GPUs with more memory")
    limit = config.run.memory_limit or machine_memory()
    where = f"this machine (run.memory_limit {gib(limit)})" if config.run.memory_limit else "this machine"
    if processes > 1:
        where += f" shared by {processes} processes"
    return Target(where, limit / processes, processes, False,
                  "raise run.memory_limit if the machine has more, or run fewer processes")


# --- stages --------------------------------------------------------------------------------------------


def _candidate_bytes(params: int, target: Target) -> float:
    """A BLD candidate's trained state, plus its fp32 initial weights kept on the host."""
    return params * TRAINED_BYTES + (0 if target.is_gpu else params * 4)


def _bld_held(model: ModelShape, target: Target, share: range | None = None) -> list[Term]:
    """What BLD holds throughout: the runtime and the parent (or, in a pipeline, the `share` of its layers
    this rank holds)."""
    h = model.hidden_size
    parent = model.parent_weights(target, uses_head=False)
    if share is not None:
        held = sum(model.layer_params(share))
        # Read by key in the file's dtype on a CPU, the embeddings stay memory-mapped (a few rows are read).
        embedding = model.vocab_size * h if share.start == 0 and not (model.mapped and not target.is_gpu) else 0
        parent = Term(f"parent layers {share.start}-{share.stop - 1} of {len(model.shapes)}"
                      + (" and the embeddings" if embedding else ""), (held + embedding) * model.dtype_bytes)
    return [target.runtime, parent]


def _parent_activations(model: ModelShape, layers: int, blocks: int, length: int) -> float:
    """What `distill.bld.parent_activations` keeps of a batch: three streams per layer, and one FFN's widest
    intermediate while it runs."""
    b, t, h = blocks, length, model.hidden_size
    return 3 * layers * b * t * h * model.dtype_bytes + b * t * 3 * model.widest() * model.dtype_bytes


def _bld_fixed(config: PuzzleConfig, model: ModelShape, target: Target, largest: int,
               share: range | None = None) -> list[Term]:
    """BLD's terms that do not grow with the group: what it holds throughout, and while it trains the
    parent's activations of one batch and one candidate's forward and backward (candidates are
    back-propagated one at a time)."""
    b, t, h = config.bld.batch_size, config.bld.sequence_length, model.hidden_size
    layers = len(model.shapes) if share is None else len(share)
    act = model.dtype_bytes
    compute = min(act, 4)
    candidate_acts = b * t * (8 * h + 5 * model.widest()) * compute + 3 * b * t * h * 4
    autocast_copy = largest * 2 if act < 4 else 0
    return [
        *_bld_held(model, target, share),
        Term("parent activations (3 per layer)", _parent_activations(model, layers, b, t), phase=Phase.training),
        Term("one candidate's activations", candidate_acts + autocast_copy, phase=Phase.training),
    ]


def pack(sizes: list[float], capacity: float, min_groups: int = 1) -> list[list[int]] | None:
    """Indices of `sizes` in the fewest groups (at least `min_groups`, at most one per item) whose sums fit
    `capacity`, balanced: largest first into the lightest group. None when one item alone does not fit."""
    if not sizes:
        return []
    if max(sizes) > capacity:
        return None
    k = min(len(sizes), max(min_groups, math.ceil(sum(sizes) / capacity)))
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    while True:
        groups: list[list[int]] = [[] for _ in range(k)]
        loads = [0.0] * k
        for i in order:
            g = min(range(k), key=lambda j: (loads[j], j))
            groups[g].append(i)
            loads[g] += sizes[i]
        if max(loads) <= capacity or k == len(sizes):
            return [sorted(g) for g in groups if g]
        k += 1


def candidate_params(candidate, shape: ParentShape) -> int:
    return sum(parameters(s, shape) for s in (candidate.attention, candidate.ffn) if s is not None)


def _linear_subblocks(candidates: list) -> int:
    """The subblocks some candidate replaces by one Linear (`distill.bld.linear_slots`): a layer's attention,
    its FFN or both."""
    return len({(c.layer, spec is c.attention) for c in candidates for spec in (c.attention, c.ffn)
                if spec is not None and spec.linear})


def _calibration_activations(config: PuzzleConfig, model: ModelShape, share: range | None) -> Term:
    layers = len(model.shapes) if share is None else len(share)
    return Term("parent activations of a calibration batch (3 per layer)",
                _parent_activations(model, layers, config.eval.batch_size, config.data.sequence_length),
                phase=Phase.calibration)


def linear_fit_slots(config: PuzzleConfig, model: ModelShape, candidates: list, target: Target,
                     share: range | None = None) -> int:
    """How many linear subblocks one calibration pass of `distill.bld.linear_fits` fits at once: as many as
    their float32 statistics, 2(h+1)² each, fit beside the parent and a calibration batch's activations
    (they are freed before any candidate trains). At least one, though it may not fit: the plan says so."""
    subblocks = _linear_subblocks(candidates)
    beside = sum(t.bytes for t in [*_bld_held(model, target, share),
                                   _calibration_activations(config, model, share)]
                 if not (t.host and target.is_gpu))
    room = PACKING_SHARE * (target.capacity - beside)
    return max(1, min(subblocks, int(room // _fit_statistics_bytes(model.hidden_size))))


def _fit_statistics_bytes(hidden: int) -> int:
    """X^T X and X^T Y of one linear subblock, X with a ones column, in float32."""
    return 8 * (hidden + 1) ** 2


def _calibration_terms(config: PuzzleConfig, model: ModelShape, candidates: list, target: Target,
                       share: range | None) -> list[Term]:
    """Before training, BLD's calibration passes (FFN channel scores, least-squares starts of linear
    candidates): a batch's parent activations, the statistics of the linear subblocks fitted in one pass,
    and the fits, kept on the host while the candidates train."""
    terms = [_calibration_activations(config, model, share)]
    subblocks = _linear_subblocks(candidates)
    if subblocks:
        per_pass = linear_fit_slots(config, model, candidates, target, share)
        terms += [Term(f"least-squares statistics ({per_pass} of {subblocks} linear subblocks per calibration pass)",
                       per_pass * _fit_statistics_bytes(model.hidden_size), phase=Phase.calibration),
                  Term("linear candidates' starting weights (fp32, host)",
                       subblocks * 4 * (model.hidden_size + 1) * model.hidden_size, host=True)]
    return terms


def bld_groups(config: PuzzleConfig, model: ModelShape, candidates: list, target: Target,
               min_groups: int | None = None, share: range | None = None) -> tuple[list[list], StagePlan]:
    """The candidates in the groups BLD trains (at least `min_groups`, default one per rank), and the stage's
    plan (its peak: the heaviest group). `share`: the layers this rank holds in a pipeline."""
    sizes = [candidate_params(c, model.shapes[c.layer]) for c in candidates]
    fixed = _bld_fixed(config, model, target, max(sizes, default=0), share)
    room = PACKING_SHARE * (target.capacity - sum(t.bytes for t in fixed))
    bytes_of = [_candidate_bytes(n, target) for n in sizes]
    groups = pack(bytes_of, room, min_groups=target.ranks if min_groups is None else min_groups) if room > 0 else None
    if groups is None:
        # Nothing fits beside the parent: plan one candidate per group, so the plan shows by how much.
        groups = [[i] for i in range(len(candidates))]
        note = "not even the largest candidate fits beside the parent"
    else:
        note = (f"{len(candidates)} candidates in {len(groups)} group(s)"
                + (f", {math.ceil(len(groups) / target.ranks)} per rank" if share is None else " on this rank"))
    heaviest = max(groups, key=lambda g: sum(sizes[i] for i in g), default=[])
    params = sum(sizes[i] for i in heaviest)
    terms = [*fixed, *_calibration_terms(config, model, candidates, target, share),
             Term("candidates: fp32 weights, grads, AdamW (heaviest group)", params * TRAINED_BYTES,
                  phase=Phase.training),
             Term("candidates' initial weights (fp32, host)", params * 4, host=True, phase=Phase.training)]
    plan = StagePlan(Stage.library, tuple(terms), target.ranks, len(groups), note,
                     "lower bld.batch_size or bld.sequence_length (the parent's activations of a batch stay beside every group)")
    return [[candidates[i] for i in g] for g in groups], plan


def _logit_terms(model: ModelShape, blocks: int, length: int, name: str, models: int = 2) -> Term:
    """A batch's logits in the model's dtype and their float32 log-softmax, for each of `models` models."""
    return Term(name, models * blocks * length * model.vocab_size * (model.dtype_bytes + 8))


def placement(config: PuzzleConfig, hf_config, target: Target, replicated: StagePlan) -> str:
    """How a stage holds the parent: run.parent_placement, or for 'auto' the whole parent on every rank when
    its `replicated` plan fits, else a pipeline of layer shares where the parent allows one."""
    if config.run.parent_placement != "auto":
        return config.run.parent_placement
    if target.ranks == 1 or replicated.peak(target) <= target.capacity:
        return "replicated"
    return "layers" if split_problem(config, hf_config, target.ranks) is None else "replicated"


def split_problem(config: PuzzleConfig, hf_config, ranks: int) -> str | None:
    """Why the parent cannot be split into `ranks` layer shares; None when it can."""
    from puzzle.parents import readable_by_key

    if not readable_by_key(config.parent, hf_config):
        return (f"run.parent_placement: layers needs a local checkpoint of a dense parent (llama, mistral, qwen2, "
                f"qwen3), not {hf_config.model_type!r}; use replicated")
    if ranks > hf_config.num_hidden_layers:
        return (f"run.parent_placement: layers over {ranks} processes needs at least {ranks} layers; the parent "
                f"has {hf_config.num_hidden_layers}: run at most {hf_config.num_hidden_layers} processes")
    return None


def _pipelined(plans: list[StagePlan], target: Target, how: str) -> StagePlan:
    heaviest = max(plans, key=lambda p: p.peak(target))
    why = ", chosen: the whole parent does not fit" if how == "auto" else ""
    return replace(heaviest, note=f"pipeline of {target.ranks} layer shares{why}; the heaviest rank: {heaviest.note}")


def _scores(config: PuzzleConfig, hf_config, model: ModelShape, target: Target) -> StagePlan:
    """The whole parent on every rank, or a pipeline of layer shares (see `placement`)."""
    whole = scores_plan(config, model, target, None)
    if target.ranks == 1 or placement(config, hf_config, target, whole) != "layers":
        return whole
    from puzzle.distributed import layer_shares

    plans = [scores_plan(config, model, target, share) for share in layer_shares(len(model.shapes), target.ranks)]
    return _pipelined(plans, target, config.run.parent_placement)


def scores_plan(config: PuzzleConfig, model: ModelShape, target: Target, share: range | None) -> StagePlan:
    n, t, h = config.scoring.validation_blocks, config.data.sequence_length, model.hidden_size
    share = share or range(len(model.shapes))
    last = share.stop == len(model.shapes)
    held = sum(model.layer_params(share))
    # The embeddings on the first rank; the final norm and the head (tied or not, a vocabulary-sized matrix) on
    # the last.
    mapped = model.mapped and not target.is_gpu  # a CPU run in the file's dtype: the embeddings stay on disk
    outside = model.fixed_params if (share.start == 0 and last) else (
        model.vocab_size * h * (share.start == 0 and not mapped) + (model.vocab_size * h + h) * last)
    parent = (model.parent_weights(target, uses_head=True) if len(share) == len(model.shapes)
              else Term(f"parent layers {share.start}-{share.stop - 1}, with what the rank's end needs",
                        (held + outside) * model.dtype_bytes))
    reference = (len(share) + 1) * n * t * h * model.dtype_bytes
    layer_modules = max(model.layer_params()) * 4 * 3
    terms = [target.runtime, parent, Term("parent reference: hidden states of the held-out blocks", reference),
             Term("one layer's library modules (fp32)", layer_modules)]
    if last:
        terms.append(_logit_terms(model, config.scoring.batch_size, t, "logits of one batch"))
    return StagePlan(Stage.scores, tuple(terms), target.ranks,
                     fix="lower scoring.validation_blocks (their hidden states at every layer are kept) or scoring.batch_size")


UPPER_BOUND = "child as large as the parent (no search yet: an upper bound)"


def _child_params(config: PuzzleConfig, model: ModelShape) -> tuple[int, str]:
    """The child's parameters: from the job's chosen architecture when the search has run, else the parent's
    (an upper bound: the search only removes)."""
    from puzzle.solutions import read_solutions

    file = RunDir.of(config).stage_dir(Stage.search) / "solutions.json"
    if file.is_file():
        try:
            blocks = read_solutions(file).solutions[config.realize.solution].blocks
        except (PuzzleError, IndexError):
            blocks = None
        if blocks:
            layers = sum(parameters(b.attention, s) + parameters(b.ffn, s) for b, s in zip(blocks, model.shapes))
            return model.fixed_params + layers, "child from the job's search"
    return model.params, UPPER_BOUND


def _unit_params(model: ModelShape) -> int:
    """The largest FSDP2 unit of a sharded model (puzzle.sharding): a decoder layer, or a vocabulary-sized
    matrix (the embeddings, the head)."""
    return max(max(model.layer_params()), model.vocab_size * model.hidden_size)


def _sharded_parent(model: ModelShape, target: Target, name: str = "parent") -> list[Term]:
    """A parent sharded by FSDP2 over the target's ranks: its share at rest, and one unit whole while it runs
    (on a CPU also while it is read: the copy beside the file's mapped pages)."""
    whole = 1 if target.is_gpu else 2
    return [Term(f"{name} weights, 1/{target.ranks} per rank (FSDP2)", model.weight_bytes / target.ranks),
            Term(f"{name}: one unit whole (a layer or a vocabulary-sized matrix)"
                 + ("" if target.is_gpu else ", and the file pages of one as it is read"),
                 whole * _unit_params(model) * model.dtype_bytes)]


def _kd(config: PuzzleConfig, model: ModelShape, target: Target, by_key: bool) -> StagePlan:
    child, source = _child_params(config, model)
    sharded = config.kd.shard and target.ranks > 1
    n = target.ranks if sharded else 1
    b = max(1, config.kd.batch_size // target.ranks)
    t, h, layers = config.data.sequence_length, model.hidden_size, len(model.shapes)
    act = model.dtype_bytes
    one_layer = b * t * (12 * h + 4 * model.widest()) * min(act, 4)
    teacher = (_sharded_parent(model, target, "parent (teacher)") if sharded and by_key
               else [model.parent_weights(target, uses_head=True, name="parent (teacher) weights")])
    terms = [target.runtime, *teacher]
    if sharded:
        offload = config.kd.offload
        terms += [Term(f"child: fp32 weights, grads, AdamW, 1/{n} per rank (FSDP2"
                       + (", in host memory: kd.offload)" if offload else ")"), child * TRAINED_BYTES / n, host=offload),
                  Term("child: two units gathered at a time (layers, embeddings, head), fp32",
                       2 * _unit_params(model) * 4)]
    else:
        terms.append(Term("child: fp32 weights, grads, AdamW", child * TRAINED_BYTES))
        if target.ranks > 1:
            terms.append(Term("DDP gradient buckets", child * 4))
    if act < 4:
        terms.append(Term("child weights cast for autocast", (2 * _unit_params(model) if sharded else child) * 2))
    if config.kd.activation_checkpointing:
        terms.append(Term("child activations: each layer's input, one layer recomputed",
                          layers * b * t * h * min(act, 4) + one_layer))
    else:
        terms.append(Term("child activations for backward", layers * one_layer))
    terms += [Term("teacher hidden states", (layers + 1) * b * t * h * act),
              Term("logits: teacher, child, float32 log-softmax and grads", b * t * model.vocab_size * (2 * act + 20))]
    fix = ("lower kd.batch_size or data.sequence_length, set kd.activation_checkpointing, run more processes with "
           "kd.shard, set kd.offload, or search for a smaller child")
    return StagePlan(Stage.kd, tuple(terms), target.ranks, note=source, fix=fix, bound=source == UPPER_BOUND)


def _two_models(stage: Stage, config: PuzzleConfig, model: ModelShape, target: Target, batch: int,
                sharded: bool = False) -> StagePlan:
    """The parent and a child side by side (eval, fuse); `sharded`: both sharded by FSDP2 over the ranks."""
    child, source = _child_params(config, model)
    logits = _logit_terms(model, batch, config.data.sequence_length, "logits of one batch")
    if sharded:
        # On a GPU the child's forward gathers the next unit while one runs; on a CPU one unit of either model
        # is whole at a time, which the parent's term counts.
        prefetched = (Term("child: two units gathered at a time (its forward prefetches the next)",
                           2 * _unit_params(model) * model.dtype_bytes),) if target.is_gpu else ()
        terms = (target.runtime, *_sharded_parent(model, target),
                 Term(f"child weights, 1/{target.ranks} per rank (FSDP2)", child * model.dtype_bytes / target.ranks),
                 *prefetched, logits)
        note = f"{source}; parent and children sharded over {target.ranks} ranks (FSDP2)"
    else:
        terms = (target.runtime, model.parent_weights(target, uses_head=True),
                 Term("child weights (parent's dtype)", child * model.dtype_bytes), logits)
        note = source
    return StagePlan(stage, terms, target.ranks if sharded else 1, note=note,
                     fix="lower eval.batch_size or data.sequence_length", bound=source == UPPER_BOUND)


def _parent(config: PuzzleConfig, model: ModelShape, target: Target, sharded: bool) -> StagePlan:
    held = _sharded_parent(model, target) if sharded else [model.parent_weights(target, uses_head=True)]
    terms = (target.runtime, *held,
             _logit_terms(model, config.eval.batch_size, config.data.sequence_length, "logits of one batch", 1))
    return StagePlan(Stage.parent, terms, target.ranks if sharded else 1,
                     note=f"sharded over {target.ranks} ranks (FSDP2)" if sharded else "",
                     fix="lower eval.batch_size or data.sequence_length")


def _realize(config: PuzzleConfig, model: ModelShape, target: Target, by_key: bool) -> StagePlan:
    """Streamed on the host a layer at a time (a parent read by key), else parent and child whole."""
    if not by_key:
        return _two_models(Stage.child, config, model, target, 1)
    from puzzle.checkpoint import FILE_BYTES

    child, source = _child_params(config, model)
    terms = (target.runtime,
             Term("one parent layer, read by key (host)", max(model.layer_params()) * model.dtype_bytes, host=True),
             Term("the child's tensors of the output file being filled (host)",
                  min(FILE_BYTES, child * model.dtype_bytes), host=True))
    return StagePlan(Stage.child, terms, 1, note=f"{source}; streamed a layer at a time on the host",
                     bound=source == UPPER_BOUND)


def _profile(config: PuzzleConfig, model: ModelShape, target: Target) -> StagePlan:
    if config.profile.device != "local":
        return StagePlan(Stage.profile, (target.runtime,), 1, note="analytic: no weights are loaded")
    timed = DTYPE_BYTES.get(config.profile.weight_dtype, 4)
    layer = max(model.layer_params())
    terms = (target.runtime, model.parent_weights(target, uses_head=True),
             Term("a whole model of fresh modules in the profiled dtype", model.params * timed),
             Term("the timed stacks: a candidate and its partner in every layer", len(model.shapes) * layer * timed))
    return StagePlan(Stage.profile, terms, 1, note="measured")


def _search(config: PuzzleConfig, model: ModelShape, target: Target) -> StagePlan:
    """The MIP alone needs no model; measuring children whole (search.candidates, evolve) holds the parent,
    the measured blocks' streams entering every layer, and one layer's library modules at a time."""
    from puzzle.stages.search import measures_children

    if not measures_children(config):
        return _light(Stage.search, target, "the MIP on the CPU")
    s = config.search
    n, t, h = s.measure_blocks, config.data.sequence_length, model.hidden_size
    terms = (target.runtime, model.parent_weights(target, uses_head=True),
             Term("streams of the measured blocks entering every layer", (len(model.shapes) + 1) * n * t * h
                  * model.dtype_bytes),
             Term("one layer's library modules (fp32)", max(model.layer_params()) * 4 * 3),
             _logit_terms(model, config.scoring.batch_size, t, "logits of one batch"))
    if s.tournament:
        # The tournament's short KD holds one child in training; as in the kd stage, at most the parent's size.
        kd = _kd(config, model, target, by_key=False)
        terms += tuple(t for t in kd.terms if t.name.startswith(("child", "logits", "teacher hidden")))
    return StagePlan(Stage.search, terms, 1, note="children measured whole",
                     fix="lower search.measure_blocks or data.sequence_length")


def _light(stage: Stage, target: Target, note: str) -> StagePlan:
    return StagePlan(stage, (target.runtime,), 1, note=note)


def _library(config: PuzzleConfig, hf_config, model: ModelShape, candidates: list, tgt: Target) -> StagePlan:
    """BLD's plan: the whole parent on every rank, or a pipeline of layer shares (see `placement`)."""
    whole = bld_groups(config, model, candidates, tgt)[1]
    if tgt.ranks == 1 or placement(config, hf_config, tgt, whole) != "layers":
        return whole
    from puzzle.distributed import layer_shares

    plans = [bld_groups(config, model, [c for c in candidates if c.layer in share], tgt, 1, share)[1]
             for share in layer_shares(len(model.shapes), tgt.ranks)]
    return _pipelined(plans, tgt, config.run.parent_placement)


def plan(config: PuzzleConfig, hf_config, tgt: Target, candidates: list) -> MemoryPlan:
    """Every stage's plan for `config` on `tgt`; `candidates`: what BLD trains."""
    from puzzle.parents import readable_by_key

    model = model_shape(config, hf_config)
    by_key = readable_by_key(config.parent, hf_config)
    sharded = by_key and tgt.ranks > 1  # the parent and eval stages shard the parent over the processes
    stages = (
        _parent(config, model, tgt, sharded),
        _library(config, hf_config, model, candidates, tgt),
        _scores(config, hf_config, model, tgt),
        _profile(config, model, tgt),
        _search(config, model, tgt),
        _realize(config, model, tgt, by_key),
        _kd(config, model, tgt, by_key),
        _two_models(Stage.eval, config, model, tgt, config.eval.batch_size, sharded),
        _light(Stage.report, tgt, "tables and plots"),
        _two_models(Stage.fuse, config, model, tgt, config.eval.batch_size),
    )
    return MemoryPlan(tgt, stages)
