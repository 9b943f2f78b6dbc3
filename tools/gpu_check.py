"""A short GPU proof of the distributed layer: two ZeRO-3 teachers in bf16 and a student, trained
for a few steps through merge_distill.distributed's functions. One process per call; run by
tools/gpu_check.sh once with `--mode never` (plain) and once with `--mode always` (DeepSpeed).

    python3 tools/gpu_check.py --mode always --student-stage 3

Prints the device, dtypes, ZeRO stages, what each process holds of each teacher, the loss and
time of every step, peak GPU memory, and checks that the gathered student state dict reloads
into a fresh model (strict) with the same logits. Exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from merge_distill import distributed as d

VOCAB, SEQ = 32000, 512
SIZES = {"full": [(1024, 12), (768, 16), (512, 4)], "tiny": [(128, 2), (128, 3), (128, 1)]}


def llama(hidden: int, layers: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                       num_hidden_layers=layers, num_attention_heads=hidden // 64,
                       num_key_value_heads=hidden // 128, max_position_embeddings=SEQ)


def kl_to_mixture_sum(student_logits: torch.Tensor, teacher_logits: list[torch.Tensor],
                      mask: torch.Tensor) -> torch.Tensor:
    """sum over valid tokens of KL(p_mix || p_student), p_mix = mean_k softmax(teacher_k).
    Computed in float32 log space: log p_mix = logsumexp_k(log p_k) - log K."""
    log_teachers = torch.stack([F.log_softmax(t.float(), dim=-1) for t in teacher_logits])  # [K, B, T, V]
    log_mix = torch.logsumexp(log_teachers, dim=0) - torch.log(torch.tensor(float(len(teacher_logits))))
    log_student = F.log_softmax(student_logits.float(), dim=-1)  # [B, T, V]
    kl = (log_mix.exp() * (log_mix - log_student)).sum(-1)  # [B, T]
    return (kl * mask).sum()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["never", "always"], default="always")
    p.add_argument("--student-stage", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="small models, CPU allowed: a dry run of the script")
    args = p.parse_args()
    global VOCAB, SEQ
    if args.tiny:
        VOCAB, SEQ = 512, 64
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device (use --tiny for a CPU dry run)")
    cuda = torch.cuda.is_available()
    t_sizes, s_size = SIZES["tiny" if args.tiny else "full"][:2], SIZES["tiny" if args.tiny else "full"][2]
    dist = d.DistributedConfig(use_deepspeed=args.mode, teacher_zero_stage=3,
                               student_zero_stage=args.student_stage if args.mode == "always" else 0)
    acc = d.make_accelerator(dist, "bf16", args.accum, 1.0, args.micro)
    dev = torch.cuda.get_device_name(acc.device) if cuda else "cpu"
    import accelerate
    import transformers

    ds_version = "-"
    if d.uses_deepspeed(acc):
        import deepspeed

        ds_version = deepspeed.__version__
    print(f"== mode={args.mode} device={dev} torch={torch.__version__} deepspeed={ds_version} "
          f"accelerate={accelerate.__version__} transformers={transformers.__version__} world={d.world_info()}")
    print(f"   distributed_type={acc.distributed_type} teacher_zero_stage={dist.teacher_zero_stage} "
          f"student_zero_stage={dist.student_zero_stage} (DeepSpeed: {d.uses_deepspeed(acc)})")

    teachers = []
    for k, (hidden, layers) in enumerate(t_sizes):
        torch.manual_seed(10 + k)
        with d.teacher_init_context(acc, dist, torch.bfloat16):
            model = AutoModelForCausalLM.from_config(llama(hidden, layers), dtype=torch.bfloat16)
        teacher = d.prepare_teacher(acc, dist, model)
        held, total = d.held_parameter_bytes(teacher)
        dtype = next(d.unwrap(acc, teacher).parameters()).dtype
        print(f"   teacher {k}: {type(teacher).__name__} dtype={dtype} held {held / 2**20:.1f} MiB "
              f"of {total / 2**20:.1f} MiB ({held / total:.3f})")
        teachers.append(teacher)

    torch.manual_seed(0)
    with d.student_init_context(acc, dist):
        student = AutoModelForCausalLM.from_config(llama(*s_size), dtype=torch.float32)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    student, opt, sched = d.prepare_student(acc, dist, student, opt, sched)
    print(f"   student: {type(student).__name__} "
          f"param dtype={next(d.unwrap(acc, student).parameters()).dtype}")

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        batches = [torch.randint(0, VOCAB, (args.micro, SEQ), generator=g).to(acc.device) for _ in range(args.accum)]
        mask = torch.ones(args.micro, SEQ, device=acc.device)
        n_global = d.all_reduce_sum(acc, torch.tensor(float(mask.sum() * args.accum))).item()
        step_loss = 0.0
        for ids in batches:
            with acc.accumulate(student):
                with torch.inference_mode():
                    teacher_logits = [t(input_ids=ids).logits for t in teachers]
                teacher_logits = [t.clone() for t in teacher_logits]  # inference tensors -> normal
                loss_sum = kl_to_mixture_sum(student(input_ids=ids).logits, teacher_logits, mask)
                acc.backward(loss_sum * acc.num_processes * args.accum / n_global)
                norm = acc.clip_grad_norm_(student.parameters(), 1.0) if acc.sync_gradients else None
                opt.step()
                sched.step()
                opt.zero_grad()
                step_loss += float(loss_sum.detach()) / n_global
        if cuda:
            torch.cuda.synchronize()
        loss = d.all_reduce_sum(acc, torch.tensor(step_loss)).item()
        losses.append(loss)
        print(f"   step {step + 1}: loss {loss:.4f} grad_norm {None if norm is None else round(float(norm), 4)} "
              f"{time.perf_counter() - t0:.2f} s")
        if loss != loss or loss == float("inf"):
            sys.exit("non-finite loss")
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    print(f"   peak GPU memory allocated: {peak:.2f} GiB")

    state = d.gather_student_state_dict(acc, student)
    if acc.is_main_process:
        n_tensors = len(state)  # count now: save_pretrained consumes the dict it is given
        fresh = AutoModelForCausalLM.from_config(llama(*s_size), dtype=torch.float32)
        missing, unexpected = fresh.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        with tempfile.TemporaryDirectory() as tmp:
            d.unwrap(acc, student).save_pretrained(tmp, state_dict=state)
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(acc.device)
        ids = batches[0][:1]
        with torch.inference_mode():
            diff = (reloaded(input_ids=ids).logits - fresh.to(acc.device)(input_ids=ids).logits).abs().max().item()
        print(f"   gathered student state dict: {n_tensors} tensors, missing={list(missing)} "
              f"unexpected={list(unexpected)}, saved+reloaded logit diff {diff:.2e}")
        if missing or unexpected or diff > 1e-3:
            sys.exit("student state dict incomplete")
    print("RESULT " + json.dumps({"mode": args.mode, "student_stage": dist.student_zero_stage, "losses": losses,
                                  "peak_gib": round(peak, 3), "device": dev}))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
