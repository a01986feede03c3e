-- edge-fleet serve: who drives a rollout (a lease), a cancel request from `deploy --force`, what
-- the rollout targets, uploaded models (so any controller can serve any rollout's model), and
-- one lock row that makes "is the group busy? then create" atomic across controllers.
ALTER TABLE rollouts ADD COLUMN target TEXT;
ALTER TABLE rollouts ADD COLUMN driver TEXT;
ALTER TABLE rollouts ADD COLUMN lease_until DOUBLE PRECISION;
ALTER TABLE rollouts ADD COLUMN cancel_requested TEXT;
CREATE INDEX rollouts_state ON rollouts(state);
CREATE INDEX executions_device ON executions(device_id);
CREATE TABLE artifacts(
  sha256 TEXT PRIMARY KEY, size BIGINT NOT NULL, created DOUBLE PRECISION NOT NULL, data {blob} NOT NULL);
CREATE TABLE locks(name TEXT PRIMARY KEY, ts DOUBLE PRECISION NOT NULL);
INSERT INTO locks(name, ts) VALUES('create-rollout', 0);
