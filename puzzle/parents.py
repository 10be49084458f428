"""Loading a parent: a local Hugging Face directory, or a hub id when online.

Weights load from safetensors only (`use_safetensors=True`), and the parent's own modeling code runs
only when the user sets `parent.trust_remote_code`. torch and transformers are imported by the functions
that need them, so the first checks of a job (`local_checkpoint`) answer without them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from puzzle.config import ParentSection
from puzzle.errors import PuzzleError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

    from puzzle.families import FamilyAdapter


@dataclass
class Parent:
    model: PreTrainedModel
    tokenizer: object
    adapter: FamilyAdapter
    source: str
    layers: range | None = None  # the layers this process holds, when it holds only some (the rest are on "meta")
    sharded: bool = False  # FSDP2: this process holds 1/N of every weight

    @property
    def device(self):
        return self.adapter.device

    @property
    def dtype(self):
        return next(p for p in self.model.parameters() if p.device.type != "meta").dtype


def _is_local(path: str) -> bool:
    # A hub id is "name" or "org/name"; anything else is meant as a local path.
    return Path(path).exists() or path.startswith((".", "/", "~")) or path.count("/") > 1


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt, so an offline user gets an answer now, not after the hub client's retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_config(section: ParentSection) -> PretrainedConfig:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(section.path, trust_remote_code=section.trust_remote_code, local_files_only=True)
    except (OSError, ValueError):
        pass  # not in the local hub cache: try the network below
    if not _hub_reachable():
        raise PuzzleError(
            f"parent.path: {section.path!r} is not a local directory, and the hub cannot be reached to fetch it; "
            "give the path of a downloaded checkpoint"
        )
    try:
        return AutoConfig.from_pretrained(section.path, trust_remote_code=section.trust_remote_code)
    except (OSError, ValueError) as e:
        raise PuzzleError(f"parent.path: cannot load {section.path!r} from the hub: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def local_checkpoint(section: ParentSection) -> Path | None:
    """The local folder `parent.path` names, checked to hold a config.json; None for a hub id."""
    if not _is_local(section.path):
        return None
    local = Path(section.path).expanduser()
    if not local.is_dir():
        raise PuzzleError(f"parent.path: {section.path!r} does not exist or is not a directory")
    if not (local / "config.json").is_file():
        raise PuzzleError(f"parent.path: {section.path!r} has no config.json; is it a Hugging Face checkpoint?")
    return local


def parent_config(section: ParentSection) -> PretrainedConfig:
    """Read and check the parent's config without loading weights (cheap; used before writing anything)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    from puzzle.families import family_for

    local = local_checkpoint(section)
    if local is None:
        config = _hub_config(section)
        family_for(config.model_type)
        return config
    config_file = local / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise PuzzleError(f"parent.path: {config_file} is not valid JSON ({e})") from None
    # Checked before AutoConfig, which would otherwise fail on families transformers does not know.
    family_for(str(model_type))
    try:
        return AutoConfig.from_pretrained(str(local), trust_remote_code=section.trust_remote_code)
    except (OSError, ValueError, StrictDataclassError) as e:  # the last: a field a strict config class refuses
        # A strict config's own first line names only its validator; the cause says what is wrong.
        raise PuzzleError(f"parent.path: cannot load {str(local)!r}: {_first_line(e.__cause__ or e)}") from None


def check_checkpoint_weights(directory: Path, key: str) -> None:
    """The checkpoint's weights are safetensors whose headers read and cover its index; only headers are read."""
    from safetensors import SafetensorError, safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
        if pickled:
            raise PuzzleError(
                f"{key}: {str(directory)!r} has only pickled weights ({', '.join(pickled[:3])}); puzzle loads "
                "safetensors only and never unpickles: save the model with save_pretrained(..., safe_serialization=True)"
            )
        raise PuzzleError(f"{key}: {str(directory)!r} has no model weights (*.safetensors)")
    names: set[str] = set()
    for file in files:
        try:
            with safe_open(file, "pt") as f:
                names |= set(f.keys())
        except (SafetensorError, OSError) as e:
            raise PuzzleError(f"{key}: {file} is damaged, not a readable safetensors file ({_first_line(e)})") from None
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PuzzleError(f"{key}: {index} is damaged, not a safetensors index ({_first_line(e)})") from None
        missing_files = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing_files:
            raise PuzzleError(f"{key}: {index} names shards that are not there: {', '.join(missing_files[:3])}")
        missing = sorted(set(weight_map) - names)
        if missing:
            raise PuzzleError(f"{key}: {index} names {len(missing)} tensors no shard holds (e.g. {missing[0]})")


def check_weights(section: ParentSection) -> None:
    """A local parent's weights can be loaded as puzzle loads them (a hub parent is checked when it loads)."""
    if _is_local(section.path):
        check_checkpoint_weights(Path(section.path).expanduser(), "parent.path")


def check_tokenizer(section: ParentSection) -> None:
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(Path(section.path).expanduser()) if _is_local(section.path) else section.path,
                                      trust_remote_code=section.trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise PuzzleError(f"parent.path: no tokenizer loads from {section.path!r} ({_first_line(e)}); save one beside "
                          "the weights or set data.tokenizer") from None


def parent_device(name: str) -> torch.device:
    """The device `parent.device` names for this process. 'cuda' (or 'auto' with a GPU) without an index is
    the rank's own GPU in a multi-process job: LOCAL_RANK, as torchrun and accelerate set it."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PuzzleError(f"parent.device: {name!r} is not a torch device (try 'cpu', 'cuda', 'cuda:0', 'auto')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PuzzleError(f"parent.device: {name!r} asked for, but no CUDA device is available here")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        # NCCL's communicators, and FSDP2's default mesh, take the current device: each rank's own.
        torch.cuda.set_device(device)
        # fp32 matrix products (an fp32 parent, fp32 losses) on the tensor cores' TF32 path.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def load_parent(section: ParentSection, layers: range | None = None, head: bool = False,
                sharded: bool = False) -> Parent:
    """The parent on its device; with `layers`, only those decoder layers (the embeddings too when the range
    starts at 0, the final norm and lm_head with `head`), read by key from the safetensors files: the rest of
    the model stays on the meta device. `sharded`: the whole parent sharded by FSDP2 over the default process
    group, read a layer at a time (`puzzle.sharding`), where its weights can be read by key; otherwise whole."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from puzzle.families import family_adapter, family_for

    config = parent_config(section)
    if layers is not None:
        return _load_layers(section, config, layers, head)
    if sharded and readable_by_key(section, config):
        return _load_sharded(section, config)
    device = parent_device(section.device)
    path = str(Path(section.path).expanduser()) if _is_local(section.path) else section.path
    dtype = "auto" if section.dtype == "auto" else getattr(torch, section.dtype)
    attn_implementation = section.attn_implementation if family_for(config.model_type).sdpa else "eager"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=section.trust_remote_code,
            use_safetensors=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=section.trust_remote_code)
    except (OSError, ValueError) as e:
        raise PuzzleError(f"parent.path: cannot load {path!r}: {_first_line(e)}") from None
    if config.model_type == "gpt_oss" and not isinstance(getattr(model.model.layers[0].mlp.experts, "gate_up_proj", None),
                                                         torch.nn.Parameter):
        raise PuzzleError(
            f"parent.path: {path!r} holds its experts in MXFP4; load it with Mxfp4Config(dequantize=True), save that "
            "bf16 copy and give its path"
        )
    model.to(device).eval()
    model.requires_grad_(False)
    return Parent(model=model, tokenizer=tokenizer, adapter=family_adapter(model), source=path)


def _skeleton(section: ParentSection, config):
    """The parent built on the meta device (no memory), its local checkpoint and device, for the loaders that
    read it by key."""
    import torch
    from transformers import AutoModelForCausalLM

    if not readable_by_key(section, config):
        raise PuzzleError("run.parent_placement: layers needs a local checkpoint of a dense parent; use replicated")
    directory = local_checkpoint(section)
    dtype = section.dtype if section.dtype != "auto" else getattr(config, "dtype", None) or "float32"
    dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).removeprefix("torch."))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=section.attn_implementation)
    return model, directory, parent_device(section.device)


def readable_by_key(section: ParentSection, config) -> bool:
    """Whether the parent's weights can be read a layer at a time: a local checkpoint of a dense family."""
    from puzzle.families import is_dense

    return local_checkpoint(section) is not None and is_dense(config.model_type)


def parent_skeleton(section: ParentSection) -> Parent:
    """The parent built on the meta device, with its tokenizer and generation config: no weights at all
    (a caller reads what it needs by key)."""
    model, directory, _ = _skeleton(section, parent_config(section))
    return _finished(section, model, directory, layers=range(0))


def _finished(section: ParentSection, model, directory: Path, **fields) -> Parent:
    from transformers import AutoTokenizer, GenerationConfig

    from puzzle.families import family_adapter

    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(directory))
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=section.trust_remote_code)
    return Parent(model=model, tokenizer=tokenizer, adapter=family_adapter(model), source=str(directory), **fields)


def _load_layers(section: ParentSection, config, layers: range, head: bool) -> Parent:
    from puzzle.sharding import CheckpointReader

    model, directory, device = _skeleton(section, config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    wanted = tuple(f"model.layers.{i}." for i in layers)
    wanted += ("model.embed_tokens.",) if layers.start == 0 or (head and tied) else ()
    wanted += ("model.norm.", "lm_head.") if head else ()
    reader = CheckpointReader(directory)
    tensors = reader.read([key for key in reader.files if key.startswith(wanted)])
    model.load_state_dict({k: v.to(device=device, dtype=model.dtype) for k, v in tensors.items()}, strict=False,
                          assign=True)
    if head and tied:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True replaced the tied parameter
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    return _finished(section, model, directory, layers=layers)


def _load_sharded(section: ParentSection, config) -> Parent:
    from puzzle.sharding import CheckpointReader, shard_from_checkpoint

    model, directory, device = _skeleton(section, config)
    shard_from_checkpoint(model, CheckpointReader(directory), device=device, dtype=model.dtype)
    return _finished(section, model, directory, sharded=True)
