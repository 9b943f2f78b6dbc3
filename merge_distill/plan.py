"""The data side of a run: the training rows, their seeded mix and which rows each step reads.

The step -> rows mapping is a pure function of the step (MixedStream), so resume needs no
data state and every process finds its own micro-batches without talking to the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from merge_distill.data import MixedStream, SourceRows, steps_for_epochs
from merge_distill.rowstore import build_rows, store_dir
from merge_distill.streaming import StreamRows
from merge_distill.schema import Recipe
from merge_distill.signals import TokenBatch


@dataclass
class DataPlan:
    """Which rows every optimizer step reads, on this process.

    rows_per_micro is micro_batch_size x world_size: micro-batch `m` of step `s` covers global
    rows (s * grad_accum + m) * rows_per_micro ..., and this process reads its slice of them.
    """

    sources: list[SourceRows]
    stream: MixedStream
    total_steps: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    rank: int

    def micro_batches(self, step: int, device: torch.device | str) -> list[TokenBatch]:
        """This process's micro-batches of optimizer step `step`."""
        rows_per_micro = self.micro_batch_size * self.world_size
        out = []
        for micro in range(self.grad_accum):
            start = (step * self.grad_accum + micro) * rows_per_micro + self.rank * self.micro_batch_size
            out.append(self.stream.rows(start, self.micro_batch_size).to(device))
        return out


def training_rows(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> list[SourceRows]:
    """Every training source tokenized and cut into rows (UserError naming data.train[i] on bad data)."""
    return source_rows(recipe, tokenizer, "train")


def source_rows(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, split: str) -> list[SourceRows | StreamRows]:
    """The rows of data.train or data.eval: memory-mapped from the tokenized store (built there
    once), or read from a stream (`streaming: true`; held-out streams: their first eval_tokens)."""
    data = recipe.data
    out: list[SourceRows | StreamRows] = []
    for i, s in enumerate(getattr(data, split)):
        key = f"data.{split}[{i}]"
        if not s.streaming:
            out.append(build_rows(s, key, tokenizer, data.seq_len, data.packing, store_dir(data), data.num_proc))
            continue
        stream = StreamRows(s, key, tokenizer, data.seq_len, data.packing, recipe.train.seed)
        out.append(stream.head(data.eval_tokens) if split == "eval" else stream)
    return out


def build_plan(recipe: Recipe, sources: list[SourceRows], world_size: int, rank: int) -> DataPlan:
    r = recipe.train
    global_rows = r.micro_batch_size * r.grad_accum * world_size
    total_steps = r.steps or steps_for_epochs(r.epochs, sum(len(s) for s in sources), global_rows)
    stream = MixedStream(sources, [s.weight for s in recipe.data.train], r.seed, total_steps * global_rows)
    return DataPlan(sources, stream, total_steps, r.micro_batch_size, r.grad_accum, world_size, rank)
