"""config.check(): one clear line per problem, naming the key, what was given and how to fix it."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from merge_distill.errors import UserError
from merge_distill.routing import (
    CERouterConfig,
    DomainRouterConfig,
    FixedRouterConfig,
    RouterConfig,
    UniformRouterConfig,
    build_router,
)

TEACHERS = ["code", "prose", "math"]


def test_fixed_count_mismatch_names_the_teachers_and_the_missing_one():
    problems = FixedRouterConfig(weights={"code": 1, "prose": 1}).check(TEACHERS, [])
    assert problems == [
        "routing.weights has 2 entries but 3 teachers are listed (code, prose, math); add a weight for: math"
    ]


def test_fixed_unknown_teacher():
    problems = FixedRouterConfig(weights={"code": 1, "bogus": 1}).check(["code", "prose"], [])
    assert "routing.weights.bogus is not a teacher; teachers are: code, prose" in problems
    assert any("no entry for teacher(s) prose" in p for p in problems)


def test_fixed_negative_and_all_zero():
    negative = FixedRouterConfig(weights={"code": -0.5, "prose": 1, "math": 1}).check(TEACHERS, [])
    assert negative == ["routing.weights.code is -0.5; weights must be >= 0 (use 0 to switch a teacher off)"]
    zeros = FixedRouterConfig(weights={"code": 0, "prose": 0, "math": 0}).check(TEACHERS, [])
    assert len(zeros) == 1 and "all 0; give at least one teacher a positive weight" in zeros[0]
    assert FixedRouterConfig(weights={"code": 0, "prose": 2, "math": 1}).check(TEACHERS, []) == []


def test_top_k_larger_than_teachers():
    problems = UniformRouterConfig(top_k=4).check(TEACHERS, [])
    assert problems == ["routing.top_k is 4 but only 3 teachers are listed; use a value from 1 to 3 or remove it"]


def test_domain_missing_domains_need_a_mapping_or_fallback():
    config = DomainRouterConfig(weights={"code": "code"})
    problems = config.check(TEACHERS, ["code", "prose", "legal"])
    assert len(problems) == 1
    assert "data domain(s) legal, prose" in problems[0]
    assert "add them under routing.weights or declare routing.fallback" in problems[0]
    with_fallback = config.model_copy(update={"fallback": "uniform"})
    assert with_fallback.check(TEACHERS, ["code", "prose", "legal"]) == []


def test_domain_bad_teachers_and_weights():
    config = DomainRouterConfig(
        weights={"code": "bogus", "prose": {"prose": -1.0, "math": 1.0}, "chat": {"code": 0, "math": 0}},
        fallback={"nobody": 1.0},
    )
    problems = config.check(TEACHERS, ["code", "prose", "chat"])
    assert "routing.weights.code is 'bogus', which is not a teacher; teachers are: code, prose, math" in problems
    assert any(p.startswith("routing.weights.prose.prose is -1.0; weights must be >= 0") for p in problems)
    assert any(p.startswith("routing.weights.chat are all 0") for p in problems)
    assert "routing.fallback.nobody is not a teacher; teachers are: code, prose, math" in problems
    assert len(problems) == 4


def test_build_router_raises_user_error_with_every_problem():
    with pytest.raises(UserError) as info:
        build_router(FixedRouterConfig(weights={"code": -1, "bogus": 1}, top_k=5), TEACHERS, 8)
    assert len(info.value.problems) == 4  # top_k, count, bogus, negative


def test_recipe_union_discriminates_on_kind_and_forbids_extras():
    adapter = TypeAdapter(RouterConfig)
    config = adapter.validate_python({"kind": "ce", "tau": 0, "granularity": "sequence"})
    assert isinstance(config, CERouterConfig) and config.tau == 0
    domain = adapter.validate_python({"kind": "domain", "weights": {"code": "code", "prose": {"prose": 1}}})
    assert isinstance(domain, DomainRouterConfig) and domain.weights["code"] == "code"
    with pytest.raises(ValidationError):
        adapter.validate_python({"kind": "ce", "temperature": 1.0})
    with pytest.raises(ValidationError):
        adapter.validate_python({"kind": "ce", "tau": -1})
    with pytest.raises(ValidationError):
        adapter.validate_python({"kind": "nope"})
