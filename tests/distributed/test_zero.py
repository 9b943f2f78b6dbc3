"""The distributed layer on CPU: ZeRO-3 teachers and a ZeRO 0-3 student over gloo, 2 processes.

The launch tests run tests/distributed/_zero_worker.py under a real launcher and check what
each rank measured: half of every teacher's weights per rank, teacher logits equal to the
unsharded model's, and a student trained through the shared loop (accumulate / backward /
clip / step) equal to a plain one-process reference trained on all ranks' data, gathered
complete on rank 0. The first run JIT-compiles DeepSpeed's shared-memory comm op into
~/.cache/torch_extensions (30 s to 3 min on 2 cores), later runs reuse it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from merge_distill import distributed as d

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_zero_worker.py")


# ---------------------------------------------------------------- config and commands (in-process)


def test_check_reports_each_conflict_with_its_key(tmp_path: Path) -> None:
    assert d.DistributedConfig().check() == []
    problems = d.DistributedConfig(student_zero_stage=0, offload_optimizer=True,
                                   teacher_zero_stage=0, offload_teacher_params=True).check()
    assert [p.split(" ")[0] for p in problems] == ["distributed.offload_optimizer", "distributed.offload_teacher_params"]
    assert "never" in d.DistributedConfig(use_deepspeed="never", student_zero_stage=2).check()[0]
    assert "not found" in d.DistributedConfig(deepspeed_config=tmp_path / "nope.json").check()[0]
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"optimizer": {"type": "Adam"}, "zero_optimization": {"stage": 3}}))
    problems = d.DistributedConfig(deepspeed_config=user, student_zero_stage=2).check()
    assert len(problems) == 2 and "'optimizer'" in problems[0] and "stage 3" in problems[1]
    with pytest.raises(pydantic.ValidationError):
        d.DistributedConfig(bogus=1)


def test_student_config_carries_the_recipe_numbers_and_json_wins(tmp_path: Path) -> None:
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123}, "gradient_clipping": 0.5}))
    dist = d.DistributedConfig(student_zero_stage=3, offload_optimizer=True, deepspeed_config=user)
    cfg = d.student_deepspeed_config(dist, "bf16", grad_accum=4, max_grad_norm=1.0, micro_batch_size=2, world_size=8)
    assert cfg["train_batch_size"] == 2 * 4 * 8 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu" and zero["reduce_bucket_size"] == 123
    assert cfg["gradient_clipping"] == 0.5  # the user's JSON is merged over ours
    assert d.student_deepspeed_config(d.DistributedConfig(), "fp32", 1, None, 1, 1)["gradient_clipping"] == 0.0


def test_teacher_config_follows_the_teacher_dtype() -> None:
    dist = d.DistributedConfig(offload_teacher_params=True, zero3_param_persistence_threshold=7)
    cfg = d.teacher_deepspeed_config(dist, torch.bfloat16, micro_batch_size=3)
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 7
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    cfg32 = d.teacher_deepspeed_config(d.DistributedConfig(), torch.float32, 3)
    assert not cfg32["bf16"]["enabled"] and not cfg32["fp16"]["enabled"]
    assert "optimizer" not in cfg32


def test_launch_commands() -> None:
    cmd = d.build_launch_command(["run", "r.yaml"], 8, 2, master_addr="node0", node_rank=1, master_port=1234)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "16" and cmd[cmd.index("--machine_rank") + 1] == "1"
    assert "--multi_gpu" in cmd and cmd[-4:] == ["-m", "merge_distill.cli", "run", "r.yaml"]
    tr = d.build_launch_command(["run", "r.yaml", "--overwrite"], 4, launcher="torchrun")
    assert tr[tr.index("--nproc_per_node") + 1] == "4" and tr[-2:] == ["r.yaml", "--overwrite"]
    ds = d.build_launch_command(["run", "r.yaml"], 8, 2, hostfile=Path("hosts"), launcher="deepspeed")
    assert ds[ds.index("--hostfile") + 1] == "hosts" and ds[ds.index("--num_nodes") + 1] == "2"
    assert ds[-4:] == ["--module", "merge_distill.cli", "run", "r.yaml"]
    assert "--multi_gpu" not in d.build_launch_command(["run", "r.yaml"], 1)
    with pytest.raises(ValueError, match="hostfile"):
        d.build_launch_command(["run", "r.yaml"], 8, 2, launcher="deepspeed")
    env = {k: v for k, v in os.environ.items() if k != "MASTER_ADDR"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "environ", env)
        with pytest.raises(ValueError, match="master_addr"):
            d.build_launch_command(["run", "r.yaml"], 8, 2, launcher="torchrun")


def test_world_info_from_launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"WORLD_SIZE": "16", "RANK": "9", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("NNODES", raising=False)
    monkeypatch.delenv("SLURM_NNODES", raising=False)
    if not torch.distributed.is_initialized():
        assert d.world_info() == {"world_size": 16, "rank": 9, "local_rank": 1, "num_nodes": 2}
    assert d.deepspeed_wanted(d.DistributedConfig()) is True
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert d.deepspeed_wanted(d.DistributedConfig()) is False
    assert d.deepspeed_wanted(d.DistributedConfig(use_deepspeed="always")) is True


def test_plain_single_process_contract() -> None:
    """No DeepSpeed, one process: stock Accelerator, frozen teacher, one LR step per window,
    a gathered state dict that is a copy with tied weights still tied."""
    dist = d.DistributedConfig()
    d.make_accelerator(dist, "bf16", 1, 1.0, 1)
    acc = d.make_accelerator(dist, "fp32", 2, 1.0, 1)  # a second run in one process may change precision
    assert acc.distributed_type.value == "NO" and acc.mixed_precision == "no" and acc.gradient_accumulation_steps == 2
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    teacher = d.prepare_teacher(acc, dist, LlamaForCausalLM(cfg).train())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    student = LlamaForCausalLM(cfg)
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    student, opt, sched = d.prepare_student(acc, dist, student, opt, sched)
    ids = torch.randint(0, 64, (2, 8))
    for _ in range(4):  # two windows of two micro-batches
        with acc.accumulate(student):
            acc.backward(student(input_ids=ids, labels=ids).loss)
            opt.step()
            sched.step()
            opt.zero_grad()
    assert sched.get_last_lr() == [0.25]
    state = d.gather_student_state_dict(acc, student)
    live = d.unwrap(acc, student).state_dict()
    assert set(state) == set(live) and all(torch.equal(state[k], live[k]) for k in live)
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]
    assert state["lm_head.weight"].data_ptr() != live["lm_head.weight"].data_ptr()
    assert d.all_reduce_sum(acc, torch.tensor([2.0])).item() == 2.0
    assert d.held_parameter_bytes(teacher)[0] == sum(p.numel() * 4 for p in teacher.parameters())


# ---------------------------------------------------------------- real launches


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny teachers of different depth and a student with tied embeddings."""
    root = tmp_path_factory.mktemp("zero_models")
    for name, seed, layers in [("teacher_a", 1, 2), ("teacher_b", 2, 3), ("student", 3, 1)]:
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=name == "student")
        LlamaForCausalLM(cfg).save_pretrained(root / name)
    return root


def launch(models: Path, out: Path, nproc: int, stage: int, mode: str, launcher: d.Launcher) -> list[dict]:
    out.mkdir()
    args = [str(WORKER), str(models), str(out), str(stage), mode]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false",
           # the venv's ninja first, whatever the caller's PATH: two ninja versions alternating
           # on one ~/.cache/torch_extensions rebuild DeepSpeed's JIT op every time (~2 min)
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    # The free port is found by binding and releasing it, so another process can take it before
    # the launcher binds: only that failure is retried, once, on a new port.
    for _attempt in range(2):
        if nproc == 1:
            cmd = [sys.executable, *args]  # no launcher: make_accelerator fakes a one-process group
        else:
            prefix = d.launcher_prefix(nproc, launcher=launcher, master_port=d._free_port())
            cmd = prefix + ["--module", "tests.distributed._zero_worker"] if launcher == "deepspeed" else prefix
            cmd = cmd + (args[1:] if launcher == "deepspeed" else args)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode == 0 or "address already in use" not in (proc.stdout + proc.stderr).lower():
            break
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def check_ranks(reports: list[dict], nproc: int, deepspeed: bool) -> None:
    for rank, rep in enumerate(reports):
        assert rep["world"]["world_size"] == nproc and rep["world"]["rank"] == rank
        assert rep["deepspeed"] is deepspeed
        assert rep["sum_of_ranks_plus_one"] == nproc * (nproc + 1) / 2
        assert rep["teacher_grad"] is False
        for name, diff in rep["logit_max_abs_diff"].items():
            assert diff < 1e-5, f"rank {rank} teacher {name}: sharded logits differ by {diff}"
        assert rep["lrs"] == pytest.approx([0.375, 0.25, 0.125])  # one scheduler step per window
        assert rep["gathered_is_none"] is (rank != 0)
        if deepspeed:
            assert rep["b_partitioned_at_load"] is True
            for when in ("partition", "partition_after_forward"):
                for name, st in rep[when].items():
                    # each rank keeps 1/nproc of every tensor; small persisted ones (norms) also whole
                    assert st["partition"] / st["full"] == pytest.approx(1 / nproc, abs=0.01), (when, name, st)
                    assert st["persisted_full"] / st["full"] < 0.02
                    assert st["gathered_now"] == 0  # nothing left gathered after a forward
    norms = [rep["grad_norms"] for rep in reports]
    assert all(n == norms[0] for n in norms)
    main = reports[0]
    assert main["missing"] == [] and main["unexpected"] == [] and main["shape_mismatch"] == []
    assert main["initial_max_abs_diff"] == 0.0
    assert main["trained_moved"] > 1e-3  # training changed the weights ...
    assert main["trained_max_abs_diff"] < 1e-6  # ... exactly as the one-process reference did
    if None not in main["grad_norms"]:
        assert main["grad_norms"] == pytest.approx(main["reference_grad_norms"], rel=1e-5)


@pytest.mark.parametrize("stage", [3, 2])
def test_two_process_zero(models_dir: Path, tmp_path: Path, stage: int) -> None:
    check_ranks(launch(models_dir, tmp_path / "out", 2, stage, "always", "torchrun"), 2, deepspeed=True)


@pytest.mark.slow
@pytest.mark.parametrize(("nproc", "stage", "mode", "launcher"), [
    (2, 1, "always", "deepspeed"),  # stages 0/1 take accelerate's engine.no_sync path
    (2, 0, "auto", "accelerate"),   # auto + 2 processes = DeepSpeed; DeepSpeed reports no norm at stage 0
    (2, 0, "never", "torchrun"),    # plain DDP over gloo
    (1, 3, "always", "torchrun"),   # one process without a launcher
])
def test_other_stages_and_launchers(models_dir: Path, tmp_path: Path, nproc: int, stage: int, mode: str,
                                    launcher: d.Launcher) -> None:
    reports = launch(models_dir, tmp_path / "out", nproc, stage, mode, launcher)
    check_ranks(reports, nproc, deepspeed=mode != "never")


def test_launch_runs_cache_and_eval_too(make_recipe, monkeypatch, capsys) -> None:
    from conftest import run_cli

    path = make_recipe(cache={"dir": "cache", "k": 8})
    commands = {}
    for command in ("run", "cache", "eval"):
        code, text = run_cli(["launch", str(path), "--nproc", "2", "--command", command, "--dry-run"], monkeypatch, capsys)
        assert code == 0, text
        commands[command] = text.replace("\n", " ").split("-m merge_distill.cli ")[1].split()
    assert commands["run"] == ["run", str(path)]
    assert commands["cache"] == ["cache", str(path)]
    assert commands["eval"] == ["eval", str(path.parent / "run"), "--recipe", str(path)]
    code, text = run_cli(["launch", str(path), "--nproc", "2", "--command", "train", "--dry-run"], monkeypatch, capsys)
    assert code == 2 and "--command: 'train' is not one of run, cache, eval" in text
