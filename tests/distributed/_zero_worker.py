"""One process of tests/distributed/test_zero.py (launched with torchrun, 2 processes, gloo on CPU).

    python -m torch.distributed.run --nproc_per_node 2 _zero_worker.py MODELS_DIR OUT_DIR STAGE MODE

MODELS_DIR holds teacher_a, teacher_b and student (tiny Llama, save_pretrained). Teacher A is
loaded plainly then partitioned by prepare_teacher; teacher B is partitioned while loading
(teacher_init_context). Each rank writes OUT_DIR/rank{r}.json with what it measured; rank 0
also writes the plain single-process reference training and the gathered student state dict.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from merge_distill import distributed as d

VOCAB, SEQ, MICRO, ACCUM, STEPS, LR, MAX_NORM = 96, 12, 2, 2, 3, 0.5, 0.05


def lr_lambda(step: int) -> float:
    return 1.0 - 0.25 * step  # changes every optimizer step: catches a scheduler stepped too often


def micro_batch(step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, targets [MICRO, SEQ]; the number of valid targets differs per rank and micro-batch."""
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    ids = torch.randint(0, VOCAB, (MICRO, SEQ), generator=g)
    targets = torch.cat([ids[:, 1:], torch.full((MICRO, 1), -100)], dim=1)
    targets[:, : 1 + (step + micro + 3 * rank) % 5] = -100
    return ids, targets


def loss_sum(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                             ignore_index=-100, reduction="sum")


def window_tokens(step: int, world: int) -> int:
    return sum(int((micro_batch(step, m, r)[1] != -100).sum()) for m in range(ACCUM) for r in range(world))


def reference_training(student_dir: Path, world: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The same optimisation in one plain process: every rank's micro-batches, one window per step."""
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    norms = []
    for step in range(STEPS):
        n = window_tokens(step, world)
        for m in range(ACCUM):
            for r in range(world):
                (loss_sum(model, *micro_batch(step, m, r)) / n).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        opt.step()
        sched.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, norms


def partition_stats(engine: torch.nn.Module) -> dict[str, int]:
    """Elements this rank holds of a ZeRO-3 module: its partitions, and whole persisted tensors."""
    params = list(engine.module.parameters())
    return {
        "full": sum(p.ds_numel for p in params),
        "partition": sum(p.ds_tensor.numel() for p in params),
        "persisted_full": sum(p.ds_numel for p in params if p.ds_persist),
        "gathered_now": sum(p.data.numel() for p in params if not p.ds_persist),
    }


def main() -> None:
    models, out_dir, stage, mode = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    dist = d.DistributedConfig(use_deepspeed=mode, student_zero_stage=stage if mode != "never" else 0,
                               zero3_param_persistence_threshold=64)
    acc = d.make_accelerator(dist, "fp32", ACCUM, MAX_NORM, MICRO)
    info = d.world_info()
    rank, world = info["rank"], info["world_size"]
    report: dict = {"world": info, "deepspeed": d.uses_deepspeed(acc),
                    "sum_of_ranks_plus_one": d.all_reduce_sum(acc, torch.tensor([rank + 1.0])).item()}

    # Teachers: A loaded whole then partitioned; B partitioned while loading.
    teacher_a = d.prepare_teacher(acc, dist, AutoModelForCausalLM.from_pretrained(models / "teacher_a"))
    with d.teacher_init_context(acc, dist, torch.float32):
        loaded_b = AutoModelForCausalLM.from_pretrained(models / "teacher_b", dtype=torch.float32)
    report["b_partitioned_at_load"] = hasattr(next(loaded_b.parameters()), "ds_id")
    teacher_b = d.prepare_teacher(acc, dist, loaded_b)
    report["teacher_grad"] = any(p.requires_grad for p in d.unwrap(acc, teacher_a).parameters())
    teachers = {"a": teacher_a, "b": teacher_b}
    if report["deepspeed"]:
        report["partition"] = {k: partition_stats(t) for k, t in teachers.items()}
    g = torch.Generator().manual_seed(7 + rank)  # each rank its own rows, as in training
    ids = torch.randint(0, VOCAB, (3, SEQ), generator=g)
    report["logit_max_abs_diff"] = {}
    for name, teacher in teachers.items():
        reference = AutoModelForCausalLM.from_pretrained(models / f"teacher_{name}").eval()
        with torch.no_grad():
            want = reference(input_ids=ids).logits
            under_no_grad = teacher(input_ids=ids).logits
        outs = []
        for _ in range(2):  # repeated forwards re-gather released partitions
            with torch.inference_mode():
                outs.append(teacher(input_ids=ids).logits)
        report["logit_max_abs_diff"][name] = max(float((o - want).abs().max()) for o in [under_no_grad, *outs])
    if report["deepspeed"]:
        report["partition_after_forward"] = {k: partition_stats(t) for k, t in teachers.items()}

    # Student: a few accumulation windows through the shared loop.
    with d.student_init_context(acc, dist):
        student = AutoModelForCausalLM.from_pretrained(models / "student", dtype=torch.float32)
    opt = torch.optim.SGD(student.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    student, opt, sched = d.prepare_student(acc, dist, student, opt, sched)
    initial = d.gather_student_state_dict(acc, student)
    report["student_type"] = type(student).__name__
    report["grad_norms"], report["lrs"] = [], []
    for step in range(STEPS):
        n_global = d.all_reduce_sum(acc, torch.tensor(float(sum(
            int((micro_batch(step, m, rank)[1] != -100).sum()) for m in range(ACCUM))))).item()
        for m in range(ACCUM):
            with acc.accumulate(student):
                with torch.inference_mode():
                    for teacher in teachers.values():  # every rank calls every teacher
                        teacher(input_ids=micro_batch(step, m, rank)[0])
                loss = loss_sum(student, *micro_batch(step, m, rank)) * world * ACCUM / n_global
                acc.backward(loss)
                if acc.sync_gradients:
                    norm = acc.clip_grad_norm_(student.parameters(), MAX_NORM)  # None: DeepSpeed stage 0 fp32
                    report["grad_norms"].append(None if norm is None else float(norm))
                opt.step()
                sched.step()
                opt.zero_grad()
        report["lrs"].append(sched.get_last_lr()[0])
    final = d.gather_student_state_dict(acc, student)
    report["gathered_is_none"] = final is None
    if rank == 0:
        plain = AutoModelForCausalLM.from_pretrained(models / "student", dtype=torch.float32).state_dict()
        reference, report["reference_grad_norms"] = reference_training(models / "student", world)
        report["missing"] = sorted(set(plain) - set(final))
        report["unexpected"] = sorted(set(final) - set(plain))
        report["shape_mismatch"] = [k for k in plain if k in final and final[k].shape != plain[k].shape]
        report["initial_max_abs_diff"] = max(float((initial[k] - plain[k]).abs().max()) for k in plain)
        report["trained_max_abs_diff"] = max(float((final[k] - reference[k]).abs().max()) for k in reference)
        report["trained_moved"] = max(float((final[k] - plain[k]).abs().max()) for k in plain)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
