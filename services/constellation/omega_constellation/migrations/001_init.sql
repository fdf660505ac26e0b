-- Shard schema v1. Embeddings are int8 bytes plus a float scale (ARCHITECTURE.md section 3).
CREATE TABLE devices (
    device_id          text PRIMARY KEY,
    device_key         text NOT NULL,
    shard_id           text NOT NULL,
    last_local_version bigint NOT NULL DEFAULT 0,
    last_sync_at       timestamptz,
    pattern_count      integer NOT NULL DEFAULT 0,
    created_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE device_patterns (
    device_id       text NOT NULL REFERENCES devices (device_id) ON DELETE CASCADE,
    pattern_id      text NOT NULL,
    embedding       bytea NOT NULL,
    embedding_scale real NOT NULL,
    success_rate    real NOT NULL CHECK (success_rate >= 0 AND success_rate <= 1),
    sample_count    bigint NOT NULL CHECK (sample_count >= 0),
    time_slot       smallint NOT NULL,
    day_type        smallint NOT NULL,
    content_type    text NOT NULL DEFAULT '',
    genre_hints     text[] NOT NULL DEFAULT '{}',
    version         bigint NOT NULL,
    created_at_ms   bigint NOT NULL,
    updated_at_ms   bigint NOT NULL,
    stored_at_ms    bigint NOT NULL,
    PRIMARY KEY (device_id, pattern_id)
);
CREATE INDEX device_patterns_stored_at_idx ON device_patterns (stored_at_ms);

-- View counts per content, tagged with the shard's global version when they arrived; the
-- federation worker exports the rounds it has not counted yet.
CREATE TABLE content_views (
    content_id text NOT NULL,
    round      bigint NOT NULL,
    views      bigint NOT NULL,
    PRIMARY KEY (content_id, round)
);

CREATE TABLE global_patterns (
    pattern_key     text PRIMARY KEY,
    round           bigint NOT NULL,
    embedding       bytea NOT NULL,
    embedding_scale real NOT NULL,
    quality         real NOT NULL,
    success_rate    real NOT NULL,
    source_count    integer NOT NULL,
    time_slot       smallint NOT NULL,
    day_type        smallint NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE trending (
    content_id text PRIMARY KEY,
    round      bigint NOT NULL,
    score      real NOT NULL
);

CREATE TABLE published_rounds (
    round              bigint PRIMARY KEY,
    patterns           integer NOT NULL,
    trending           integer NOT NULL,
    epsilon            double precision NOT NULL,
    cumulative_epsilon double precision NOT NULL,
    published_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE content_embeddings (
    content_id      text PRIMARY KEY,
    title           text NOT NULL,
    genres          text[] NOT NULL DEFAULT '{}',
    embedding       bytea NOT NULL,
    embedding_scale real NOT NULL,
    catalog_version bigint NOT NULL
);

CREATE TABLE shard_state (
    key   text PRIMARY KEY,
    value text NOT NULL
);
