"""Train an embedded parent: a tokenizer and a small model of any supported family, from shipped text.

Deterministic for a given config and machine: the initialization, the batch order and the data split
all come from seeds. Checkpoints are written atomically every `checkpoint_every` steps, so a killed
run resumes where it stopped and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    NemotronHConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from puzzle.config import ParentTrainingConfig, dump_config
from puzzle.data import TokenBlocks, load_blocks, read_documents
from puzzle.distill.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from puzzle.distill.metrics import next_token_loss
from puzzle.distill.schedule import batch_indices, warmup_cosine
from puzzle.io import atomic_dir, atomic_write_text
from puzzle.progress import progress_bar
from puzzle.tokenizer import train_tokenizer

# Names the format of the training state; a checkpoint of another format is not resumed from.
CHECKPOINT_TAG = "train-parent-v2"

SAMPLE_PROMPTS = ["ROMEO.\n", "To be, or not to be", "KING.\nMy lords,"]


@dataclass(frozen=True)
class ParentTrainingResult:
    output: Path
    parameters: int
    validation_loss: float
    validation_perplexity: float
    seconds: float


def learning_rate(step: int, cfg: ParentTrainingConfig) -> float:
    t = cfg.training
    return warmup_cosine(step, t.steps, t.learning_rate, t.warmup_steps, floor=t.min_learning_rate)


def model_config(cfg: ParentTrainingConfig, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    m = cfg.model
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads,
        head_dim=m.head_dim or m.hidden_size // m.num_attention_heads,
        max_position_embeddings=m.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        tie_word_embeddings=m.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        attn_implementation="sdpa",
    )
    # The router's load-balancing loss keeps every expert in use; without it a few take all tokens.
    routing = dict(num_experts_per_tok=m.num_experts_per_tok, router_aux_loss_coef=m.router_aux_loss_coef,
                   output_router_logits=True)
    if m.model_type == "mistral":
        return MistralConfig(**common, sliding_window=m.sliding_window)
    if m.model_type == "qwen2":
        return Qwen2Config(**common)
    if m.model_type == "qwen3":
        return Qwen3Config(**common)
    if m.model_type == "mixtral":
        return MixtralConfig(**common, num_local_experts=m.num_local_experts, **routing)
    if m.model_type == "qwen3_moe":
        return Qwen3MoeConfig(**common, num_experts=m.num_local_experts, moe_intermediate_size=m.intermediate_size,
                              norm_topk_prob=True, **routing)
    if m.model_type == "gpt_oss":
        # Transformers runs GPT-OSS eagerly only (sdpa cannot take its sinks). Plain RoPE: YaRN stretches a context
        # this parent is not trained past.
        common.update(attn_implementation="eager")
        return GptOssConfig(**common, num_local_experts=m.num_local_experts, **routing, sliding_window=m.sliding_window)
    if m.model_type == "nemotron_h":
        return _nemotron_h_config(m, common)
    return LlamaConfig(**common)


def _nemotron_h_config(m, common: dict) -> PretrainedConfig:
    """A hybrid: each layer one mixer. Its attention has no RoPE, its FFNs are ReLU² without a gate, and its MoE
    layers route to `num_local_experts` experts beside one shared expert of the same width."""
    for word in ("num_hidden_layers", "rope_parameters"):
        common.pop(word)
    return NemotronHConfig(
        **common, layers_block_type=m.hybrid_layers(), mamba_num_heads=m.mamba_num_heads,
        mamba_head_dim=m.mamba_head_dim, n_groups=m.n_groups, ssm_state_size=m.ssm_state_size,
        conv_kernel=m.conv_kernel, chunk_size=min(128, m.max_position_embeddings), use_mamba_kernels=False,
        n_routed_experts=m.num_local_experts, num_experts_per_tok=m.num_experts_per_tok,
        moe_intermediate_size=m.intermediate_size, moe_shared_expert_intermediate_size=m.intermediate_size,
    )


def mean_loss(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    model.eval()
    loss, _ = next_token_loss(lambda x: model(input_ids=x).logits, blocks, batch_size)
    model.train()
    return loss


def _save_checkpoint(work: Path, model, optimizer, step: int, log: list[dict]) -> None:
    # The training-state format BLD and KD use: weights and AdamW moments as safetensors, no pickles.
    save_checkpoint(work / "checkpoint", nn.ModuleDict({"model": model}), optimizer, TrainingState(step, log=log),
                    tag=CHECKPOINT_TAG)


def _load_checkpoint(work: Path, model, optimizer) -> tuple[int, list[dict]]:
    state = load_checkpoint(work / "checkpoint", nn.ModuleDict({"model": model}), optimizer, tag=CHECKPOINT_TAG)
    return (0, []) if state is None else (state.step, state.log)


def _prepare_tokenizer(cfg: ParentTrainingConfig) -> PreTrainedTokenizerFast:
    """Train the tokenizer once per work dir; a resumed run reuses it."""
    tok_dir = cfg.work_dir / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    docs = read_documents(cfg.data)
    with atomic_dir(tok_dir) as tmp:
        tokenizer = train_tokenizer(docs, cfg.tokenizer.vocab_size, tmp)
    return tokenizer


def samples(model, tokenizer, seed: int, max_new_tokens: int = 60) -> list[str]:
    torch.manual_seed(seed)
    out = []
    model.eval()
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=True, top_k=40, temperature=0.8)
        out.append(tokenizer.decode(gen[0], skip_special_tokens=True))
    return out


def train_parent(cfg: ParentTrainingConfig) -> ParentTrainingResult:
    started = time.time()
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.work_dir / "config.yaml", dump_config(cfg))
    tokenizer = _prepare_tokenizer(cfg)
    blocks: TokenBlocks = load_blocks(cfg.data, tokenizer)

    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(model_config(cfg, tokenizer))
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.training.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.training.learning_rate,
        betas=(0.9, 0.95),
    )
    step, log = _load_checkpoint(cfg.work_dir, model, optimizer)
    t = cfg.training
    eval_set = blocks.validation[: t.eval_blocks]
    with progress_bar() as bar:
        task = bar.add_task("train parent", total=t.steps, completed=step, status="")
        while step < t.steps:
            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = blocks.train[batch_indices(step, len(blocks.train), t.batch_size, cfg.seed)]
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            row = {"step": step, "loss": round(loss.item(), 5), "lr": lr, "tokens": step * t.batch_size * x.size(1)}
            if step % t.eval_every == 0 or step == t.steps:
                row["validation_loss"] = round(mean_loss(model, eval_set), 5)
            log.append(row)
            bar.update(task, advance=1, status=f"loss {row['loss']:.3f}")
            if step % t.checkpoint_every == 0 and step < t.steps:
                _save_checkpoint(cfg.work_dir, model, optimizer, step, log)

    return _finish(cfg, model, tokenizer, blocks, log, time.time() - started)


def _finish(cfg, model, tokenizer, blocks: TokenBlocks, log: list[dict], seconds: float) -> ParentTrainingResult:
    dtype = getattr(torch, cfg.training.save_dtype)
    # Router logits are a training signal (load balancing); users of the parent do not want them returned.
    if hasattr(model.config, "output_router_logits"):
        model.config.output_router_logits = False
    with atomic_dir(cfg.output) as tmp:
        model.to(dtype).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, do_sample=True, top_k=40,
            temperature=0.8, max_new_tokens=128,
        ).save_pretrained(tmp)
        # The shipped figure is measured on the shipped (rounded) weights, loaded as users load them.
        shipped = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        val_loss = mean_loss(shipped, blocks.validation[:])
        summary = {
            "parameters": sum(p.numel() for p in shipped.parameters()),
            "validation_loss": round(val_loss, 4),
            "validation_perplexity": round(math.exp(val_loss), 3),
            "validation_blocks": len(blocks.validation),
            "validation_tokens": len(blocks.validation) * (blocks.validation.length - 1),
            "train_blocks": len(blocks.train),
            "data_fingerprint": blocks.fingerprint,
            "training_seconds": round(seconds, 1),
            "steps": cfg.training.steps,
            "tokens_seen": cfg.training.steps * cfg.training.batch_size * cfg.data.sequence_length,
            "torch": torch.__version__,
            "samples": samples(shipped, tokenizer, cfg.seed),
        }
        (tmp / "training_config.yaml").write_text(dump_config(cfg))
        (tmp / "training_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return ParentTrainingResult(
        output=cfg.output,
        parameters=summary["parameters"],
        validation_loss=val_loss,
        validation_perplexity=math.exp(val_loss),
        seconds=seconds,
    )
