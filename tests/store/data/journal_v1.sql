-- A journal written by the first store (patchd/state.py at ae356b8);
-- made by make_journal_v1.py, which says why. PRAGMA user_version is 0.
BEGIN TRANSACTION;
CREATE TABLE journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    target TEXT NOT NULL,
    step TEXT NOT NULL,
    phase TEXT NOT NULL,
    at REAL NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'
);
INSERT INTO "journal" VALUES(1,'r1','c1','snapshot','intent',1795831201.0,'{}');
INSERT INTO "journal" VALUES(2,'r1','c1','snapshot','done',1795831201.0,'{}');
INSERT INTO "journal" VALUES(3,'r1','c1','apply','intent',1795831201.0,'{}');
INSERT INTO "journal" VALUES(4,'r1','c1','apply','done',1795831201.0,'{}');
INSERT INTO "journal" VALUES(5,'r1','c1','verify','intent',1795831201.0,'{}');
INSERT INTO "journal" VALUES(6,'r1','c1','verify','done',1795831201.0,'{}');
INSERT INTO "journal" VALUES(7,'r1','c1','commit','intent',1795831201.0,'{}');
INSERT INTO "journal" VALUES(8,'r1','c1','commit','done',1795831202.0,'{}');
INSERT INTO "journal" VALUES(9,'r1','c2','rollback','intent',1795831203.0,'{}');
INSERT INTO "journal" VALUES(10,'r1','c2','rollback','failed',1795831204.0,'{}');
INSERT INTO "journal" VALUES(11,'r2','c3','apply','done',1795834805.0,'{}');
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO "meta" VALUES('schema_version','1');
INSERT INTO "meta" VALUES('write_checks','1');
CREATE TABLE retained (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    backend TEXT NOT NULL,
    target TEXT NOT NULL,
    run_id TEXT NOT NULL,
    description TEXT NOT NULL,
    data TEXT NOT NULL,
    expires REAL NOT NULL
);
INSERT INTO "retained" VALUES(1,'lab','web-1','r1','old image web-1','{"image": "sha256:a"}',1796436000.0);
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    grp TEXT NOT NULL,
    window TEXT,
    started REAL NOT NULL,
    finished REAL,
    status TEXT NOT NULL,
    total INTEGER NOT NULL DEFAULT 0,
    succeeded INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    detail TEXT NOT NULL DEFAULT '{}'
);
INSERT INTO "runs" VALUES('r1','web','weekend',1795831200.0,1795831500.0,'halted',2,1,1,'{"verified": {"web": "sha256:b"}, "error": null, "pending": []}');
INSERT INTO "runs" VALUES('r2','db',NULL,1795834800.0,NULL,'running',0,0,0,'{}');
CREATE TABLE targets (
    run_id TEXT NOT NULL REFERENCES runs (id),
    target TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    version_from TEXT,
    version_to TEXT,
    snapshot TEXT,
    error TEXT,
    updated REAL NOT NULL,
    PRIMARY KEY (run_id, target)
);
INSERT INTO "targets" VALUES('r1','c1','web-1','committed','sha256:a','sha256:b','{"old": "web-1.patchd-old"}',NULL,1795831202.0);
INSERT INTO "targets" VALUES('r1','c2','web-2','rollback_failed',NULL,NULL,NULL,'verifying: unhealthy; rollback: gone',1795831204.0);
INSERT INTO "targets" VALUES('r2','c3','db-1','applied','1.0','1.1','{"snap": "s-1"}',NULL,1795834805.0);
CREATE INDEX runs_by_group ON runs (grp, started);
CREATE INDEX targets_by_state ON targets (state);
CREATE INDEX journal_by_target ON journal (run_id, target);
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('journal',11);
INSERT INTO "sqlite_sequence" VALUES('retained',1);
COMMIT;
