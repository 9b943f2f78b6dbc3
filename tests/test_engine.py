"""End-to-end runs on pico models: files written, reload gives the same logits, loss falls."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from e2e import run_and_check
from merge_distill import distributed as dist_mod
from merge_distill.engine import run, setup_run, train_step
from merge_distill.recipe import load_recipe


def test_two_teacher_run_writes_loadable_student(make_recipe, tmp_path):
    run_dir, rows = run_and_check(load_recipe(make_recipe(train={"steps": 3, "micro_batch_size": 2, "lr": 1e-3,
                                                                 "log_every": 1})))
    for name in ("recipe.yaml", "run.json", "metrics.jsonl", "stats.json", "report.json", "student/config.json",
                 "student/model.safetensors", "student/tokenizer.json", "student/README.md"):
        assert (run_dir / name).is_file(), name
    facts = json.loads((run_dir / "run.json").read_text())
    assert facts["steps_done"] == 3 and facts["world_size"] == 1
    assert [r["step"] for r in rows] == [1, 2, 3]
    card = (run_dir / "student" / "README.md").read_text()
    assert "code" in card and "prose" in card and "forward_kl" in card
    model = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    assert model.config.num_hidden_layers == 1


def test_saved_student_gives_same_logits(make_recipe):
    parts = setup_run(load_recipe(make_recipe()))
    for step in range(2):
        train_step(parts.training, parts.plan, step)
    out = parts.training.save_student(parts.run_dir / "student", parts.tokenizer)
    model = dist_mod.unwrap(parts.training.accelerator, parts.training.student).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, parts.training.vocab_size, (2, 16))
    with torch.no_grad():
        a, b = model(ids).logits, reloaded(ids).logits
    assert torch.equal(a, b)
    # and training changed the weights: the saved student is not the initial one
    initial = AutoModelForCausalLM.from_pretrained(parts.recipe.student.model).eval()
    with torch.no_grad():
        assert not torch.allclose(initial(ids).logits, b)


def test_loss_falls_on_fixed_batch(pico, make_recipe):
    data = {"seq_len": 32, "train": [{"type": "jsonl", "path": str(pico["code"]), "domain": "code", "max_examples": 1}]}
    recipe = load_recipe(make_recipe(data=data, train={"steps": 20, "micro_batch_size": 2, "lr": 1e-2,
                                                     "schedule": "constant", "seed": 0}))
    parts = setup_run(recipe)
    assert len(parts.plan.stream.sources[0]) <= 200
    batch_rows = parts.plan.stream.sources[0].take(slice(0, 2)).input_ids
    parts.plan.stream.rows = lambda start, count: _fixed(parts, batch_rows)  # the same batch every step
    losses = [train_step(parts.training, parts.plan, step).loss for step in range(20)]
    assert losses[-1] < 0.3 * losses[0], losses


def _fixed(parts, rows):
    from merge_distill.signals import TokenBatch

    src = parts.plan.stream.sources[0]
    return TokenBatch(rows, torch.ones_like(rows), rows.clone(), [src.domain] * len(rows), [src.label] * len(rows))


def test_gradient_normalisation_is_independent_of_accumulation(make_recipe):
    """4 rows in one micro-batch == 2 micro-batches of 2 rows: same loss and same gradient."""
    results = []
    for micro, accum in ((4, 1), (2, 2)):
        recipe = load_recipe(make_recipe(train={"steps": 1, "micro_batch_size": micro, "grad_accum": accum,
                                                "lr": 1e-2, "seed": 3, "max_grad_norm": None}))
        parts = setup_run(recipe, overwrite=True)
        grads = []
        inner = getattr(parts.training.optimizer, "optimizer", parts.training.optimizer)
        inner.register_step_pre_hook(lambda opt, args, kwargs: grads.append(
            torch.cat([p.grad.flatten() for g in opt.param_groups for p in g["params"]]).clone()))
        loss = train_step(parts.training, parts.plan, 0).loss
        assert len(grads) == 1, "exactly one optimizer step per train step"
        results.append((loss, grads[0]))
    assert abs(results[0][0] - results[1][0]) < 1e-6
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)


def test_eval_perplexity_is_token_weighted_and_feeds_the_report(pico, make_recipe, tmp_path, monkeypatch, capsys):
    """eval.json: per-domain perplexity equals exp(mean NLL) from a plain forward + cross_entropy."""
    import math
    import sys

    from merge_distill.cli import main

    evals = [{"type": "jsonl", "path": str(pico["code"]), "domain": "code", "max_examples": 3},
             {"type": "jsonl", "path": str(pico["prose"]), "domain": "prose", "max_examples": 3}]
    data = {"seq_len": 32, "train": evals, "eval": evals, "eval_tokens": 200}
    run_dir = run(load_recipe(make_recipe(data=data)))
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["domains"] == ["code", "prose"]
    assert [r["model"] for r in result["rows"]] == ["student", "code", "prose"]
    # reference: plain transformers forward over the same rows
    from merge_distill.evaluate import eval_rows
    from merge_distill.signals import shift_targets

    recipe = load_recipe(run_dir / "recipe.yaml")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir / "student")
    rows = eval_rows(recipe, tok)
    model = AutoModelForCausalLM.from_pretrained(pico["teacher_a"]).eval()
    ids, labels, mask = rows["code"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[..., : len(tok)]
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), shift_targets(labels).flatten(), ignore_index=-100)
    code_teacher = next(r for r in result["rows"] if r["model"] == "code")
    assert math.isclose(code_teacher["ppl"]["code"], math.exp(nll.item()), rel_tol=1e-4)
    assert code_teacher["tokens"]["code"] >= 200
    report = json.loads((run_dir / "report.json").read_text())
    assert report["eval"]["rows"][0]["model"] == "student"
    # the CLI command gives the same figures
    monkeypatch.setattr(sys, "argv", ["merge-distill", "eval", str(run_dir), "--json"])
    capsys.readouterr()
    main()
    printed = json.loads(capsys.readouterr().out)
    assert math.isclose(printed["rows"][1]["ppl"]["code"], code_teacher["ppl"]["code"], rel_tol=1e-9)


def test_student_from_teacher_layers_copies_chosen_layers(make_recipe, pico):
    recipe = load_recipe(make_recipe(student={"from_teacher": {"teacher": "code", "layers": [1]}}))
    parts = setup_run(recipe)
    student = dist_mod.unwrap(parts.training.accelerator, parts.training.student)
    teacher = AutoModelForCausalLM.from_pretrained(pico["teacher_a"])
    assert student.config.num_hidden_layers == 1
    s_state, t_state = student.state_dict(), teacher.state_dict()
    for key, value in s_state.items():
        source = key.replace("layers.0.", "layers.1.")
        assert torch.equal(value, t_state[source]), key
    result = train_step(parts.training, parts.plan, 0)
    assert result.loss > 0 and not result.skipped
    # the teachers were not modified by building the student from one of them
    assert torch.equal(parts.training.source.models[0].model.layers[1].mlp.up_proj.weight,
                       t_state["model.layers.1.mlp.up_proj.weight"])
