"""On-policy micro-batches: the student samples completions and the teachers grade every sampled token.

    rows of a micro-batch -> prompts -> student.generate (KV cache) -> prompt + completion rows
    whose targets are the sampled tokens only -> the ordinary step (teachers, router, loss)

Which micro-batches: micro-batch m of step s is on-policy when u(train.seed, s, m) < lmbda, u a
uniform draw from a generator seeded by those three numbers. It is the same on every process
(ZeRO-3 forwards are collectives, so every process must take the same path) and a pure function
of the step (resume stays exact). lmbda = 0 draws nothing and touches no random state: the run is
exactly an off-policy run.

Sampling is seeded per (train.seed, step, micro-batch, rank) inside `torch.random.fork_rng`: the
global generator (dropout, the router) is untouched, every process samples its own prompts, and a
resumed run samples the same tokens again.

Prompts, one per row of the micro-batch:
- chat rows (targets only on assistant tokens): every token before the last run of targets, i.e.
  the conversation up to the start of the last assistant turn (its template's header included);
- text rows (every token a target): the row's first `prompt_tokens` tokens.
A row that gives no prompt (no target, or shorter than prompt_tokens) gets a one-token stand-in
prompt, so every process runs the same generation, and no target.

Layout: prompts are left-padded for `generate` (positions follow the attention mask), then every
row is rewritten as prompt + completion from position 0 and right-padded, as training rows are,
so teachers and student read the sample as they read data. A completion ends at (and includes) the
student's end-of-sequence token, or after max_new_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import GenerationConfig

from merge_distill.losses import DIVERGENCES
from merge_distill.schema import OnPolicySection
from merge_distill.signals import IGNORE_INDEX, TokenBatch
from merge_distill.sources.signals import DenseSignals, LossSetup, SparseSignals

# What routers get on sampled tokens: each teacher's NLL of the sampled token (gold_nll), its
# entropy and argmax, its full distribution, the student's hidden state. A router that needs
# anything else is refused with onpolicy.lmbda > 0 (recipe_checks).
ON_POLICY_PROVIDES = frozenset({"gold_nll", "entropy", "top1", "logits", "hidden"})


def last_run_start(mask: Tensor, labels: Tensor) -> int | None:
    """Where the last run of targets of a right-padded row starts: mask / labels [T] (labels
    unshifted, -100 where no loss) -> a position, or None for a row without targets. Text rows
    (every token a target) give 0; chat rows the first token of their last assistant turn."""
    n = int(mask.sum())
    target = (labels[:n] != IGNORE_INDEX).nonzero().squeeze(-1)
    if target.numel() == 0:
        return None
    breaks = (target[1:] - target[:-1] > 1).nonzero().squeeze(-1)  # a target that does not follow another
    return int(target[breaks[-1] + 1]) if breaks.numel() else int(target[0])


def prompt_of(ids: Tensor, mask: Tensor, labels: Tensor, prompt_tokens: int) -> Tensor | None:
    """The prompt of one right-padded row, ids / mask / labels [T] -> ids [P], or None where the
    row gives none (module docstring)."""
    start = last_run_start(mask, labels)
    if start is None:
        return None
    if start > 0:
        return ids[:start]
    return ids[:prompt_tokens] if int(mask.sum()) >= prompt_tokens else None


def batch_prompts(batch: TokenBatch, prompt_tokens: int) -> list[Tensor | None]:
    """The prompt of every row of a batch (prompt_of), None where a row gives none."""
    return [prompt_of(batch.input_ids[b], batch.attention_mask[b], batch.labels[b], prompt_tokens)
            for b in range(len(batch.input_ids))]


@dataclass
class OnPolicy:
    """The recipe's on-policy settings, resolved for this process."""

    config: OnPolicySection
    seed: int
    pad_id: int
    eos_id: int | None
    rank: int
    synced: bool  # ZeRO-3 student over several processes: generate runs until every process is done
    vocab_size: int | None = None  # the tokenizer's size: padded embedding rows past it are never sampled
    engine: Any = None  # onpolicy.engine: vllm: a vllm_engine.VLLMSampler; None: transformers' generate

    @property
    def enabled(self) -> bool:
        return self.config.lmbda > 0

    def chosen(self, step: int, micro: int) -> bool:
        """Whether micro-batch `micro` of step `step` is on-policy (the same on every process)."""
        if not self.enabled:
            return False
        return bool(np.random.default_rng([self.seed % 2**63, step, micro]).random() < self.config.lmbda)

    def sampling_seed(self, step: int, micro: int) -> int:
        return int(np.random.SeedSequence([self.seed % 2**63, step, micro, self.rank]).generate_state(1)[0])

    def generation(self, model_vocab: int, greedy: bool = False) -> GenerationConfig:
        """Exactly the recipe's sampling: a fresh config, so none of the model's own generation
        defaults (top_k = 50, repetition penalties, ...) applies. The model's embedding rows past
        the tokenizer (padding, e.g. 152,064 rows for 151,665 tokens) are suppressed: they are no
        tokens, and the teachers could not grade them."""
        c = self.config
        sample = c.temperature > 0 and not greedy
        padded = list(range(self.vocab_size, model_vocab)) if self.vocab_size is not None else []
        return GenerationConfig(max_new_tokens=c.max_new_tokens, do_sample=sample,
                                temperature=c.temperature if sample else 1.0, top_p=c.top_p if sample else 1.0,
                                pad_token_id=self.pad_id, eos_token_id=self.eos_id, suppress_tokens=padded or None,
                                **({"top_k": 0} if sample else {}))  # top_k 0: no top-k cut (its default is 50)


def rollout(model: Any, batch: TokenBatch, policy: OnPolicy, seed: int, greedy: bool = False) -> TokenBatch:
    """The on-policy version of `batch`: its prompts, each followed by the student's sampled
    completion, with targets on the completion only. `model` is the unwrapped student."""
    prompts = batch_prompts(batch, policy.config.prompt_tokens)
    if policy.engine is not None:
        completions = policy.engine.sample(prompts, seed, greedy, policy.pad_id)
    else:
        completions = sample(model, prompts, policy, seed, greedy)
    rows = [(p, c) if p is not None else (batch.input_ids.new_full((1,), policy.pad_id), c[:0])
            for p, c in zip(prompts, completions)]
    width = max(len(p) + len(c) for p, c in rows)
    device = batch.input_ids.device
    ids = torch.full((len(rows), width), policy.pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for b, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        ids[b, :n] = torch.cat([p, c])
        mask[b, :n] = 1
        labels[b, len(p):n] = c
    return TokenBatch(ids, mask, labels, batch.domains, batch.sources, None, on_policy=True)


def fixed_samples(model: Any, rows: TokenBatch, policy: OnPolicy, tokenizer: Any) -> list[dict[str, str]]:
    """Greedy completions of the prompts of `rows` (the same rows at the start and the end of a
    run): [{"prompt", "completion"}] as text; rows that give no prompt are left out."""
    prompts = batch_prompts(rows, policy.config.prompt_tokens)
    completions = sample(model, prompts, policy, seed=0, greedy=True)
    return [{"prompt": tokenizer.decode(p), "completion": tokenizer.decode(c)}
            for p, c in zip(prompts, completions) if p is not None]


@torch.no_grad()
def sample(model: Any, prompts: list[Tensor | None], policy: OnPolicy, seed: int, greedy: bool = False) -> list[Tensor]:
    """Completions [n_b] of every prompt (None: a one-token stand-in, its completion discarded
    by the caller); each ends at its first end-of-sequence token, which it keeps."""
    device = next(p for p in model.parameters()).device
    stand_in = torch.tensor([policy.pad_id], device=device)
    prompts_ = [p.to(device) if p is not None else stand_in for p in prompts]
    width = max(len(p) for p in prompts_)
    ids = torch.full((len(prompts_), width), policy.pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts_):  # left padding: every prompt ends where generation starts
        ids[b, width - len(p):] = p
        mask[b, width - len(p):] = 1
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=policy.generation(model.config.vocab_size, greedy),
                                 synced_gpus=policy.synced)
    finally:
        model.train(was_training)
    new = out[:, width:]
    completions = []
    for row in new:
        ends = (row == policy.eos_id).nonzero() if policy.eos_id is not None else row[:0]
        completions.append(row[: int(ends[0]) + 1] if len(ends) else row)
    return completions


@dataclass
class SampledStats:
    """Sums over the sampled tokens of on-policy micro-batches (this process): how many, the
    router's weights [K], each teacher's reverse KL(student || teacher) [K] and the sampled
    tokens each teacher covers [K] (cross-tokenizer teachers may not cover some)."""

    tokens: float
    share: Tensor
    reverse_kl: Tensor
    covered: Tensor

    @classmethod
    def zero(cls, teachers: int) -> "SampledStats":
        z = torch.zeros(teachers, dtype=torch.float64)
        return cls(0.0, z, z.clone(), z.clone())

    @classmethod
    @torch.no_grad()
    def of(cls, signals: DenseSignals | SparseSignals, student_logits: Tensor, weights: Tensor, targets: Tensor,
           setup: LossSetup) -> "SampledStats":
        """student_logits [B, T, V], weights [B, T, K] (routed), targets [B, T] of an on-policy
        micro-batch. Reverse KL per teacher: the loss driver with all weight on that teacher and
        the reverse_kl divergence at loss.temperature (divided by T^2: KL of the tempered
        distributions), summed over the sampled tokens it covers."""
        mask = (targets != IGNORE_INDEX).to(weights.dtype)
        K = weights.shape[-1]
        entry = DIVERGENCES.get("reverse_kl")
        T = setup.config.temperature
        rkl_setup = LossSetup(entry.impl, entry.config_cls(kind="reverse_kl", temperature=T), "mixture",
                              setup.chunk_tokens)
        logits = student_logits.detach()
        reverse_kl = torch.zeros(K, dtype=torch.float64)
        covered = torch.zeros(K, dtype=torch.float64)
        for j in range(K):
            alone = torch.zeros_like(weights)
            alone[..., j] = mask
            alone = signals.route(alone)
            covered[j] = float(alone[..., j].sum())
            reverse_kl[j] = float(signals.loss(logits, alone, targets, rkl_setup).divergence_sum) / T**2
        return cls(float(mask.sum()), weights.double().sum(dim=(0, 1)).cpu(), reverse_kl, covered)

    def add(self, other: "SampledStats") -> None:
        self.tokens += other.tokens
        self.share += other.share
        self.reverse_kl += other.reverse_kl
        self.covered += other.covered

    def summary(self, names: list[str], reduce_sum: Any) -> dict:
        """The step's figures over every process (reduce_sum sums a tensor over processes):
        sampled tokens, routing share per teacher and reverse KL per covered sampled token."""
        packed = reduce_sum(torch.cat([torch.tensor([self.tokens], dtype=torch.float64), self.share,
                                       self.reverse_kl, self.covered]))
        K = len(names)
        tokens, share, rkl, covered = packed[0], packed[1:1 + K], packed[1 + K:1 + 2 * K], packed[1 + 2 * K:]
        return {"tokens": int(tokens),
                "share": {n: float(s / tokens) if tokens > 0 else None for n, s in zip(names, share)},
                "reverse_kl": {n: float(r / c) if c > 0 else None for n, r, c in zip(names, rkl, covered)}}
