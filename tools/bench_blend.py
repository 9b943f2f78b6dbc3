"""Peak extra memory and time of the chunked blended-teacher loss vs a naive dense one.

For each K, each implementation runs forward + backward in a fresh subprocess. "Extra memory"
is what the loss needs beyond its inputs: on CPU, peak RSS (getrusage ru_maxrss) minus the RSS
measured right after the student and K teacher logits were created; on CUDA,
torch.cuda.max_memory_allocated() minus memory_allocated() at that point. Both include the
student logits' gradient [B, T, V], which any implementation must produce.

The CPU workers run with MALLOC_MMAP_THRESHOLD_=65536: every allocation above 64 KiB then gets
its own mapping and is returned to the OS when freed. Without it glibc raises its mmap threshold
to 32 MiB after the first free and serves chunk-sized tensors from its heap, where freed memory
is kept, so RSS would measure allocator fragmentation rather than live tensors.

    python tools/bench_blend.py            # B=4, T=1024, V=49152, K in {1, 2, 4}
    python tools/bench_blend.py --small    # a quick run: T=256, V=8192, chunk_tokens=256
                                           # (4 chunks, as at full size)
    python tools/bench_blend.py --device cuda
    python tools/bench_blend.py --head 896 --batch 1 --seq 4096 --vocab 151936 --ks 3 --teacher-dtype bfloat16
                                           # the loss phase from the student's hidden states: the
                                           # current path (lm_head -> [B, T, V] logits -> distill_loss)
                                           # against the fused, logit-free one (losses/fused.py)

With --head H the student side starts from final hidden states [B, T, H] and an lm_head [V, H]
(the inputs), and every implementation's measured phase ends with the gradients of both: the
current path pays for the logits [B, T, V] and their gradient, the fused one never builds them.
The teachers' logits are inputs in both: this bench measures the student side only.

Two more implementations take the teachers as hidden states [B, T, H] and a head [V, H] too (K = 1
only for liger):
- `fused_heads`: the fused driver with `HeadLogits` teachers: no [B, T, V] tensor on either side;
- `liger`: Liger-Kernel's `LigerFusedLinearJSD` at jsd_beta = 0 (forward KL, the same loss), if
  `liger-kernel` imports and the device is CUDA (its kernels are Triton); otherwise the row says
  why it is missing.

    python tools/bench_blend.py --device cuda --head 896 --batch 1 --seq 4096 --vocab 151936 --ks 1 \
        --teacher-dtype bfloat16 --impls ours,fused,fused_heads,liger
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merge_distill.losses import distill_loss  # noqa: E402
from merge_distill.losses.forward_kl import ForwardKLConfig, forward_kl  # noqa: E402
from merge_distill.losses.fused import HeadLogits, fused_distill_loss  # noqa: E402

try:  # optional: Liger-Kernel's fused linear JSD (Triton, CUDA only)
    from liger_kernel.transformers import LigerFusedLinearJSD
except Exception as exc:  # noqa: BLE001 -- any import failure means "not available here"
    LigerFusedLinearJSD, LIGER_MISSING = None, f"{type(exc).__name__}: {exc}"
else:
    LIGER_MISSING = ""
HEAD_TEACHERS = ("fused_heads", "liger")  # implementations whose teachers are hidden states + a head

MIB = 2**20


def naive_loss(student: torch.Tensor, teachers: list[torch.Tensor], weights: torch.Tensor,
               targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """What a straightforward implementation does: all K teacher distributions in float32 at
    once [K, B, T, V], mixture in probability space, forward KL, masked sum."""
    probs = torch.stack([torch.softmax(t.float() / temperature, dim=-1) for t in teachers])
    target = (weights.permute(2, 0, 1).unsqueeze(-1) * probs).sum(0)  # [B, T, V]
    student_logprobs = torch.log_softmax(student.float() / temperature, dim=-1)
    kl = (torch.xlogy(target, target) - target * student_logprobs).sum(-1)  # [B, T]
    return (kl * (targets != -100)).sum() * temperature**2


def make_inputs(args: argparse.Namespace, k: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=args.device).manual_seed(0)
    shape = (args.batch, args.seq, args.vocab)
    dtype = getattr(torch, args.teacher_dtype)
    # randn writes straight into the final tensors: no transient copies before the baseline.
    if args.head:  # the student as its final hidden states and lm_head: (hidden [B, T, H], weight [V, H])
        student = (torch.randn(args.batch, args.seq, args.head, generator=gen, device=args.device).requires_grad_(),
                   torch.randn(args.vocab, args.head, generator=gen, device=args.device).mul_(0.05).requires_grad_())
    else:
        student = torch.randn(shape, generator=gen, device=args.device).requires_grad_()
    if args.impl in HEAD_TEACHERS:  # each teacher as (hidden [B, T, H], head [V, H]), logits about as spread
        teachers = [(torch.randn(args.batch, args.seq, args.head, generator=gen, device=args.device, dtype=dtype),
                     torch.randn(args.vocab, args.head, generator=gen, device=args.device, dtype=dtype).mul_(0.07))
                    for _ in range(k)]
    else:
        teachers = [torch.randn(shape, generator=gen, device=args.device, dtype=dtype).mul_(2.0) for _ in range(k)]
    weights = torch.softmax(torch.randn(args.batch, args.seq, k, generator=gen, device=args.device), dim=-1)
    targets = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen, device=args.device)
    targets[:, -1] = -100  # the last position of each row has no next token
    weights[targets == -100] = 0.0
    return student, teachers, weights, targets


def run_loss(args: argparse.Namespace, student: torch.Tensor, teachers: list[torch.Tensor],
             weights: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Forward + backward of the chosen implementation; returns the (detached) loss."""
    if args.impl == "liger":  # sum over positions with a target, as the others (Liger averages over them)
        hidden, weight = student
        (t_hidden, t_weight), = teachers
        n = int((targets != -100).sum())
        loss = LigerFusedLinearJSD(jsd_beta=0.0, temperature=args.temperature)(
            hidden.reshape(-1, args.head), weight, t_hidden.reshape(-1, args.head), t_weight, targets.reshape(-1)) * n
        loss.backward()
        return loss.detach()
    if args.impl == "fused_heads":
        teachers = [HeadLogits(h, w, w.shape[0], None, args.chunk_tokens) for h, w in teachers]
    if args.impl in ("fused", "fused_heads"):
        hidden, weight = student
        out = fused_distill_loss(hidden, weight, teachers, weights, targets, forward_kl,
                                 ForwardKLConfig(temperature=args.temperature), blend="mixture",
                                 chunk_tokens=args.chunk_tokens, compute_ce=False)
        out.divergence_sum.backward()
        return out.divergence_sum.detach()
    if args.head:
        hidden, weight = student
        student = hidden @ weight.T  # the current path: the lm_head's [B, T, V] logits, inside the measured phase
    if args.impl == "ours":
        out = distill_loss(student, teachers, weights, targets, forward_kl, ForwardKLConfig(temperature=args.temperature),
                           blend="mixture", chunk_tokens=args.chunk_tokens, compute_ce=False)
        loss = out.divergence_sum
    else:
        loss = naive_loss(student, teachers, weights, targets, args.temperature)
    loss.backward()
    return loss.detach()


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    # Warm-up on tiny inputs: the first call of each kernel pages in library code and sets up
    # thread pools, which would otherwise show up as "extra" RSS and time of the measured run.
    tiny = argparse.Namespace(**{**vars(args), "batch": 1, "seq": 16, "vocab": 64, "chunk_tokens": 5})
    run_loss(args, *make_inputs(tiny, args.k))
    gc.collect()
    student, teachers, weights, targets = make_inputs(args, args.k)
    gc.collect()
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    loss = run_loss(args, student, teachers, weights, targets)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if cuda:
        extra = torch.cuda.max_memory_allocated() - baseline
    else:
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline  # ru_maxrss is KiB
    for tensor in student if args.head else [student]:
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()
    print(json.dumps({"extra_mib": extra / MIB, "seconds": seconds, "loss": loss.item()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="quick run: T=256, V=8192, chunk_tokens=256")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--ks", default="1,2,4", help="comma-separated teacher counts")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=None, help="default 1024 (256 with --small)")
    parser.add_argument("--vocab", type=int, default=None, help="default 49152 (8192 with --small)")
    parser.add_argument("--chunk-tokens", type=int, default=None, help="default 1024 (256 with --small)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--teacher-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per run")
    parser.add_argument("--head", type=int, default=0,
                        help="hidden size H: start from hidden states and an lm_head, and add the fused driver")
    parser.add_argument("--impls", default=None, help="comma-separated: ours, naive, fused, fused_heads, liger "
                        "(default: ours,naive; with --head: ours,fused)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["ours", "naive", "fused", *HEAD_TEACHERS], help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.seq = args.seq or (256 if args.small else 1024)
    args.vocab = args.vocab or (8192 if args.small else 49152)
    args.chunk_tokens = args.chunk_tokens or (256 if args.small else 1024)
    if args.worker:
        worker(args)
        return

    forwarded = [f"--{name}={value}" for name, value in [
        ("device", args.device), ("batch", args.batch), ("seq", args.seq), ("vocab", args.vocab),
        ("chunk-tokens", args.chunk_tokens), ("temperature", args.temperature),
        ("teacher-dtype", args.teacher_dtype), ("threads", args.threads), ("head", args.head)]]
    impls = (args.impls or ("ours,fused" if args.head else "ours,naive")).split(",")
    if {"fused", *HEAD_TEACHERS} & set(impls) and not args.head:
        sys.exit("--impls fused, fused_heads and liger need --head H (they start from hidden states)")
    results: dict[tuple[int, str], dict[str, float]] = {}
    for k in [int(x) for x in args.ks.split(",")]:
        for impl in impls:
            missing = liger_missing(args, k) if impl == "liger" else ""
            if missing:
                print(f"liger at K = {k}: not measured ({missing})")
                continue
            cmd = [sys.executable, __file__, "--worker", f"--impl={impl}", f"--k={k}", *forwarded]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0 and impl == "liger":  # a third-party kernel: report it, keep the other rows
                print(f"liger at K = {k}: failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            if done.returncode != 0:
                sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr}")
            results[(k, impl)] = json.loads(done.stdout.strip().splitlines()[-1])

    logits_mib = args.batch * args.seq * args.vocab * 4 / MIB
    if "naive" not in impls:
        print_head_table(args, impls, results, logits_mib)
        return
    print(f"B={args.batch} T={args.seq} V={args.vocab} device={args.device} teachers={args.teacher_dtype} "
          f"chunk_tokens={args.chunk_tokens}; one [B, T, V] float32 tensor = {logits_mib:.0f} MiB")
    print("| K | ours extra MiB | naive extra MiB | ours / naive | ours s | naive s | rel. loss diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k in sorted({k for k, _ in results}):
        ours, naive = results[(k, "ours")], results[(k, "naive")]
        rel = abs(ours["loss"] - naive["loss"]) / abs(naive["loss"])
        print(f"| {k} | {ours['extra_mib']:.0f} | {naive['extra_mib']:.0f} | {ours['extra_mib'] / naive['extra_mib']:.2f} "
              f"| {ours['seconds']:.2f} | {naive['seconds']:.2f} | {rel:.1e} |")
    ks = sorted({k for k, _ in results})
    k_min, k_max = ks[0], ks[-1]
    growth = results[(k_max, "ours")]["extra_mib"] / results[(k_min, "ours")]["extra_mib"]
    ratio = results[(k_max, "ours")]["extra_mib"] / results[(k_max, "naive")]["extra_mib"]
    worst = max(abs(results[(k, "ours")]["loss"] - results[(k, "naive")]["loss"]) / abs(results[(k, "naive")]["loss"]) for k in ks)
    print(f"ours K={k_max} / ours K={k_min}: {growth:.2f} (target <= 1.3) {'ok' if growth <= 1.3 else 'MISSED'}")
    print(f"ours K={k_max} / naive K={k_max}: {ratio:.2f} (target <= 0.5) {'ok' if ratio <= 0.5 else 'MISSED'}")
    print(f"max relative loss difference: {worst:.1e} (target <= 1e-5) {'ok' if worst <= 1e-5 else 'MISSED'}")


def liger_missing(args: argparse.Namespace, k: int) -> str:
    """Why the liger row cannot run here ("" when it can)."""
    if LigerFusedLinearJSD is None:
        return f"liger-kernel does not import: {LIGER_MISSING}"
    if args.device != "cuda":
        return "its kernels are Triton: CUDA only"
    return "" if k == 1 else "it takes one teacher"


def print_head_table(args: argparse.Namespace, impls: list[str], results: dict, logits_mib: float) -> None:
    """The loss phase from hidden states: every implementation's extra memory, time and loss, and
    each against the current path ("ours")."""
    print(f"loss phase from hidden states: B={args.batch} T={args.seq} H={args.head} V={args.vocab} "
          f"device={args.device} teachers={args.teacher_dtype} chunk_tokens={args.chunk_tokens}; "
          f"one [B, T, V] float32 tensor = {logits_mib:.0f} MiB")
    logit_impls = [i for i in impls if i not in HEAD_TEACHERS]
    if {"ours", "fused"} <= set(logit_impls):
        print("| K | " + " | ".join(f"{i} extra MiB | {i} s" for i in logit_impls) + " | fused / ours memory | "
              "fused / ours time | rel. loss diff |")
        print("|---|" + "---:|---:|" * len(logit_impls) + "---:|---:|---:|")
        for k in sorted({k for k, i in results if i in logit_impls}):
            cells = " | ".join(f"{results[(k, i)]['extra_mib']:.0f} | {results[(k, i)]['seconds']:.2f}" for i in logit_impls)
            ours, fused = results[(k, "ours")], results[(k, "fused")]
            rel = abs(fused["loss"] - ours["loss"]) / abs(ours["loss"])
            print(f"| {k} | {cells} | {fused['extra_mib'] / ours['extra_mib']:.2f} | "
                  f"{fused['seconds'] / ours['seconds']:.2f} | {rel:.1e} |")
    head_rows = [(k, i) for k, i in sorted(results) if i in HEAD_TEACHERS]
    if head_rows:
        print("teachers as hidden states + head (their logits made inside the measured phase):")
        print("| K | implementation | extra MiB | seconds | loss | memory / fused_heads | time / fused_heads |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for k, impl in head_rows:
            r, base = results[(k, impl)], results.get((k, "fused_heads"))
            ratios = f"{r['extra_mib'] / base['extra_mib']:.2f} | {r['seconds'] / base['seconds']:.2f}" if base else "- | -"
            print(f"| {k} | {impl} | {r['extra_mib']:.0f} | {r['seconds']:.2f} | {r['loss']:.6g} | {ratios} |")

if __name__ == "__main__":
    main()
