-- Shard schema v2: the collaborative model (ARCHITECTURE.md section 4).

-- The global item-factor model as published by the federation worker. A row's factor is int8
-- codes (one byte per factor) times factor_scale; NULL when the item left the model.
-- model_version is the round that last changed the row, so a device fetches only rows newer
-- than the version it holds. The current model version and factor count are in shard_state.
CREATE TABLE item_factors (
    content_id    text PRIMARY KEY,
    factor        bytea NULL,
    factor_scale  real NULL,
    model_version bigint NOT NULL,
    CHECK ((factor IS NULL) = (factor_scale IS NULL))
);
CREATE INDEX item_factors_model_version_idx ON item_factors (model_version);

-- Each device's latest contribution to the next round (a serialized, validated
-- omega.v1.ItemFactorUpdate). A newer sync with an update replaces the row; a published round
-- deletes the rows computed against older model versions (they were consumed or are stale).
CREATE TABLE model_updates (
    device_id     text PRIMARY KEY REFERENCES devices (device_id) ON DELETE CASCADE,
    model_version bigint NOT NULL,
    payload       bytea NOT NULL,
    stored_at_ms  bigint NOT NULL
);
CREATE INDEX model_updates_model_version_idx ON model_updates (model_version);

-- What each published round did to the model, for audits.
ALTER TABLE published_rounds
    ADD COLUMN model_rows       integer NOT NULL DEFAULT 0,
    ADD COLUMN model_factors    integer NOT NULL DEFAULT 0,
    ADD COLUMN noise_multiplier double precision NOT NULL DEFAULT 0;
