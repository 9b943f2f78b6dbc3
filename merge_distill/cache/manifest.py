"""The cache's recipe section, fingerprints and manifest, and the checks a run makes before use.

The manifest records what the cache was computed from; a run refuses a cache that differs in
any of: teacher names, model paths/ids, revisions and fingerprints, tokenizer, the tokenized
rows of each source (hence data, seq_len, packing, chat templating), k, the loss temperature
and the storage dtype, naming the recipe key that differs. Each teacher's tokenizer is
fingerprinted on its own: a cache of teachers aligned across tokenizers holds their top-k in
their own vocabularies.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any


from transformers import AutoConfig

from merge_distill.cache import codec
from merge_distill.errors import UserError
from merge_distill.models import TOKENIZER_FILES, aligned_teachers, tokenizer_source
from merge_distill.schema import SELF_TEACHER, Recipe

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from merge_distill.data import SourceRows

# 2: per-teacher tokenizer fingerprints, teachers aligned across tokenizers;
# 3: packed ids, quantised values, adaptive k (codec.py), shard checksums;
# 4: `store` (topk or hidden: hidden states + heads.safetensors)
CACHE_FORMAT = 4
HEADS_FILE = "heads.safetensors"
# cache.store: auto stores hidden states where they take at most this many bytes per token per
# teacher (the budget the default top-k keeps under for every vocabulary up to 262,144 tokens),
# or no more than the top-k would.
HIDDEN_BUDGET_BYTES = 150
CHECKSUM_FILE = "checksum"
# The files that define a tokenizer (hashed into a teacher's fingerprint): those that hold one,
# and the two that only accompany one.
TOKENIZER_DEFINITION = (*TOKENIZER_FILES, "special_tokens_map.json", "merges.txt")
REWRITE = "rewrite it with `merge-distill cache RECIPE --overwrite` (or point cache.dir elsewhere)"


# ---- fingerprints and the manifest ---------------------------------------------------------


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:20]


def model_fingerprint(model: str) -> str:
    """Cheap but meaningful: config.json and the tokenizer's files (a cache is written in the
    teacher's own vocabulary), and for every weight file its name, size, safetensors header
    (names, dtypes, shapes, offsets) and 64 KiB read at its start, middle and end (any retraining
    changes those bytes). A hub id (no local folder) is fingerprinted by name only: pin its
    `revision` to a commit."""
    folder = Path(model)
    if not folder.is_dir():
        return _sha("hub", model)
    parts: list[bytes | str] = []
    for name in ("config.json", *TOKENIZER_DEFINITION):
        if (folder / name).is_file():
            parts += [name, (folder / name).read_bytes()]
    for path in sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf")):
        size = path.stat().st_size
        parts += [path.name, str(size)]
        with open(path, "rb") as fh:
            if path.suffix == ".safetensors" and size >= 8:
                parts.append(fh.read(8 + int.from_bytes(fh.read(8), "little")))
            for offset in (0, max(0, size // 2 - 32768), max(0, size - 65536)):
                fh.seek(offset)
                parts.append(fh.read(65536))
    return _sha(*parts)


def teacher_fingerprint(recipe: Recipe, index: int) -> str:
    """A teacher's fingerprint; `self` is the student's initial weights: its spec, seed and source."""
    spec = recipe.teachers[index]
    if spec.model != SELF_TEACHER:
        return model_fingerprint(spec.model)
    student = recipe.student
    names = {t.name: t.model for t in recipe.teachers}
    source = student.model or (names.get(student.from_teacher.teacher, "") if student.from_teacher else "") or (
        names.get(student.from_config.base, student.from_config.base) if student.from_config else "")
    return _sha("self", json.dumps(student.model_dump(mode="json"), sort_keys=True), str(recipe.train.seed),
                model_fingerprint(source) if source else "")


def tokenizer_fingerprint(recipe: Recipe, index: int) -> str:
    """The files that define a teacher's tokenizer (a `self` teacher has the student's); a hub id by
    name and revision."""
    spec = recipe.teachers[index]
    model, revision = (tokenizer_source(recipe)[:2] if spec.model == SELF_TEACHER else (spec.model, spec.revision))
    folder = Path(model)
    if not folder.is_dir():
        return _sha("hub", model, str(revision))
    return _sha(*[part for name in TOKENIZER_DEFINITION if (folder / name).is_file()
                  for part in (name, (folder / name).read_bytes())])


def tokenizer_hash(tokenizer: "PreTrainedTokenizerBase") -> str:
    return _sha(json.dumps(sorted(tokenizer.get_vocab().items())), str(len(tokenizer)))


def rows_hash(rows: "SourceRows") -> str:
    """The tokenized rows of a source (ids, targets, lengths; hashed once when they were built),
    hence data, tokenizer use, seq_len, packing and chat templating all at once."""
    return _sha(str((len(rows), rows.seq_len)), rows.digest)


def _folder_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label) + "-" + _sha(label)[:8]


def cheap_manifest(recipe: Recipe) -> dict[str, Any]:
    """The manifest fields known without loading tokenizer or data."""
    section = recipe.cache
    assert section is not None
    return {
        "format": CACHE_FORMAT,
        "teachers": [{"name": t.name, "model": t.model, "revision": t.revision, "fingerprint": teacher_fingerprint(recipe, i),
                      "tokenizer": tokenizer_fingerprint(recipe, i)}
                     for i, t in enumerate(recipe.teachers)],
        "aligned": aligned_teachers(recipe),
        "seq_len": recipe.data.seq_len, "packing": recipe.data.packing,
        "k": section.k, "temperature": recipe.loss.temperature, "dtype": section.dtype, "mass": section.mass,
        "store": section.store,
    }


def full_manifest(recipe: Recipe, tokenizer: "PreTrainedTokenizerBase", sources: list["SourceRows"]) -> dict[str, Any]:
    section = recipe.cache
    assert section is not None
    return {
        **cheap_manifest(recipe), "complete": False, "vocab_size": len(tokenizer), "tokenizer": tokenizer_hash(tokenizer),
        "rows_per_shard": section.rows_per_shard,
        "teacher_dtype": recipe.train.precision,
        "sources": [{"label": s.label, "folder": _folder_name(s.label), "rows": len(s), "data_hash": rows_hash(s),
                     "shards": math.ceil(len(s) / section.rows_per_shard)} for s in sources],
    }


def hidden_size(model: str, revision: str | None, trust_remote_code: bool) -> int:
    """A model's final hidden size (the input width of its lm_head), from its config alone."""
    config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    return int(getattr(getattr(config, "text_config", None) or config, "hidden_size"))


def student_hidden_size(recipe: Recipe) -> int:
    """The student's final hidden size (a `self` teacher's), from configs and overrides alone."""
    spec = recipe.student
    if spec.model is not None:
        return hidden_size(spec.model, spec.revision, spec.trust_remote_code)
    names = {t.name: t for t in recipe.teachers}
    if spec.from_teacher is not None:
        source = names[spec.from_teacher.teacher]
        return hidden_size(source.model, source.revision, source.trust_remote_code)
    init = spec.from_config
    assert init is not None
    base = names[init.base].model if init.base in names else init.base
    return int(init.overrides.get("hidden_size") or hidden_size(base, None, False))


def resolve_store(recipe: Recipe, manifest: dict[str, Any], sharded_teachers: bool) -> tuple[str, list[int]]:
    """What the cache stores (cache.store resolved: "topk" or "hidden") and the teachers' hidden
    sizes. hidden needs every teacher on the student's tokenizer and whole (not ZeRO-3
    partitioned) in the writer; auto takes it where it fits HIDDEN_BUDGET_BYTES or the top-k's
    bytes. Raises UserError when cache.store: hidden cannot be had."""
    section = recipe.cache
    assert section is not None
    if section.store == "topk":
        return "topk", []
    sizes = [student_hidden_size(recipe) if t.model == SELF_TEACHER else hidden_size(t.model, t.revision, t.trust_remote_code)
             for t in recipe.teachers]
    blockers = []
    if manifest["aligned"]:
        blockers.append(f"teachers {manifest['aligned']} have other tokenizers (their top-k is stored in their own "
                        "vocabularies)")
    if sharded_teachers:
        blockers.append("the teachers are ZeRO-3 partitioned in this launch (distributed.teacher_zero_stage: 3 under "
                        "DeepSpeed), so their heads are not whole")
    if section.store == "hidden":
        if blockers:
            raise UserError(f"cache.store: hidden needs whole teachers on the student's tokenizer, but {'; '.join(blockers)}; "
                            "set cache.store: topk (or auto)")
        return "hidden", sizes
    topk_bytes = codec.bytes_per_token(section.k, section.dtype, manifest["vocab_size"], section.mass < 1.0, False)
    fits = all(codec.bytes_per_token_hidden(h) <= max(HIDDEN_BUDGET_BYTES, topk_bytes) for h in sizes)
    return ("hidden", sizes) if fits and not blockers else ("topk", [])


def file_checksum(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def shard_checksum(folder: Path) -> str:
    """sha256 of a shard's Arrow files (what a flipped or missing byte changes)."""
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.arrow")):
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def shard_folders(root: Path, manifest: dict[str, Any]) -> list[tuple[str, Path]]:
    """("sources/<folder>/shard-N", its path) for every shard the manifest lists."""
    return [(f"sources/{s['folder']}/shard-{i:05d}", root / "sources" / s["folder"] / f"shard-{i:05d}")
            for s in manifest["sources"] for i in range(s["shards"])]


def collect_checksums(root: Path, manifest: dict[str, Any]) -> tuple[dict[str, str], int]:
    """Every shard's checksum, as its writer recorded it beside the data, and the Arrow bytes stored."""
    sums, stored = {}, 0
    for name, folder in shard_folders(root, manifest):
        sums[name] = (folder / CHECKSUM_FILE).read_text().strip()
        stored += sum(p.stat().st_size for p in folder.glob("*.arrow"))
    return sums, stored


def corrupt_shard(root: Path, manifest: dict[str, Any], name: str) -> str | None:
    """Why shard `name` (or the heads file) cannot be trusted (missing, or its bytes differ from the
    manifest's checksum), else None."""
    folder = root / name
    if name == HEADS_FILE:
        if not folder.is_file():
            return f"cache.dir: {name} of {root} (the teachers' heads) is missing"
        if file_checksum(folder) != manifest.get("checksums", {}).get(name):
            return f"cache.dir: {name} of {root} is corrupt (its bytes differ from the checksum in manifest.json)"
        return None
    if not folder.is_dir():
        return f"cache.dir: shard {name} of {root} is missing"
    if shard_checksum(folder) != manifest.get("checksums", {}).get(name):
        return f"cache.dir: shard {name} of {root} is corrupt (its bytes differ from the checksum in manifest.json)"
    return None


REWRITE_SHARD = ("delete that folder and run `merge-distill cache RECIPE`, which writes the missing shards again "
                 "(`merge-distill cache RECIPE --verify` checks every shard)")


def read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def manifest_differences(cached: dict[str, Any], expected: dict[str, Any], root: Path, writing: bool = False) -> list[str]:
    """One line per field where the cache differs from what this recipe needs (key path first).

    Compares the fields present in `expected` (the cheap ones at validation, all at run start).
    Sources: every source of the recipe must be in the cache with the same tokenized rows; extra
    cached sources are fine for a run (a writer must match exactly)."""
    if cached.get("format") != CACHE_FORMAT:
        return [f"cache.dir: {root} was written by another version of merge_distill (format "
                f"{cached.get('format')}, this one reads {CACHE_FORMAT}); {REWRITE}"]
    out: list[str] = []
    where = f"the cache in {root}"
    names = [t["name"] for t in expected["teachers"]]
    if [t["name"] for t in cached["teachers"]] != names:
        out.append(f"teachers: {where} holds teachers {[t['name'] for t in cached['teachers']]} but the recipe lists "
                   f"{names}; {REWRITE}")
    else:
        for i, (old, new) in enumerate(zip(cached["teachers"], expected["teachers"])):
            for field in ("model", "revision"):
                if old[field] != new[field]:
                    out.append(f"teachers[{i}].{field} is {new[field]!r} but {where} was written with {old[field]!r}; {REWRITE}")
            if old["model"] == new["model"] and old["tokenizer"] != new["tokenizer"]:
                out.append(f"teachers[{i}] ({new['name']}): its tokenizer in {new['model']} differs from the one {where} "
                           f"was written with (its top-k is stored in that tokenizer's vocabulary); {REWRITE}")
            elif old["model"] == new["model"] and old["fingerprint"] != new["fingerprint"]:
                out.append(f"teachers[{i}] ({new['name']}): the config, tokenizer or weights in {new['model']} changed since "
                           f"{where} was written; {REWRITE}")
    if "aligned" in expected and cached.get("aligned") != expected["aligned"]:
        out.append(f"teachers: {where} was written with {cached.get('aligned') or 'no'} teachers aligned across "
                   f"tokenizers, the recipe aligns {expected['aligned'] or 'none'} (a teacher's tokenizer, the "
                   f"student's or align.force changed); {REWRITE}")
    keys = {"seq_len": "data.seq_len", "packing": "data.packing", "k": "cache.k", "temperature": "loss.temperature",
            "dtype": "cache.dtype", "mass": "cache.mass", "vocab_size": "the vocabulary size", "rows_per_shard": "cache.rows_per_shard"}
    if expected.get("store", "auto") != "auto" and cached.get("store") != expected["store"]:
        out.append(f"cache.store is {expected['store']!r} but {where} was written with {cached.get('store')!r}; set it to "
                   f"{cached.get('store')!r} or auto, or {REWRITE}")
    if cached.get("store") == "hidden":  # the top-k settings do not apply to hidden states
        keys = {f: key for f, key in keys.items() if f not in ("k", "dtype", "mass")}
    for field, key in keys.items():
        if field in expected and (writing or field != "rows_per_shard") and cached.get(field) != expected[field]:
            out.append(f"{key} is {expected[field]!r} but {where} was written with {cached.get(field)!r}; set it back "
                       f"to {cached.get(field)!r} or {REWRITE}")
    if "tokenizer" in expected and cached.get("tokenizer") != expected["tokenizer"]:
        out.append(f"tokenizer: the run's tokenizer differs from the one {where} was written with; {REWRITE}")
    if "sources" in expected:
        have = {s["label"]: s for s in cached["sources"]}
        for i, source in enumerate(expected["sources"]):
            old = have.get(source["label"])
            if old is None:
                out.append(f"data.train[{i}] ({source['label']}) is not in {where}; {REWRITE}")
            elif old["data_hash"] != source["data_hash"]:
                out.append(f"data.train[{i}] ({source['label']}): its tokenized rows differ from those {where} was "
                           f"written from (data, tokenizer, seq_len or packing changed); {REWRITE}")
        if writing and len(have) != len(expected["sources"]):
            out.append(f"data.train: {where} holds sources {sorted(have)}; {REWRITE}")
    return out


def recipe_problems(recipe: Recipe, check_files: bool, expected: dict[str, Any] | None = None) -> list[str]:
    """Checks of the cache section: at load time against the cheap manifest fields; at run start
    against `expected`, the full manifest (tokenizer and data too)."""
    section = recipe.cache
    if section is None or not section.use:
        return []
    problems: list[str] = []
    if check_files:
        root = Path(section.dir)
        cached = read_manifest(root)
        if cached is None:
            problems.append(f"cache.use is true but {root} holds no cache (no manifest.json); write it first with "
                            "`merge-distill cache RECIPE`, or set cache.use: false")
        elif not cached.get("complete"):
            problems.append(f"cache.use is true but the cache in {root} is incomplete; finish it with "
                            "`merge-distill cache RECIPE` (it resumes where it stopped)")
        else:
            problems += manifest_differences(cached, expected or cheap_manifest(recipe), root)
    return problems
