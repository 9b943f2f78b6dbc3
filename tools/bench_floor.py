"""The no-framework floor for tools/bench.py: the same work as a merge_distill step, by hand.

K frozen teachers' forwards, a uniform per-token mixture of their distributions (in log space;
with one teacher, its own), forward KL(mixture || student) with torch's fused kl_div averaged
over the target tokens, backward, AdamW step. Nothing else: no routing signals, no
statistics, no checks, no chunking, no logging. Written to be fast, not frugal: all K teachers'
log-probs [K, B, T, V] are held at once.

--chunk-tokens N gives the chunked floor, the fair one at K >= 2: the same step, but the mixture
is built N positions at a time from the teachers' logits (a plain loop), so only one [B, T, V]
target is held instead of K teachers' log-probs stacked. merge_distill's blend is memory-flat in K
for the same reason; against the unchunked floor that algorithm difference would look like
"framework overhead".

    python tools/bench_floor.py --teachers DIR [DIR ...] --student DIR --rows rows.pt \
        --batch 8 --warmup 2 --steps 8 [--device cpu|cuda] [--threads 1] [--chunk-tokens 1024] [--precision bf16]

--precision bf16 does what the engine's train.precision bf16 does: teachers in bfloat16, the student
in float32 under autocast to bfloat16 (the loss itself in float32).

Prints one JSON line: tokens_per_s (over the timed steps), peak_bytes, last_loss.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from bench import peak_bytes  # tools/ (this script's folder) is on sys.path
from transformers import AutoModelForCausalLM


def mixture(teachers: list[torch.nn.Module], input_ids: torch.Tensor, attention_mask: torch.Tensor,
            vocab_size: int, chunk_tokens: int) -> torch.Tensor:
    """The uniform mixture in log space, log sum_k (1/K) p_k, per token [B, T, V]. Unchunked: every
    teacher's log-probs at once [K, B, T, V]; chunked: chunk_tokens positions at a time."""
    logits = [t(input_ids=input_ids, attention_mask=attention_mask).logits[..., :vocab_size] for t in teachers]
    if not chunk_tokens:
        logprobs = [torch.log_softmax(x.float(), dim=-1) for x in logits]
        del logits
        return logprobs[0] if len(teachers) == 1 else torch.logsumexp(torch.stack(logprobs), dim=0) - math.log(len(teachers))
    flat = [x.reshape(-1, vocab_size) for x in logits]
    target = torch.empty(flat[0].shape, dtype=torch.float32, device=input_ids.device)
    for start in range(0, target.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        parts = torch.stack([torch.log_softmax(x[rows].float(), dim=-1) for x in flat])
        target[rows] = parts[0] if len(flat) == 1 else torch.logsumexp(parts, dim=0) - math.log(len(flat))
    return target.view(*input_ids.shape, vocab_size)


def floor_step(teachers: list[torch.nn.Module], student: torch.nn.Module, optimizer: torch.optim.Optimizer,
               input_ids: torch.Tensor, vocab_size: int, chunk_tokens: int = 0, bf16: bool = False) -> torch.Tensor:
    """One optimizer step on input_ids [B, T]; position t predicts token t + 1 (the last has no target)."""
    attention_mask = torch.ones_like(input_ids)  # what the framework passes for packed rows
    with torch.no_grad():
        target = mixture(teachers, input_ids, attention_mask, vocab_size, chunk_tokens)
    with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        student_logits = student(input_ids=input_ids, attention_mask=attention_mask).logits[..., :vocab_size]
    student_logprobs = torch.log_softmax(student_logits.float(), dim=-1)
    # Forward KL(target || student), fused by torch, summed over the B * (T - 1) target positions.
    kl = F.kl_div(student_logprobs[:, :-1], target[:, :-1], reduction="sum", log_target=True)
    loss = kl / (input_ids.shape[0] * (input_ids.shape[1] - 1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()  # read once at the end: no per-step device sync


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", nargs="+", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--rows", required=True, help="a torch file holding input_ids [N, T]")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--chunk-tokens", type=int, default=0, help="build the mixture this many positions at a time "
                        "(0: all teachers' log-probs at once)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    teacher_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    teachers = [AutoModelForCausalLM.from_pretrained(d, dtype=teacher_dtype).to(device).eval().requires_grad_(False)
                for d in args.teachers]
    student = AutoModelForCausalLM.from_pretrained(args.student).to(device).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    rows = torch.load(args.rows)
    loss, start = torch.tensor(math.nan), 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        batch = rows[torch.arange(step * args.batch, (step + 1) * args.batch) % len(rows)].to(device)
        loss = floor_step(teachers, student, optimizer, batch, args.vocab_size, args.chunk_tokens, args.precision == "bf16")
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(json.dumps({"tokens_per_s": args.steps * args.batch * rows.shape[1] / seconds, "peak_bytes": peak_bytes(args.device),
                      "last_loss": float(loss)}))


if __name__ == "__main__":
    main()
