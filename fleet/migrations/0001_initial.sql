-- The schema of data dirs before the controller (SQLite PRAGMA user_version 1): rollouts,
-- per-device executions and their history. {serial_pk} and {blob} are filled per engine.
CREATE TABLE IF NOT EXISTS rollouts(
  id TEXT PRIMARY KEY, kind TEXT NOT NULL, created DOUBLE PRECISION NOT NULL, updated DOUBLE PRECISION NOT NULL,
  state TEXT NOT NULL, reason TEXT, artifact_dir TEXT, name TEXT, version TEXT, sha256 TEXT,
  manifest TEXT, signature TEXT, artifact_url TEXT, serve TEXT, policy TEXT NOT NULL,
  current_wave INTEGER NOT NULL, waves INTEGER NOT NULL, broker TEXT);
CREATE TABLE IF NOT EXISTS executions(
  rollout_id TEXT NOT NULL, device_id TEXT NOT NULL, wave INTEGER NOT NULL, state TEXT NOT NULL,
  ota_state TEXT, command_id TEXT, sent_ts DOUBLE PRECISION, updated_ts DOUBLE PRECISION, reason TEXT,
  prev_version TEXT, rollback_state TEXT, rollback_id TEXT, rollback_sent_ts DOUBLE PRECISION,
  PRIMARY KEY(rollout_id, device_id));
CREATE TABLE IF NOT EXISTS history(
  id {serial_pk}, ts DOUBLE PRECISION NOT NULL, rollout_id TEXT, device_id TEXT,
  event TEXT NOT NULL, detail TEXT);
CREATE INDEX IF NOT EXISTS history_rollout ON history(rollout_id, device_id);
