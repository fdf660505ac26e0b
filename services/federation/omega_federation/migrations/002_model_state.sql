-- The collaborative model's state after each round (omega_federation.model_round.ModelState):
-- model version, factor count, active content ids and the privacy ledger of its releases.
ALTER TABLE federation_rounds ADD COLUMN model jsonb NOT NULL DEFAULT '{}'::jsonb;
