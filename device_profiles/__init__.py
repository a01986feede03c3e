"""Device profiles shipped with edgefleet: one YAML file a target (see docs/profiles.md)."""
