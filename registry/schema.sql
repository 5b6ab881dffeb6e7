-- koe5 run registry (DuckDB).
--
-- The file is split into numbered sections by lines of the form `-- @version N`. A registry at schema
-- version V gets every section with N > V applied in order, under the registry's write lock, and then
-- `schema_version` gets the row N. Sections are additive only (new tables, new columns): a newer koe5
-- must still read a registry written by an older one, and DuckDB has no migration tool.
--
-- No PRIMARY KEY / UNIQUE constraints and no secondary indexes: DuckDB refuses ALTER TABLE on a table
-- that an index depends on, and that would block additive migrations. Uniqueness (run_id, sweep_id) is
-- enforced by the writer, which holds the cross-process lock for every write.
--
-- Conventions: timestamps are UTC without time zone; JSON columns hold text produced by json.dumps.

-- @version 1

-- One row per applied schema section.
CREATE TABLE IF NOT EXISTS schema_version (
    version     INTEGER NOT NULL,   -- section number from `-- @version N`
    applied_at  TIMESTAMP NOT NULL  -- when this section was applied
);

-- One row per run: a training run, a baseline evaluation, or an evaluation of an existing model.
CREATE TABLE IF NOT EXISTS runs (
    run_id        VARCHAR NOT NULL,  -- "YYYYMMDD-HHMMSS-xxxxxx": UTC creation time + 6 random hex digits
    name          VARCHAR NOT NULL,  -- experiment name (spec `name`)
    kind          VARCHAR NOT NULL,  -- train | baseline | eval
    spec_hash     VARCHAR NOT NULL,  -- content hash of the resolved spec (koe5.spec); same spec -> same hash
    spec_yaml     VARCHAR NOT NULL,  -- the resolved spec as YAML, exactly as the run used it
    status        VARCHAR NOT NULL,  -- queued | running | finished | failed | killed (readers derive `crashed`)
    created_at    TIMESTAMP NOT NULL,-- when the run was recorded
    started_at    TIMESTAMP,         -- first time the status became running
    finished_at   TIMESTAMP,         -- when the status became finished, failed or killed
    heartbeat_at  TIMESTAMP,         -- last sign of life; a running run with an old heartbeat reads as crashed
    error         VARCHAR,           -- why the run failed or was killed (message, signal name)
    tags          VARCHAR,           -- JSON list of strings (spec `tags`)
    sweep_id      VARCHAR,           -- sweeps.sweep_id when the run belongs to a sweep, else NULL
    sweep_values  VARCHAR,           -- JSON object {spec key path: value} of the swept keys, else NULL
    output_dir    VARCHAR,           -- the run's own folder (checkpoints, train log, per-query results)
    git_commit    VARCHAR,           -- commit of the koe5 checkout that ran it
    git_dirty     BOOLEAN,           -- whether the checkout had uncommitted changes
    versions      VARCHAR,           -- JSON object of package versions (koe5, torch, transformers, deepspeed, ...)
    host          VARCHAR,           -- host name of rank 0
    devices       VARCHAR,           -- JSON list of device descriptions (e.g. GPU names)
    world_size    INTEGER,           -- number of training processes
    ds_config     VARCHAR,           -- JSON: the materialized DeepSpeed config
    data_mix      VARCHAR            -- JSON object: per-source counts/weights actually used
);

-- Retrieval metrics: one row per (run, benchmark, metric, k).
CREATE TABLE IF NOT EXISTS metrics (
    run_id             VARCHAR NOT NULL,  -- runs.run_id
    benchmark          VARCHAR NOT NULL,  -- benchmark name (spec eval.benchmarks[].name)
    metric             VARCHAR NOT NULL,  -- ndcg | recall | precision | f1 | mrr | map
    k                  INTEGER NOT NULL,  -- cut-off
    value              DOUBLE NOT NULL,   -- fraction in [0, 1]
    fingerprint        VARCHAR,           -- content hash of the benchmark files; differing ones are not comparable
    evaluator_version  VARCHAR,           -- version of the evaluation code that produced the value
    recorded_at        TIMESTAMP          -- when the value was recorded
);

-- Per-step training diagnostics, folded in from the run's JSONL log at checkpoints and at the end.
CREATE TABLE IF NOT EXISTS train_log (
    run_id          VARCHAR NOT NULL,  -- runs.run_id
    step            INTEGER NOT NULL,  -- optimizer step
    loss            DOUBLE,            -- training loss at this step
    lr              DOUBLE,            -- learning rate at this step
    grad_norm       DOUBLE,            -- global gradient norm before clipping
    triples_per_s   DOUBLE,            -- throughput in (query, document, negative) triples per second
    tokens_per_s    DOUBLE,            -- throughput in real (non-padding) tokens per second
    margin          DOUBLE,            -- mean score(positive) - max score(negative)
    false_neg_frac  DOUBLE,            -- fraction of candidates masked as duplicates of the positive
    elapsed_s       DOUBLE,            -- seconds since training started
    extra           VARCHAR            -- JSON object of any other keys in the log line
);

-- Files a run produced: checkpoints, exported models, per-query results (kind `per_query`), logs.
CREATE TABLE IF NOT EXISTS artifacts (
    run_id      VARCHAR NOT NULL,  -- runs.run_id
    kind        VARCHAR NOT NULL,  -- checkpoint | model | per_query | train_log | ...
    path        VARCHAR NOT NULL,  -- file or directory path
    created_at  TIMESTAMP          -- when it was recorded
);

-- One row per sweep (a spec expanded over several values of some keys).
CREATE TABLE IF NOT EXISTS sweeps (
    sweep_id    VARCHAR NOT NULL,  -- same format as run_id
    name        VARCHAR NOT NULL,  -- sweep name (usually the spec name)
    spec_path   VARCHAR,           -- the spec file the sweep was started from
    keys        VARCHAR,           -- JSON list of the swept spec key paths
    created_at  TIMESTAMP NOT NULL -- when the sweep was recorded
);

-- @version 2

-- Metrics evaluated during training (spec eval.every), folded in from the run's eval_log.jsonl:
-- one row per (run, step, benchmark, metric, k). The final evaluation stays in `metrics`.
CREATE TABLE IF NOT EXISTS eval_log (
    run_id     VARCHAR NOT NULL,  -- runs.run_id
    step       INTEGER NOT NULL,  -- the optimizer step whose weights were evaluated
    benchmark  VARCHAR NOT NULL,  -- benchmark name (spec eval.benchmarks[].name)
    metric     VARCHAR NOT NULL,  -- ndcg | recall | precision | f1 | mrr | map
    k          INTEGER NOT NULL,  -- cut-off
    value      DOUBLE NOT NULL,   -- fraction in [0, 1]
    seconds    DOUBLE             -- wall seconds this benchmark's evaluation took at this step
);

-- The trainer's train_summary.json: steps done, seconds, eval_seconds, `best` {benchmark, metric, step,
-- value} (spec train.keep_best: the step exported) and stopped_early_at (the step early stopping ended at).
ALTER TABLE runs ADD COLUMN IF NOT EXISTS train_summary VARCHAR;

-- @version 3

-- Matryoshka evaluation (spec eval.dims, `koe5 eval --dims`): the embedding width each metric was computed at.
-- `dim` NULL is the model's full embedding (every row recorded before this section is one); a number is
-- the width the query and passage embeddings were truncated to (their first `dim` dimensions, renormalized).
-- Readers that do not ask for a width read `dim IS NULL` only, so widths never mix in a comparison.
ALTER TABLE metrics ADD COLUMN IF NOT EXISTS dim INTEGER;
-- The model's full embedding width, so a plot of quality against width can place the full-width point;
-- NULL on rows recorded before this section.
ALTER TABLE metrics ADD COLUMN IF NOT EXISTS model_dim INTEGER;
