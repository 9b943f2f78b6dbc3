"""Processes, devices and DeepSpeed: the only module that knows how the models are placed.

Two regimes, chosen once by `make_accelerator` from the recipe's `distributed:` section:

- Plain (one process, or `use_deepspeed: never`): a stock `Accelerator`; the student is
  wrapped in DDP when there are several processes; every teacher sits whole on the device.
- DeepSpeed (`use_deepspeed: always`, or `auto` with WORLD_SIZE > 1): the student goes through
  accelerate's DeepSpeed plugin (ZeRO stage 0-3, so `acc.backward`, `acc.accumulate` and
  `acc.clip_grad_norm_` keep their meaning); each teacher becomes its own inference-only
  DeepSpeed engine built with `deepspeed.initialize` (no optimizer): under ZeRO-3 every process
  keeps 1/N of each teacher's weights and all-gathers one layer at a time during the forward.

Teachers bypass accelerate because an engine prepared by `accelerator.prepare` would join
`save_state` and could become the `backward` target (docs/DISTRIBUTED.md has the design and
the loop contract). Every process must call every teacher's and the student's forward the same
number of times: under ZeRO-3 a forward is a collective (parameter all-gather).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.scheduler import AcceleratedScheduler
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from torch import Tensor
from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

from merge_distill.schema import Recipe
from merge_distill.schema.distributed import DistributedConfig, read_json

Precision = Literal["fp32", "bf16", "fp16"]
_MIXED = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def _merge(base: dict, over: dict) -> dict:
    """Recursive dict merge; `over` wins on leaves."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------- who am I


def world_info() -> dict[str, int]:
    """{"world_size", "rank", "local_rank", "num_nodes"} from torch.distributed or the launcher's env."""
    env = os.environ
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    else:
        world, rank = int(env.get("WORLD_SIZE", 1)), int(env.get("RANK", 0))
    local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world)))
    nodes = env.get("NNODES") or env.get("SLURM_NNODES") or str(max(1, -(-world // max(local_world, 1))))
    return {"world_size": world, "rank": rank, "local_rank": int(env.get("LOCAL_RANK", 0)), "num_nodes": int(nodes)}


def deepspeed_wanted(dist: DistributedConfig) -> bool:
    """Whether this launch runs under DeepSpeed (decided from the config and WORLD_SIZE)."""
    if dist.use_deepspeed == "auto":
        return int(os.environ.get("WORLD_SIZE", 1)) > 1
    return dist.use_deepspeed == "always"


def is_collective_failure(exc: BaseException) -> bool:
    """A collective that failed because another process died, hung past the timeout or was lost
    (gloo and NCCL raise RuntimeError subclasses with these words), in a launch of several processes."""
    words = ("gloo", "NCCL", "Connection reset", "Connection closed", "timed out", "Timed out", "Broken pipe")
    return (int(os.environ.get("WORLD_SIZE", "1")) > 1 and isinstance(exc, RuntimeError)
            and any(w in str(exc) for w in words))


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """DeepSpeed needs a process group even alone; fake a one-process launch if none was made."""
    if "LOCAL_RANK" in os.environ:
        return
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    for k, v in defaults.items():
        os.environ.setdefault(k, v)


# ---------------------------------------------------------------- DeepSpeed configs


def _zero3_extras(dist: DistributedConfig) -> dict[str, Any]:
    return {"stage3_param_persistence_threshold": dist.zero3_param_persistence_threshold}


def student_deepspeed_config(dist: DistributedConfig, precision: Precision, grad_accum: int,
                             max_grad_norm: float | None, micro_batch_size: int, world_size: int) -> dict:
    """The student's DeepSpeed config: the recipe's numbers, then `dist.deepspeed_config` over it."""
    zero: dict[str, Any] = {"stage": dist.student_zero_stage}
    if dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if dist.student_zero_stage == 3:
        zero.update(_zero3_extras(dist))
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": float(max_grad_norm or 0.0),  # 0 = no clipping in DeepSpeed
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # fp16 needs loss scaling; DeepSpeed's dynamic scaler skips steps that overflow.
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    return _merge(cfg, read_json(dist.deepspeed_config)) if dist.deepspeed_config else cfg


def teacher_deepspeed_config(dist: DistributedConfig, dtype: torch.dtype, micro_batch_size: int) -> dict:
    """An inference-only ZeRO-3 config. Half precision follows the teacher's own dtype, so
    DeepSpeed never recasts a teacher that the recipe loaded in float32 (or vice versa)."""
    zero: dict[str, Any] = {"stage": 3, **_zero3_extras(dist)}
    if dist.offload_teacher_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    return _merge(cfg, read_json(dist.teacher_deepspeed_config)) if dist.teacher_deepspeed_config else cfg


# ---------------------------------------------------------------- accelerator and models


def make_accelerator(dist: DistributedConfig, precision: Precision, grad_accum: int,
                     max_grad_norm: float | None, micro_batch_size: int, log_with: list[str] | None = None,
                     project_dir: str | None = None) -> Accelerator:
    """The run's Accelerator. Plain (no DeepSpeed) costs nothing over `Accelerator(...)`.
    log_with / project_dir: accelerate's experiment trackers and where they write (trackers.py)."""
    trackers = {"log_with": log_with or None, "project_dir": project_dir,
                "kwargs_handlers": [InitProcessGroupKwargs(timeout=timedelta(seconds=dist.collective_timeout_s))]}
    if not deepspeed_wanted(dist):
        # `accelerate launch --use_deepspeed` exports this; it would make Accelerator() build a
        # default DeepSpeed plugin behind our back.
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "false"
        if not torch.distributed.is_initialized():
            _reset_accelerate_state()  # a second run in the same process may change precision
        return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=_MIXED[precision],
                           gradient_accumulation_steps=grad_accum, **trackers)
    _single_process_env()
    if AcceleratorState._shared_state:
        # A later phase in the same process (cache or evaluation after training): accelerate
        # refuses a second set of DeepSpeed plugins, so the state is rebuilt on the same process group.
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    cfg = student_deepspeed_config(dist, precision, grad_accum, max_grad_norm, micro_batch_size,
                                   int(os.environ["WORLD_SIZE"]))
    plugin = DeepSpeedPlugin(hf_ds_config=cfg, zero3_init_flag=False)
    acc = Accelerator(mixed_precision=_MIXED[precision], gradient_accumulation_steps=grad_accum,
                      deepspeed_plugins={"student": plugin}, **trackers)
    # Selecting a plugin registers its config with transformers, which would then build every
    # model (teachers too) inside zero.Init. Loading stays plain; the *_init_context managers
    # below opt in explicitly.
    _unset_hf_deepspeed_config()
    _fix_cpu_world(acc)
    return acc


def accelerator_for(recipe: Recipe) -> Accelerator:
    """An Accelerator placed as the recipe's training would be, for the phases that only run
    teachers (`merge-distill cache`, `merge-distill eval`): same DeepSpeed decision, same precision."""
    r = recipe.train
    return make_accelerator(recipe.distributed, r.precision, 1, None, r.micro_batch_size)


def _fix_cpu_world(acc: Accelerator) -> None:
    """accelerate knows DeepSpeed only on accelerators: on CPU it records one process of rank 0
    on every rank (so is_main_process is True everywhere). DeepSpeed itself runs over gloo
    correctly; copy the true world from torch.distributed into accelerate's shared state."""
    if acc.device.type != "cpu" or not torch.distributed.is_initialized():
        return
    true_world = {"num_processes": torch.distributed.get_world_size(),
                  "process_index": torch.distributed.get_rank(),
                  "local_process_index": int(os.environ.get("LOCAL_RANK", 0))}
    PartialState._shared_state.update(true_world)
    AcceleratorState._shared_state.update(true_world)


def _reset_accelerate_state() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _unset_hf_deepspeed_config() -> None:
    unset_hf_deepspeed_config()


@contextlib.contextmanager
def _zero_init(config: dict) -> Iterator[None]:
    keep_alive = HfDeepSpeedConfig(config)  # transformers holds only a weakref to it
    try:
        yield
    finally:
        del keep_alive
        _unset_hf_deepspeed_config()


@contextlib.contextmanager
def teacher_init_context(accelerator: Accelerator, dist: DistributedConfig, dtype: torch.dtype) -> Iterator[None]:
    """Enter around a teacher's `from_pretrained(..., dtype=dtype)`: under DeepSpeed with
    teacher_zero_stage 3 the weights are partitioned as they load (zero.Init), so no process
    ever holds a whole teacher. Elsewhere a no-op."""
    if not (uses_deepspeed(accelerator) and dist.teacher_zero_stage == 3):
        yield
        return
    micro = accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"]
    with _zero_init(teacher_deepspeed_config(dist, dtype, micro)):
        yield


@contextlib.contextmanager
def student_init_context(accelerator: Accelerator, dist: DistributedConfig) -> Iterator[None]:
    """Enter around the student's load: partitioned at load under student ZeRO-3, else a no-op."""
    if not (uses_deepspeed(accelerator) and dist.student_zero_stage == 3):
        yield
        return
    with _zero_init(accelerator.state.deepspeed_plugin.deepspeed_config):
        yield


def prepare_student(accelerator: Accelerator, dist: DistributedConfig, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any) -> tuple[Any, Any, AcceleratedScheduler]:
    """Wrap the student (DDP or a DeepSpeed engine), its optimizer and its LR scheduler.

    The scheduler steps once per optimizer step (one accumulation window over all processes),
    so build it with the number of optimizer steps. Under DeepSpeed the optimizer step happens
    inside `accelerator.backward` at the window's last micro-batch; `optimizer.step()` and
    `zero_grad()` are then no-ops kept for the shared loop.
    """
    model, optimizer = accelerator.prepare(model, optimizer)
    # split_batches=True: one scheduler step per optimizer step. accelerate's default would
    # step it world_size times, assuming a schedule counted in single-process steps.
    wrapped = AcceleratedScheduler(scheduler, optimizer, step_with_optimizer=True, split_batches=True)
    accelerator._schedulers.append(wrapped)  # so save_state / load_state carry it
    return model, optimizer, wrapped


def prepare_teacher(accelerator: Accelerator, dist: DistributedConfig, model: torch.nn.Module) -> Any:
    """Frozen, eval-mode teacher: a ZeRO-3 inference engine under DeepSpeed (teacher_zero_stage 3),
    else the model moved whole to the device. Its dtype is kept as loaded."""
    model.requires_grad_(False)
    model.eval()
    if not any(True for _ in model.parameters()):  # a LoRA student's own base (models.LoraBase): placed with it
        return model
    if not (uses_deepspeed(accelerator) and dist.teacher_zero_stage == 3):
        return model.to(accelerator.device)
    import deepspeed  # noqa: PLC0415  heavy and optional until a teacher is sharded

    dtype = next(iter(model.parameters())).dtype
    micro = accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"]
    engine, *_ = deepspeed.initialize(model=model, config=teacher_deepspeed_config(dist, dtype, micro))
    engine.eval()
    return engine


def unwrap(accelerator: Accelerator, model: Any) -> Any:
    """The transformers model inside a DeepSpeed engine, DDP or compile wrapper."""
    inner = getattr(model, "module", None)
    if inner is not None and type(model).__name__ == "DeepSpeedEngine":
        return inner
    return accelerator.unwrap_model(model)


def gather_student_state_dict(accelerator: Accelerator, model: Any) -> dict[str, Tensor] | None:
    """The full state dict on CPU on rank 0, None on the other ranks. Collective under ZeRO-3:
    every process must call it. Under DeepSpeed with bf16/fp16 the weights are the engine's
    16-bit module weights (the float32 masters live in the optimizer)."""
    if getattr(model, "zero_optimization_partition_weights", lambda: False)():
        state = model._zero3_consolidated_16bit_state_dict()  # gathers one layer at a time onto rank 0
        return dict(state) if accelerator.is_main_process and state is not None else None
    if not accelerator.is_main_process:
        return None
    copies: dict[int, Tensor] = {}  # keep tied weights (embeddings / lm_head) tied in the copy
    out: dict[str, Tensor] = {}
    for name, t in unwrap(accelerator, model).state_dict().items():
        key = t.data_ptr()
        if key not in copies:
            copies[key] = t.detach().to("cpu", copy=True)
        out[name] = copies[key]
    return out


def held_parameter_bytes(model: Any) -> tuple[int, int]:
    """(bytes of parameters this process keeps, bytes of the whole model). Under ZeRO-3 a process
    keeps its partition of every tensor plus the small tensors left whole (persistent)."""
    params = list(getattr(model, "module", model).parameters())
    if params and hasattr(params[0], "ds_tensor"):
        held = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params)
        held += sum(p.ds_numel * p.element_size() for p in params if p.ds_persist)
        return held, sum(p.ds_numel * p.element_size() for p in params)
    total = sum(p.numel() * p.element_size() for p in params)
    return total, total


def all_reduce_sum(accelerator: Accelerator, t: Tensor) -> Tensor:
    """Sum of `t` over processes (a new tensor on the accelerator's device; `t` itself unchanged)."""
    t = t.to(accelerator.device)
    if accelerator.num_processes == 1:
        return t.clone()
    out = t.clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out


def global_sum(accelerator: Accelerator, value: float) -> float:
    """value summed over processes; alone, value itself (no device round trip on the step's path)."""
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    return float(all_reduce_sum(accelerator, t).item())


def global_max(accelerator: Accelerator, value: int) -> int:
    """The largest `value` over processes (e.g. how many forwards the busiest process runs)."""
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


# ---------------------------------------------------------------- launching


Launcher = Literal["accelerate", "deepspeed", "torchrun"]


def launcher_prefix(nproc: int, nnodes: int = 1, hostfile: Path | None = None,
                    launcher: Launcher = "accelerate", node_rank: int | None = None,
                    master_addr: str | None = None, master_port: int | None = None) -> list[str]:
    """The launcher part of a command: append a script path or a module option and its args.

    nproc is processes per node. Multi-node: the deepspeed launcher reaches every node itself
    from `hostfile`; accelerate and torchrun run once per node with its `node_rank` (default
    from NODE_RANK / SLURM_NODEID) and the first node's `master_addr` (default MASTER_ADDR).
    """
    env = os.environ
    port = str(master_port or env.get("MASTER_PORT", 29500))
    py = [sys.executable, "-m"]
    if launcher == "deepspeed":
        # --no_local_rank: the program reads LOCAL_RANK from the env; no `--local_rank=N` argument.
        cmd = py + ["deepspeed.launcher.runner", "--no_local_rank", "--num_gpus", str(nproc), "--master_port", port]
        if nnodes > 1 or hostfile is not None:
            if hostfile is None:
                raise ValueError("the deepspeed launcher needs a hostfile for more than one node")
            cmd += ["--hostfile", str(hostfile), "--num_nodes", str(nnodes)]
            cmd += ["--master_addr", master_addr] if master_addr else []
        return cmd
    rank = str(node_rank if node_rank is not None else env.get("NODE_RANK", env.get("SLURM_NODEID", 0)))
    addr = master_addr or env.get("MASTER_ADDR")
    if nnodes > 1 and not addr:
        raise ValueError(f"{launcher} on {nnodes} nodes needs master_addr (the first node's address) "
                         "or MASTER_ADDR in the environment")
    addr = addr or "127.0.0.1"
    if launcher == "torchrun":
        return py + ["torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", str(nnodes),
                     "--node_rank", rank, "--master_addr", addr, "--master_port", port]
    cmd = py + ["accelerate.commands.launch", "--num_processes", str(nproc * nnodes),
                "--num_machines", str(nnodes), "--machine_rank", rank,
                "--main_process_ip", addr, "--main_process_port", port]
    if nproc * nnodes > 1:
        cmd += ["--multi_gpu"]  # accelerate's name for "several processes"; also right on CPU
    return cmd


def build_launch_command(args: Sequence[str], nproc: int, nnodes: int = 1, hostfile: Path | None = None,
                         launcher: Launcher = "accelerate", *, node_rank: int | None = None,
                         master_addr: str | None = None, master_port: int | None = None) -> list[str]:
    """The argv that runs `merge-distill ARGS` (e.g. ["run", "r.yaml"]) on nproc processes per node."""
    prefix = launcher_prefix(nproc, nnodes, hostfile, launcher, node_rank, master_addr, master_port)
    module = ["--module", "merge_distill.cli"] if launcher == "deepspeed" else ["-m", "merge_distill.cli"]
    return prefix + module + [str(a) for a in args]
