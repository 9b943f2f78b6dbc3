"""The offline teacher cache: run the teachers once, train from their top-k log-probs after.

`merge-distill cache r.yaml` runs every teacher over every training row of every source and
stores, per token and teacher: the top-k log-probs at the loss temperature with their token
ids, the log of the remaining mass (tail), and the gold token's NLL and the entropy at
temperature 1 (exact, from the full distribution: what routers and reports read). A run with
`cache.use: true` loads no teacher: `CachedTeachers.signals` (sources/cached.py) reads the rows of the
micro-batch and the loss runs on the sparse targets (losses/sparse.py).

Modules: manifest (what must match), writer (`write_cache`), reader (`TeacherCache`); the
training-time source is merge_distill/sources/cached.py.

Layout of cache.dir:
    manifest.json                       what the cache was computed from (checked before use)
    sources/<label>/shard-00000/        one `datasets` Arrow folder per rows_per_shard rows
Shards are keyed by SOURCE ROW (label, row index within the source), not by the mixed stream,
so any seed, weights or mix of the same sources reuses the cache. Each Arrow row holds one
source row: per teacher j, columns t{j}_ids / t{j}_values [T*k], t{j}_tail / t{j}_nll /
t{j}_entropy [T], for every position (positions without a target hold values too; their NLL
is 0). 16-bit values are stored as their int16 bit patterns. Shards are read memory-mapped.

Resume: a shard is written to `shard-N.partial/` and renamed when complete, so after a kill the
complete shards are kept and a half-written one is removed and redone.
"""
