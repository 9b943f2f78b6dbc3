"""The recipe's `onpolicy:` section (schema only; the sampling itself is merge_distill.onpolicy)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class OnPolicySection(BaseModel):
    """On-policy micro-batches: the student samples completions and the teachers grade every
    sampled token (GKD's lmbda; docs/ONPOLICY.md)."""

    model_config = ConfigDict(extra="forbid")

    lmbda: float = Field(
        0.0, ge=0, le=1, description="Share of micro-batches that are on-policy (GKD's lmbda): each is drawn with this "
        "probability from (train.seed, step, micro-batch), the same on every process. 0: off-policy only (no sampling).")
    max_new_tokens: int = Field(64, ge=1, description="Tokens the student samples per prompt (fewer where it ends "
                                "with its end-of-sequence token).")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens with this mass.")
    prompt_tokens: int = Field(
        32, ge=1, description="Text rows (every token a target): the prompt is the row's first prompt_tokens tokens. "
        "Chat rows: the conversation up to the start of the last assistant turn.")
    live_teachers: bool = Field(
        False, description="With cache.use: load the teachers too, and let them grade the on-policy micro-batches "
        "live (no cache holds the student's samples); off-policy micro-batches still read the cache.")
    samples: int = Field(4, ge=0, description="Fixed prompts answered greedily at the start and the end of the run, "
                         "shown in the report (onpolicy_samples.json).")
    engine: Literal["hf", "vllm"] = Field(
        "hf", description="What samples: hf, transformers' generate with a KV cache (the default); vllm, a vLLM "
        "engine colocated on each process's GPU, given the student's weights every vllm_sync_every steps (needs the "
        "vllm package and a CUDA GPU; not with a LoRA or ZeRO-3 student).")
    vllm_sync_every: int = Field(1, ge=1, description="engine: vllm: copy the student's weights into the engine "
                                 "before sampling every this many steps (1: always the current student).")
    vllm_gpu_memory_utilization: float = Field(
        0.3, gt=0, le=0.95, description="engine: vllm: the share of the GPU's memory vLLM may take (weights and KV "
        "cache); the rest stays for training.")
