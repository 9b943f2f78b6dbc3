"""Draw a Report in the terminal with rich: one run, or two runs side by side.

Every highlight has a text marker next to its colour (★ strongest routing share, ◆ best
teacher / lowest perplexity, ◀ A / B ▶ the better run), so the report reads the same with
--no-color and when piped into a log. All user strings (teacher, domain and run names) go in
as rich Text, never as markup, so a name like "[big]" prints as itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from rich.console import Console
from rich.panel import Panel
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from merge_distill.report.charts import (
    BEST, HIGHLIGHT, STRONGEST, best_keys, first_last_min, fmt_bytes, fmt_count, fmt_delta, fmt_duration,
    fmt_num, fmt_pct, legend, marked, print_matrix, sparkline, table, tail_mean,
)
from merge_distill.report.schema import Evaluation, Report, TeacherStats

NUM_COL = 9  # width of a number column in the curves grid
TAIL = 10  # "final" figures average the last TAIL logged steps


def _section(console: Console, title: str) -> None:
    console.print()
    console.print(Rule(Text(title, style="bold"), align="left"))


def _banner(report: Report) -> Panel | None:
    if report.complete:
        return None
    missing = ", ".join(report.missing) if report.missing else "nothing"
    text = Text(f"INCOMPLETE RUN (status: {report.status}, missing: {missing})", style="bold red")
    if report.curves.step:
        text.append(f"\nfigures cover the {len(report.curves.step)} logged steps only", style="red")
    return Panel(text, border_style="red", expand=False)


def render_report(report: Report, console: Console) -> None:
    """Print the whole report: banner, run facts, routing, teacher quality, agreement, curves, eval."""
    name = report.run.name if report.run else report.source_dir
    console.print(Rule(Text(f"merge_distill report: {name}", style="bold")))
    banner = _banner(report)
    if banner is not None:
        console.print(banner)
    for warning in report.warnings:
        console.print(Text(f"note: {warning}", style="yellow"))
    _facts(report, console)
    _routing(report, console)
    _alignment(report, console)
    _quality(report, console)
    _agreement(report, console)
    _curves(report, console)
    _on_policy(report, console)
    _evaluation(report, console)
    _samples(report, console)


def _facts(report: Report, console: Console) -> None:
    _section(console, "Run")
    run = report.run
    if run is None:
        console.print(Text(f"run.json is missing: run facts unavailable ({len(report.curves.step)} steps logged)"))
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    pct = f" ({100 * run.steps_done / run.steps_planned:.0f}%)" if run.steps_planned else ""
    throughput = run.tokens_seen / run.wall_time_s if run.wall_time_s > 0 else None
    rows = [
        ("recipe", f"{run.name}  sha256 {run.recipe_hash[:12]}" + (f"  ({run.recipe_path})" if run.recipe_path else "")),
        ("status", run.status),
        ("teachers", ", ".join(run.teachers)),
        ("method", f"router {run.router or '—'}, {run.blend or '—'} blend, loss {run.loss or '—'}"),
        ("steps", f"{run.steps_done} / {run.steps_planned}{pct}, skipped {run.skipped_steps}"),
        ("tokens seen", fmt_count(run.tokens_seen)),
        ("wall time", fmt_duration(run.wall_time_s)),
        ("tokens/s", f"{fmt_count(throughput)} (run mean, all processes)"),
        ("world size", str(run.world_size)),
        ("peak memory", f"{fmt_bytes(run.peak_memory_bytes)} per process" if run.peak_memory_bytes is not None else "not recorded"),
        ("student", run.student_dir or "—"),
        *([("trained", run.trained)] if run.trained else []),
        ("time", f"{run.started_at or '—'} → {run.finished_at or 'not finished'}"),
    ]
    for key, value in rows:
        grid.add_row(Text(key), Text(value))
    console.print(grid)


def _alignment(report: Report, console: Console) -> None:
    """Teachers with other tokenizers: per domain, the share of positions aligned and their bytes
    per token, beside the routing share (only when some teacher went through that path)."""
    routing = report.routing
    if routing is None or not any(s.bytes_per_token is not None for s in routing.overall.values()):
        return
    _section(console, "Alignment across tokenizers")
    rows = []
    for domain, d in [("all", None), *routing.per_domain.items()]:
        block = routing.overall if d is None else d.teachers
        cells = []
        for t in routing.teachers:
            s = block.get(t)
            if s is None:
                cells.append(Text("—"))
                continue
            width = f", {fmt_num(s.bytes_per_token, 3)} B/tok" if s.bytes_per_token is not None else ""
            cells.append(Text(f"{fmt_pct(s.aligned)} aligned{width}, share {fmt_pct(s.share)}"))
        rows.append((domain, [], cells))
    print_matrix(console, "domain", "teacher", "coverage", routing.teachers, rows)
    legend(console, "aligned: the student's target positions where the teacher's next token starts at the same byte; "
                    "B/tok: bytes per teacher token there; share: routing weight (0 where not aligned)")


def _routing(report: Report, console: Console) -> None:
    _section(console, "Routing share")
    routing = report.routing
    if routing is None:
        console.print(Text("stats.json is missing: no routing statistics (see the share curves below)"))
        return
    console.print(Text(f"{fmt_count(routing.tokens)} tokens routed; blend entropy {fmt_num(routing.blend_entropy)} nats"))
    overall = table("teacher", "share", "top-1", "")
    top = best_keys({t: s.share for t, s in routing.overall.items()}, lowest=False)
    for teacher in routing.teachers:
        s = routing.overall.get(teacher)
        if s is None:
            overall.add_row(Text(teacher), "—", "—", "")
            continue
        bar = "█" * round(20 * min(max(s.share, 0.0), 1.0)) if math.isfinite(s.share) else ""
        overall.add_row(Text(teacher), marked(fmt_pct(s.share), teacher in top, STRONGEST),
                        Text(fmt_pct(s.top_share)), Text(bar, no_wrap=True, overflow="crop"))
    console.print(overall)
    legend(console, f"share: mean routing weight; top-1: tokens where it had the largest weight; {STRONGEST} largest share")
    if not routing.per_domain:
        return
    console.print()
    rows = []
    for domain, d in routing.per_domain.items():
        shares = {t: d.teachers[t].share for t in routing.teachers if t in d.teachers}
        best = best_keys(shares, lowest=False)
        cells = [marked(fmt_pct(shares.get(t)), t in best, STRONGEST) for t in routing.teachers]
        rows.append((domain, [Text(fmt_count(d.tokens))], cells))
    print_matrix(console, "domain", "teacher", "share", routing.teachers, rows, extra_headers=("tokens",))
    legend(console, f"routing share of each teacher per domain; {STRONGEST} strongest teacher in the domain")


def _quality(report: Report, console: Console) -> None:
    routing = report.routing
    if routing is None:
        return
    _section(console, "Teacher quality (gold NLL / entropy, nats)")
    scopes = [("all", routing.overall)] + [(d, s.teachers) for d, s in routing.per_domain.items()]
    rows = []
    for scope, stats in scopes:
        best = best_keys({t: s.mean_nll for t, s in stats.items()}, lowest=True)
        cells = [
            marked(f"{fmt_num(stats[t].mean_nll)} / {fmt_num(stats[t].mean_entropy)}", t in best, BEST)
            if t in stats else Text("—")
            for t in routing.teachers
        ]
        rows.append((scope, [], cells))
    print_matrix(console, "domain", "teacher", "NLL / entropy", routing.teachers, rows, section_after=0)
    legend(console, f"cells: mean gold NLL / mean entropy; {BEST} lowest NLL: the best teacher for the domain")


def _agreement(report: Report, console: Console) -> None:
    routing = report.routing
    if routing is None or not routing.agreement:
        return
    _section(console, "Teacher agreement")
    pairs = table("pair", "top-1 agree", "JS (nats)")
    for pair in routing.agreement:
        pairs.add_row(Text(f"{pair.a} ~ {pair.b}"), Text(fmt_pct(pair.top1_agreement)), Text(fmt_num(pair.js)))
    console.print(pairs)
    legend(console, "top-1 agree: tokens where both predict the same argmax; JS: Jensen-Shannon divergence")


def _curves(report: Report, console: Console) -> None:
    _section(console, "Curves over steps")
    curves = report.curves
    if not curves.step:
        console.print(Text("metrics.jsonl is missing or empty: no curves"))
        return
    series: list[tuple[str, Sequence[float | None], Callable[[float | None], str]]] = [
        ("loss", curves.loss, fmt_num), ("divergence", curves.divergence, fmt_num), ("ce", curves.ce, fmt_num),
        ("tokens/s", curves.tokens_per_s, fmt_count),
    ]
    series = [s for s in series if any(v is not None for v in s[1])]
    shares = [(f"  {t}", v, fmt_pct) for t, v in curves.share.items() if any(x is not None for x in v)]
    kls = [(f"  {t} ", v, fmt_num) for t, v in curves.reverse_kl.items() if any(x is not None for x in v)]
    labels = [label for label, _, _ in series + shares + kls] + ["share"] + (["reverse KL on samples"] if kls else [])
    label_width = min(max(len(label) for label in labels), max(12, console.width // 3))
    # label + spark + 3 number columns, separated by single spaces (collapsed grid padding).
    n = len(curves.step)
    spark_width = min(max(console.width - label_width - 3 * NUM_COL - 5, 8), n)
    per_char = n / spark_width
    bad = any(v is not None and not math.isfinite(v) for _, values, _ in series for v in values)
    console.print(Text(f"steps {curves.step[0]}–{curves.step[-1]} ({n} logged), one character ≈ {per_char:.3g} "
                       f"step{'s' if per_char != 1 else ''}" + ("; × marks NaN/inf" if bad else "")))
    grid = Table.grid(padding=(0, 1), collapse_padding=True)
    grid.add_column(width=label_width, no_wrap=True, overflow="ellipsis")
    grid.add_column(width=spark_width, no_wrap=True, overflow="crop")
    for _ in range(3):
        grid.add_column(width=NUM_COL, justify="right", no_wrap=True, overflow="ellipsis")
    grid.add_row(Text(""), Text(""), Text("first", style="bold"), Text("last", style="bold"), Text("min", style="bold"))
    for i, (label, values, fmt) in enumerate(series + shares + kls):
        if shares and i == len(series):
            grid.add_row(Text("share"))  # heading of the per-teacher routing share rows
        if kls and i == len(series) + len(shares):
            grid.add_row(Text("reverse KL on samples"))  # on-policy: each teacher's KL(student || teacher)
        first, last, low = first_last_min(values)
        grid.add_row(Text(label), Text(sparkline(values, spark_width), style="cyan"),
                     Text(fmt(first)), Text(fmt(last)), Text(fmt(low)))
    console.print(grid)


def _evaluation(report: Report, console: Console) -> None:
    if report.eval is not None and report.eval.rows:
        render_eval_table(report.eval, console)


def render_eval_table(evaluation: Evaluation | dict, console: Console) -> None:
    """The evaluation section alone (`merge-distill eval`): eval.json content or its model."""
    if isinstance(evaluation, dict):
        evaluation = Evaluation.model_validate(evaluation)
    _section(console, "Evaluation (perplexity, lower is better)")
    students = [r for r in evaluation.rows if r.kind == "student"]
    teachers = [r for r in evaluation.rows if r.kind == "teacher"]
    rows = students + teachers
    gap = len(students) == 1 and teachers
    headers = [f"{r.model} (student)" if r.kind == "student" and "student" not in r.model else r.model for r in rows]
    matrix = []
    for domain in evaluation.domains:
        values = {i: r.ppl.get(domain) for i, r in enumerate(rows)}
        best = best_keys(values, lowest=True)
        cells = [marked(fmt_num(values[i]), i in best, BEST) for i in range(len(rows))]
        extras = []
        if gap:
            teacher_ppls = [t.ppl[domain] for t in teachers if domain in t.ppl and math.isfinite(t.ppl[domain])]
            student = students[0].ppl.get(domain)
            ok = student is not None and bool(teacher_ppls)
            extras.append(Text(fmt_delta(student - min(teacher_ppls) if ok else None)))
        matrix.append((domain, extras, cells))
    print_matrix(console, "domain", "model", "perplexity", headers, matrix,
                  extra_headers=("Δ best teacher",) if gap else ())
    legend(console, f"{BEST} lowest perplexity in the domain"
            + ("; Δ best teacher: student minus the best teacher's perplexity" if gap else "")
            + ("; — another tokenizer: compare in bits per byte" if any(not r.ppl for r in rows) else ""))
    if not any(r.bpb for r in rows):
        return
    matrix = []
    for domain in evaluation.domains:
        values = {i: r.bpb.get(domain) for i, r in enumerate(rows)}
        best = best_keys(values, lowest=True)
        matrix.append((domain, [], [marked(fmt_num(values[i]), i in best, BEST) for i in range(len(rows))]))
    print_matrix(console, "domain", "model", "bits per byte", headers, matrix)
    legend(console, f"{BEST} fewest bits per byte in the domain (each model on its own tokens of the same text)")


# --------------------------------------------------------------------------- comparison


def _compare_cells(a: float | None, b: float | None, fmt: Callable[[float | None], str],
                   better: str | None, delta_fmt: Callable[[float | None], str] = fmt_delta) -> list[Text]:
    """[A, B, Δ (B − A), better] cells; `better` is 'lower', 'higher' or None (no ranking)."""
    ok = a is not None and b is not None and math.isfinite(a) and math.isfinite(b)
    delta = b - a if ok else None
    winner = ""
    if ok and better and a != b:
        winner = "A" if (a < b) == (better == "lower") else "B"
    mark = {"A": "◀ A", "B": "B ▶", "": ""}[winner] if better else ""
    if ok and better and a == b:
        mark = "="
    return [Text(fmt(a), style=HIGHLIGHT if winner == "A" else ""), Text(fmt(b), style=HIGHLIGHT if winner == "B" else ""),
            Text(delta_fmt(delta)), Text(mark, style=HIGHLIGHT)]


def _share(stats: TeacherStats | None) -> float | None:
    return None if stats is None else stats.share


def _pp(x: float | None) -> str:
    """A share difference in percentage points."""
    return "—" if x is None else f"{100 * x:+.1f} pp"


def render_comparison(a: Report, b: Report, console: Console) -> None:
    """Two runs side by side: summary figures, routing shares, per-domain shares, eval perplexity.
    Δ is always B − A; the better run is named in the last column (◀ A / B ▶), arrows in the
    metric name say which direction is better (↓ lower, ↑ higher)."""
    console.print(Rule(Text("merge_distill comparison", style="bold")))
    for tag, r in (("A", a), ("B", b)):
        name = r.run.name if r.run else "(no run.json)"
        console.print(Text(f"{tag}: {name}  {r.source_dir}  [{r.status}]"))
    for tag, r in (("A", a), ("B", b)):
        if not r.complete:
            console.print(Text(f"{tag} is an INCOMPLETE RUN (status: {r.status}, missing: {', '.join(r.missing) or 'nothing'})",
                               style="bold red"))

    _section(console, "Summary")
    facts = table("metric", "A", "B", "Δ B−A", "better")

    def tokens_per_s(r: Report) -> float | None:
        if r.run is not None and r.run.wall_time_s > 0:
            return r.run.tokens_seen / r.run.wall_time_s
        logged = [v for v in r.curves.tokens_per_s if v is not None]
        return sum(logged) / len(logged) if logged else None

    def fact(r: Report, key: str) -> float | None:
        return None if r.run is None else getattr(r.run, key)

    summary = [
        ("steps done", fact(a, "steps_done"), fact(b, "steps_done"), fmt_count, None),
        ("tokens seen", fact(a, "tokens_seen"), fact(b, "tokens_seen"), fmt_count, None),
        (f"final loss ↓ (last {TAIL})", tail_mean(a.curves.loss, TAIL), tail_mean(b.curves.loss, TAIL), fmt_num, "lower"),
        ("final divergence ↓", tail_mean(a.curves.divergence, TAIL), tail_mean(b.curves.divergence, TAIL), fmt_num, "lower"),
        ("final ce ↓", tail_mean(a.curves.ce, TAIL), tail_mean(b.curves.ce, TAIL), fmt_num, "lower"),
        ("tokens/s ↑", tokens_per_s(a), tokens_per_s(b), fmt_count, "higher"),
        ("wall time", fact(a, "wall_time_s"), fact(b, "wall_time_s"), fmt_duration, None),
        ("peak memory ↓", fact(a, "peak_memory_bytes"), fact(b, "peak_memory_bytes"), fmt_bytes, "lower"),
    ]
    for label, va, vb, fmt, better in summary:
        delta_fmt = (lambda d, f=fmt: "—" if d is None else ("+" if d > 0 else "-" if d < 0 else "") + f(abs(d)))
        facts.add_row(Text(label), *_compare_cells(va, vb, fmt, better, delta_fmt))
    console.print(facts)

    if a.routing is None or b.routing is None:
        missing = " and ".join(t for t, r in (("A", a), ("B", b)) if r.routing is None)
        console.print(Text(f"routing statistics: stats.json missing in {missing}"))
    else:
        _section(console, "Routing share per teacher")
        teachers = list(dict.fromkeys(a.routing.teachers + b.routing.teachers))
        shares = table("teacher", "A", "B", "Δ B−A")
        for t in teachers:
            sa, sb = a.routing.overall.get(t), b.routing.overall.get(t)
            shares.add_row(Text(t), *_compare_cells(_share(sa), _share(sb), fmt_pct, None, _pp)[:3])
        console.print(shares)
        _section(console, "Routing share per domain")
        per_domain = table("domain · teacher", "A", "B", "Δ B−A")
        domains = list(dict.fromkeys(list(a.routing.per_domain) + list(b.routing.per_domain)))
        for i, d in enumerate(domains):
            da, db = a.routing.per_domain.get(d), b.routing.per_domain.get(d)
            for j, t in enumerate(teachers):
                sa = da.teachers.get(t) if da else None
                sb = db.teachers.get(t) if db else None
                per_domain.add_row(Text(f"{d} · {t}"), *_compare_cells(_share(sa), _share(sb), fmt_pct, None, _pp)[:3],
                                   end_section=(j == len(teachers) - 1 and i < len(domains) - 1))
        console.print(per_domain)

    _compare_eval(a, b, console)


def _compare_eval(a: Report, b: Report, console: Console) -> None:
    if a.eval is None or b.eval is None:
        if a.eval is not None or b.eval is not None:
            console.print(Text(f"evaluation: only {'A' if a.eval else 'B'} has eval.json"))
        return
    student_a = next((r for r in a.eval.rows if r.kind == "student"), None)
    student_b = next((r for r in b.eval.rows if r.kind == "student"), None)
    if student_a is None or student_b is None:
        return
    _section(console, "Student perplexity per domain (lower is better)")
    ppl = table("domain", "A", "B", "Δ B−A", "better")
    for d in dict.fromkeys(a.eval.domains + b.eval.domains):
        ppl.add_row(Text(d), *_compare_cells(student_a.ppl.get(d), student_b.ppl.get(d), fmt_num, "lower"))
    console.print(ppl)


def _samples(report: Report, console: Console) -> None:
    """A few answers from samples.jsonl, each graded by the teachers (only when the file exists)."""
    if not report.samples:
        return
    _section(console, "Samples")
    graders = list(report.samples[0].nll)
    table = Table(box=None, show_lines=False, padding=(0, 1))
    table.add_column("prompt", max_width=28, overflow="fold")
    table.add_column("model", no_wrap=True)
    table.add_column("answer", max_width=48, overflow="fold")
    for name in graders:
        table.add_column(f"NLL {name}", justify="right")
    for row in report.samples:
        table.add_row(Text(row.prompt), Text(row.model), Text(row.answer.strip() or "(empty)"),
                      *[Text("—" if row.nll.get(n) is None else f"{row.nll[n]:.3f}") for n in graders])
    console.print(table)
    console.print(Text("from samples.jsonl (merge-distill sample): the first prompts' answers; NLL: the teacher's mean "
                       "NLL per token of the answer, nats", style="dim"))


def _on_policy(report: Report, console: Console) -> None:
    """Runs with on-policy steps: how much was sampled, who was trusted on the samples, and the
    fixed prompts' greedy completions before and after training."""
    on = report.on_policy
    if on is None:
        return
    _section(console, "On-policy")
    console.print(Text(f"sampled tokens: {fmt_count(on.tokens)} of {fmt_count(on.target_tokens)} target tokens "
                       f"({fmt_pct(on.tokens / on.target_tokens if on.target_tokens else None)})"))
    table = Table(box=None, padding=(0, 1))
    table.add_column("teacher", no_wrap=True)
    table.add_column("share on samples", justify="right")
    table.add_column("share on all tokens", justify="right")
    table.add_column("reverse KL first", justify="right")
    table.add_column("last", justify="right")
    routing = report.routing.overall if report.routing is not None else {}
    for name, share in on.share.items():
        first, last, _ = first_last_min(report.curves.reverse_kl.get(name, []))
        table.add_row(Text(name), Text(fmt_pct(share)), Text(fmt_pct(_share(routing.get(name)))),
                      Text(fmt_num(first)), Text(fmt_num(last)))
    console.print(table)
    console.print(Text("reverse KL: KL(student || teacher) per sampled token, nats, at loss.temperature", style="dim"))
    if on.start or on.end:
        samples = Table(box=None, show_lines=False, padding=(0, 1))
        samples.add_column("prompt", max_width=30, overflow="fold")
        samples.add_column("greedy at the start", max_width=40, overflow="fold")
        samples.add_column("greedy at the end", max_width=40, overflow="fold")
        ends = {c.prompt: c.completion for c in on.end}
        for c in on.start:
            samples.add_row(Text(c.prompt[-120:]), Text(c.completion.strip() or "(empty)"),
                            Text((ends.get(c.prompt) or "—").strip() or "(empty)"))
        console.print(samples)
