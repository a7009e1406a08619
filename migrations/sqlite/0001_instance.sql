-- Keel's own schema, version 1: who this installation is.
-- The instance id names this node in logs and, when scaled out, among its peers.
CREATE TABLE keel_instance (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    instance_id TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
);
INSERT INTO keel_instance (id, instance_id, created_at)
VALUES (1, lower(hex(randomblob(16))), unixepoch());
