-- Federation worker state (its own database; it never reads a shard's database).
CREATE TABLE federation_rounds (
    round_id    bigint PRIMARY KEY,
    status      text NOT NULL CHECK (status IN ('aggregated', 'published')),
    -- Per shard: {"watermark_ms": int, "views_round": int} after this round.
    watermarks  jsonb NOT NULL,
    -- The serialized PublishRoundRequest: a crashed round is re-published from here, so the
    -- same noisy aggregate reaches every shard and no privacy budget is spent twice.
    payload     bytea NOT NULL,
    -- Privacy accountant state after this round.
    privacy     jsonb NOT NULL,
    figures     jsonb NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz
);

CREATE TABLE codebooks (
    codebook_id serial PRIMARY KEY,
    data        bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
