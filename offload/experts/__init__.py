"""Where an expert lives and how it moves: record layout, tiers, cache, eviction policies."""
