"""On-policy sampling with a colocated vLLM engine (`onpolicy.engine: vllm`).

Each process starts one vLLM engine on its own GPU, beside the training, from the recipe's student
checkpoint (for its architecture and tokenizer), and copies the student's current weights into it
before sampling, every `onpolicy.vllm_sync_every` steps: the same colocated layout as TRL's
`vllm_mode="colocate"`. vLLM then answers a micro-batch's prompts with its paged KV cache and
continuous batching, which is where it beats transformers' `generate`.

What it returns is what `onpolicy.sample` returns: per prompt the sampled completion [n_b], ending
at its first end-of-sequence token, which it keeps. Sampling follows the recipe exactly
(temperature, top_p, no top-k cut, temperature 0 or `greedy`: argmax), never samples the embedding's
padded rows past the tokenizer, and is seeded per request: request b of a micro-batch gets the
micro-batch's seed (train.seed, step, micro-batch, rank) plus b, so a resumed run samples the same
tokens as far as vLLM's own kernels are deterministic.

vllm is imported when an engine is made (it is a heavy optional dependency that initialises CUDA).
The engine has not been run against a real vLLM in this project's CI (no GPU there):
tests/test_vllm_engine.py checks it against a stand-in with vLLM's interface.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from merge_distill.schema.onpolicy import OnPolicySection


class VLLMSampler:
    """One colocated vLLM engine and the settings it samples with."""

    def __init__(self, student_model: str, config: OnPolicySection, dtype: str, max_model_len: int,
                 eos_id: int | None, vocab_size: int | None, model_vocab: int, distributed: bool):
        import vllm

        self.vllm = vllm
        self.config = config
        self.eos_id = eos_id
        # the embedding's rows past the tokenizer are no tokens: never sampled (as `generate`'s suppress_tokens)
        self.allowed = list(range(vocab_size)) if vocab_size is not None and vocab_size < model_vocab else None
        self.llm = vllm.LLM(model=student_model, dtype=dtype, max_model_len=max_model_len,
                            gpu_memory_utilization=config.vllm_gpu_memory_utilization, enable_prefix_caching=False,
                            **({"distributed_executor_backend": "external_launcher"} if distributed else {}))
        self.synced_step: int | None = None

    def sync(self, model: nn.Module, step: int) -> bool:
        """Copy the student's weights into the engine when `step` is due (the first call, then every
        vllm_sync_every steps); -> whether it copied. model: the unwrapped student (HF names)."""
        due = self.synced_step is None or step - self.synced_step >= self.config.vllm_sync_every
        if not due:
            return False
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        with torch.no_grad():
            runner.model.load_weights((name, tensor.detach()) for name, tensor in model.state_dict().items())
        self.synced_step = step
        return True

    def sampling_params(self, seed: int, greedy: bool) -> Any:
        c = self.config
        sample = c.temperature > 0 and not greedy
        return self.vllm.SamplingParams(
            n=1, max_tokens=c.max_new_tokens, temperature=c.temperature if sample else 0.0,
            top_p=c.top_p if sample else 1.0, top_k=-1, seed=seed, allowed_token_ids=self.allowed,
            stop_token_ids=[self.eos_id] if self.eos_id is not None else None)

    def sample(self, prompts: list[Tensor | None], seed: int, greedy: bool = False, pad_id: int = 0) -> list[Tensor]:
        """Completions [n_b] of every prompt (None: a one-token stand-in, its completion discarded
        by the caller), on the prompts' device."""
        device = next((p.device for p in prompts if p is not None), torch.device("cpu"))
        requests = [{"prompt_token_ids": (p.tolist() if p is not None else [pad_id])} for p in prompts]
        params = [self.sampling_params(seed + b, greedy) for b in range(len(prompts))]
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        completions = []
        for out in outputs:
            row = torch.tensor(list(out.outputs[0].token_ids), dtype=torch.long, device=device)
            ends = (row == self.eos_id).nonzero() if self.eos_id is not None else row[:0]
            completions.append(row[: int(ends[0]) + 1] if len(ends) else row)
        return completions
