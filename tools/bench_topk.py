"""Exact top-k of log-probs rows: torch.topk against two exact alternatives, per vocabulary size.

The cross-tokenizer step spends most of its extra time in each teacher's top-k
(docs/CROSS_TOKENIZER.md). This compares, on 1024 rows of random log-probs, one thread, best of 3:
- `torch.topk`, what merge_distill uses;
- threshold: the smallest of k block maxima bounds the k-th largest value from below; the values
  above it (a few percent) are compacted with `nonzero` and topped;
- blocks: the top-k elements lie in the k blocks with the largest maxima (a block outside them
  would have k larger elements above its own maximum), so only those blocks are topped.
Each alternative is checked to give the same values as `torch.topk`.

    python tools/bench_topk.py [--k 64] [--vocabs 4096 49152 151936] [--block 64]
"""

from __future__ import annotations

import argparse
import time

import torch


def threshold_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    c, V = x.shape
    b = V // k
    tau = x[:, : k * b].reshape(c, k, b).amax(-1).amin(-1, keepdim=True)  # <= the k-th largest value
    mask = x >= tau
    counts = mask.sum(-1)
    rows, cols = mask.nonzero(as_tuple=True)
    slot = torch.arange(rows.numel()) - (torch.cumsum(counts, 0) - counts)[rows]
    values = torch.full((c, int(counts.max())), float("-inf"))
    ids = torch.zeros(values.shape, dtype=torch.long)
    values[rows, slot], ids[rows, slot] = x[rows, cols], cols
    top, where = values.topk(k, -1)
    return top, ids.gather(-1, where)


def block_topk(x: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    c, V = x.shape
    n = -(-V // block)
    if n * block != V:
        x = torch.nn.functional.pad(x, (0, n * block - V), value=float("-inf"))
    blocks = x.view(c, n, block)
    chosen = blocks.amax(-1).topk(k, -1, sorted=False).indices  # [c, k]
    members = blocks.gather(1, chosen.unsqueeze(-1).expand(c, k, block)).view(c, k * block)
    top, where = members.topk(k, -1)
    return top, chosen.gather(1, where // block) * block + where % block


def best_ms(fn, x: torch.Tensor) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1000)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[4096, 49152, 151936])
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--rows", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"| V | torch.topk ms | threshold ms | blocks of {args.block} ms | same values |")
    print("|---:|---:|---:|---:|---|")
    for V in args.vocabs:
        x = torch.log_softmax(3.0 * torch.randn(args.rows, V), dim=-1)
        ref = x.topk(args.k, -1).values
        same = all(torch.equal(ref, f(x)[0]) for f in (lambda y: threshold_topk(y, args.k),
                                                        lambda y: block_topk(y, args.k, args.block)))
        times = [best_ms(lambda y: y.topk(args.k, -1), x), best_ms(lambda y: threshold_topk(y, args.k), x),
                 best_ms(lambda y: block_topk(y, args.k, args.block), x)]
        print(f"| {V:,} | " + " | ".join(f"{t:.1f}" for t in times) + f" | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
