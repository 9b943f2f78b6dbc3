"""Cache size against loss fidelity: bytes per token per teacher and the forward-KL loss from the
cache's storage relative to the dense path, on the demo's trained teachers.

Workload: recipes/quickstart.yaml (three teachers trained by tools/build_demo.py on real code,
prose and math; 4,096-token vocabulary, seq_len 128), its student at initialisation (ce router; the weights here are uniform), the first
--steps micro-batches of its data plan (8 rows each), uniform weights over the teachers, forward
KL at temperature 1. For each setting the teachers' logits go through exactly what
`merge-distill cache` stores and a cached run reads (cache/writer._encode_teacher, then
codec.decode_row); bytes per token are the encoded bytes of every field (ids, values, the kept
counts when k is adaptive, tail + NLL + entropy) divided by the tokens. The loss difference is
(cache loss - dense loss) / dense loss over the same positions; the gradient cosine compares
the loss's gradient with respect to the student's logits, cache against dense (1.0: the same
direction of update).

    make demo   # once: builds the demo's teachers and data
    python tools/bench_cache_size.py --steps 6     # the table in docs/CACHE.md

The last row is `cache.store: hidden` (what `auto`, the default, stores for these teachers): each
teacher's final hidden state in int8 and its head once (heads.safetensors, counted apart); the
run makes the full distributions back from them.

--train-seeds trains instead: the quickstart student (uniform router) for its 100 steps from the
dense teachers and from caches (top-k at k = 64 and k = 40, uint8, and the default: hidden states),
once per seed, and measures what the student learned: its held-out forward KL to the dense mixture
of the teachers.

    python tools/bench_cache_size.py --train-seeds 0 1 2   # the trained-student table in docs/CACHE.md
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from merge_distill.cache import codec  # noqa: E402
from merge_distill.cache.manifest import read_manifest  # noqa: E402
from merge_distill.cache.writer import _encode_teacher, topk_targets  # noqa: E402
from merge_distill.engine import setup_run  # noqa: E402
from merge_distill.recipe import load_recipe  # noqa: E402
from merge_distill.signals import IGNORE_INDEX  # noqa: E402
from merge_distill.losses.fused import HeadLogits  # noqa: E402
from merge_distill.models import hidden_before_head  # noqa: E402
from merge_distill.sources import SparseSignals  # noqa: E402
from merge_distill.sources.signals import DenseSignals  # noqa: E402

HIDDEN = ("hidden", "int8", 1.0)  # the hidden-state row's key
SETTINGS = [(64, "float32", 1.0), (64, "float16", 1.0), (64, "uint8", 1.0), (40, "uint8", 1.0), (32, "float16", 1.0),
            (32, "uint8", 1.0), (16, "float16", 1.0), (64, "uint8", 0.9), (64, "uint8", 0.5)]


def decoded(out: dict, j: int, dtype: str, mass: float, bits: int) -> tuple[dict, int]:
    """One teacher's stored columns for a batch, read back as a run reads them; and their bytes."""
    columns = _encode_teacher(out, j, dtype, mass, bits)
    B, T, k = out["ids"].shape
    counts = columns.get(f"t{j}_n", torch.full((B, T), k).numpy())
    rows = [codec.decode_row(columns[f"t{j}_ids"][b], columns[f"t{j}_values"][b], counts[b], k, dtype, bits) for b in range(B)]
    stored = (sum(map(len, columns[f"t{j}_ids"])) + sum(map(len, columns[f"t{j}_values"]))
              + (columns[f"t{j}_n"].nbytes if f"t{j}_n" in columns else 0) + 12 * B * T)
    return {"ids": torch.stack([r[0] for r in rows]), "values": torch.stack([r[1] for r in rows]),
            "tail": torch.from_numpy(columns[f"t{j}_tail"])}, stored


def decode_ms(rows: int = 8, teachers: int = 3, seq_len: int = 256, k: int = 64, dtype: str = "uint8",
              bits: int = 12, reps: int = 20) -> float:
    """What a cached run pays to read a batch of tools/bench.py's workload: decoding every row of
    every teacher (random ids and log-probs; the cost depends only on the sizes)."""
    ids = torch.randint(0, 1 << bits, (seq_len, k))
    values = -torch.rand(seq_len, k).sort(-1).values * 10
    n = torch.full((seq_len,), k)
    encoded = codec.encode_row(ids, values, n, dtype, bits)
    started = time.perf_counter()
    for _ in range(reps):
        for _ in range(rows * teachers):
            codec.decode_row(*encoded, n.numpy(), k, dtype, bits)
    return (time.perf_counter() - started) / reps * 1000


def hidden_signals(models: list, signals, batch, vocab_size: int) -> tuple[DenseSignals, int, int]:
    """The teachers as a hidden-state cache gives them back: final hidden states through
    codec.encode_hidden / decode_hidden, logits made from them and the head (HeadLogits); and
    the bytes stored per token (all teachers) and the heads' bytes (float32, once per cache)."""
    heads, stored, head_bytes = [], 0, 0
    for model in models:
        with torch.no_grad(), hidden_before_head(model) as captured:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        hidden = captured[-1]
        rows, scale = codec.encode_hidden(hidden)
        back = torch.stack([codec.decode_hidden(r, s, hidden.shape[-1]) for r, s in zip(rows, scale)])
        weight = model.get_output_embeddings().weight.detach()[:vocab_size]
        heads.append(HeadLogits(back, weight, vocab_size))
        stored += sum(map(len, rows)) + scale.nbytes + 8 * hidden.shape[0] * hidden.shape[1]
        head_bytes += weight.numel() * 4
    return DenseSignals(signals.names, heads, signals.gold_nll, signals.entropy), stored, head_bytes


TRAINED_ARMS = [("dense (online teachers)", None), ("cache top-k, k = 64, uint8", 64), ("cache top-k, k = 40, uint8", 40),
                ("cache hidden states (store: auto, the default)", "hidden")]


@torch.no_grad()
def held_out_kl(recipe, run_dir: Path) -> float:
    """Forward KL(uniform mixture of the dense teachers || trained student), nats per held-out
    target token, over the recipe's evaluation rows (all domains)."""
    from transformers import AutoModelForCausalLM

    from merge_distill.evaluate import eval_rows
    from merge_distill.models import load_tokenizer

    student = AutoModelForCausalLM.from_pretrained(run_dir / "student").eval()
    teachers = [AutoModelForCausalLM.from_pretrained(t.model).eval() for t in recipe.teachers]
    tokenizer = load_tokenizer(str(run_dir / "student"))
    V = len(tokenizer)
    total, count = 0.0, 0
    for ids, labels, mask in eval_rows(recipe, tokenizer).values():
        for b in range(0, len(ids), 8):
            x, m = ids[b: b + 8], mask[b: b + 8]
            where = torch.cat([labels[b: b + 8, 1:] != IGNORE_INDEX, torch.zeros_like(x[:, :1], dtype=torch.bool)], 1)
            logq = torch.log_softmax(student(input_ids=x, attention_mask=m).logits[..., :V].float(), -1)[where]
            logp = torch.stack([torch.log_softmax(t(input_ids=x, attention_mask=m).logits[..., :V].float(), -1)[where]
                                for t in teachers]).logsumexp(0) - math.log(len(teachers))
            total += float((logp.exp() * (logp - logq)).sum())
            count += int(where.sum())
    return total / count


def uniform_quickstart(folder: Path) -> Path:
    """recipes/quickstart.yaml with the uniform router, written into `folder` (its relative paths
    made absolute)."""
    import yaml

    here = ROOT / "recipes"
    raw = yaml.safe_load((here / "quickstart.yaml").read_text())
    raw["routing"] = {"kind": "uniform"}
    for teacher in raw["teachers"]:
        teacher["model"] = str((here / teacher["model"]).resolve())
    for source in raw["data"]["train"] + raw["data"]["eval"]:
        source["path"] = str((here / source["path"]).resolve())
    path = folder / "quickstart-uniform.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def trained_fidelity(seeds: list[int]) -> None:
    """The quickstart recipe (uniform router, so that every arm trains towards the same target)
    trained from the dense teachers and from caches, per seed; the held-out forward KL of each
    student to the dense mixture, and its difference from the dense arm's."""
    from rich.console import Console

    from merge_distill.cache.writer import write_cache
    from merge_distill.engine import run

    quiet = Console(file=io.StringIO())
    results: dict[str, dict[int, float]] = {name: {} for name, _ in TRAINED_ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        quickstart = uniform_quickstart(Path(tmp))
        for name, k in TRAINED_ARMS:
            cache = []
            if k == "hidden":
                cache = [f"cache.dir={tmp}/cache-{k}", "cache.store=auto"]
            elif k:
                cache = [f"cache.dir={tmp}/cache-{k}", f"cache.k={k}", "cache.dtype=uint8", "cache.store=topk"]
            if k:
                written = write_cache(load_recipe(quickstart, [*cache, f"output.dir={tmp}/w"]),
                                      console=quiet, overwrite=True, show_progress=False)
                stored = read_manifest(written.root)
                assert stored["store"] == ("hidden" if k == "hidden" else "topk"), stored["store"]
                print(f"{name}: {stored['bytes_per_token_per_teacher']} bytes per token per teacher", flush=True)
            for seed in seeds:
                overrides = [f"train.seed={seed}", f"output.dir={tmp}/run-{k}-{seed}", "report.eval_at_end=false",
                             *cache, *(["cache.use=true"] if k else [])]
                recipe = load_recipe(quickstart, overrides)
                results[name][seed] = held_out_kl(recipe, run(recipe, console=quiet))
                print(f"{name}, seed {seed}: held-out forward KL {results[name][seed]:.4f}", flush=True)
    dense = results[TRAINED_ARMS[0][0]]
    print(f"\nquickstart recipe, uniform router, {', '.join(map(str, seeds))} as train.seed; held-out forward KL "
          "(nats per target token) of the trained student to the dense uniform mixture of the teachers\n")
    print("| student trained from | " + " | ".join(f"seed {s}" for s in seeds) + " | largest difference from dense |")
    print("|---|" + "---|" * len(seeds) + "---|")
    for name, _ in TRAINED_ARMS:
        diffs = [(results[name][s] - dense[s]) / dense[s] for s in seeds]
        cells = " | ".join(f"{results[name][s]:.4f} ({100 * d:+.2f}%)" for s, d in zip(seeds, diffs))
        print(f"| {name} | {cells} | {100 * max(diffs, key=abs):+.2f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="micro-batches of 8 rows")
    parser.add_argument("--train-seeds", type=int, nargs="+",
                        help="instead: train the quickstart student from the dense teachers and from caches, per seed")
    args = parser.parse_args()
    if not (ROOT / ".cache" / "demo" / "teachers" / "code").is_dir():
        raise SystemExit("the demo's teachers are missing: run `make demo` first")
    if args.train_seeds:
        trained_fidelity(args.train_seeds)
        return
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"output.dir={tmp}/run"])
        parts = setup_run(recipe, overwrite=True)
        t = parts.training
        bits = codec.id_bits(t.vocab_size)
        dense_sum, tokens = 0.0, 0
        sums, stored, kept = ({s: 0.0 for s in (*SETTINGS, HIDDEN)} for _ in range(3))
        dot, norm = {s: 0.0 for s in (*SETTINGS, HIDDEN)}, {s: 0.0 for s in (*SETTINGS, HIDDEN)}
        dense_norm = 0.0

        def loss_and_grad(signals, student_logits, weights, targets) -> tuple[float, torch.Tensor]:
            logits = student_logits.detach().requires_grad_(True)
            out = signals.loss(logits, weights, targets, t.loss)
            out.divergence_sum.backward()
            return float(out.divergence_sum), logits.grad.flatten()

        for step in range(args.steps):
            batch = parts.plan.micro_batches(step, "cpu")[0]
            with torch.no_grad():
                signals = t.source.signals(batch)
                targets = batch.targets
                student_logits = t.student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[..., : t.vocab_size]
            K = len(signals.names)
            weights = torch.full((*targets.shape, K), 1.0 / K) * (targets != IGNORE_INDEX)[..., None]
            dense, dense_grad = loss_and_grad(signals, student_logits, weights, targets)
            dense_sum += dense
            dense_norm += float(dense_grad @ dense_grad)
            tokens += targets.numel()
            for setting in SETTINGS:
                k, dtype, mass = setting
                read = []
                with torch.no_grad():
                    for j, logits in enumerate(signals.logits):
                        top = topk_targets(logits, k, recipe.loss.temperature, recipe.train.chunk_tokens)
                        columns, nbytes = decoded(top, j, dtype, mass, bits)
                        read.append(columns)
                        stored[setting] += nbytes
                        kept[setting] += float((columns["values"] > -torch.inf).sum())
                sparse = SparseSignals(signals.names, [c["ids"] for c in read], [c["values"] for c in read],
                                       [c["tail"] for c in read], signals.gold_nll, signals.entropy)
                loss, grad = loss_and_grad(sparse, student_logits, weights, targets)
                sums[setting] += loss
                dot[setting] += float(grad @ dense_grad)
                norm[setting] += float(grad @ grad)
            hidden, nbytes, head_bytes = hidden_signals(t.source.models, signals, batch, t.vocab_size)
            stored[HIDDEN] += nbytes
            loss, grad = loss_and_grad(hidden, student_logits, weights, targets)
            sums[HIDDEN] += loss
            dot[HIDDEN] += float(grad @ dense_grad)
            norm[HIDDEN] += float(grad @ grad)
    per_teacher_tokens = tokens * K
    print(f"demo teachers (vocabulary {t.vocab_size}: {bits}-bit ids), {tokens} positions x {K} teachers, "
          f"forward KL, uniform blend; dense loss {dense_sum / tokens:.4f} nats/token\n")
    print("| k | values | mass | mean entries kept | bytes/token/teacher | loss vs dense | gradient cosine |")
    print("|---|---|---|---|---|---|---|")
    print(f"| 64 | float16, int32 ids (format 2) | 1.0 | 64 | {64 * 6 + 12} | as float16 below | as float16 below |")
    for setting in SETTINGS:
        k, dtype, mass = setting
        diff = (sums[setting] - dense_sum) / dense_sum
        print(f"| {k} | {dtype} | {mass} | {kept[setting] / per_teacher_tokens:.1f} | "
              f"{stored[setting] / per_teacher_tokens:.1f} | {100 * diff:+.2f}% | "
              f"{dot[setting] / (norm[setting] * dense_norm) ** 0.5:.4f} |")
    diff = (sums[HIDDEN] - dense_sum) / dense_sum
    print(f"| hidden states, int8 (`cache.store: hidden`; auto, the default, on these teachers) | - | - | full "
          f"distribution | {stored[HIDDEN] / per_teacher_tokens:.1f} (+ heads {head_bytes / K / 2**20:.1f} MiB per teacher, "
          f"once) | {100 * diff:+.4f}% | {dot[HIDDEN] / (norm[HIDDEN] * dense_norm) ** 0.5:.6f} |")
    print(f"\nreading one batch of tools/bench.py's cached workload (8 rows x 3 teachers, 256 positions, k = 64, "
          f"12-bit ids) decodes in {decode_ms(dtype='float16'):.1f} ms (float16) / {decode_ms(dtype='uint8'):.1f} ms (uint8)")


if __name__ == "__main__":
    main()
