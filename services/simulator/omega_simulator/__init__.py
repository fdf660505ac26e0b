"""Device simulator: replays fleets of TVs (MovieLens viewing histories) against the shards."""
