-- The objects CREATE EXTENSION phsync makes.
CREATE EXTENSION phsync;

SELECT pg_describe_object(classid, objid, objsubid) AS object
FROM pg_depend
WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
  AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'phsync')
ORDER BY 1;

\d phsync.runs

-- run history is dumped with the database
SELECT extconfig::regclass[] FROM pg_extension WHERE extname = 'phsync';

-- every public object is documented
SELECT count(*) AS undocumented
FROM pg_depend d
WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
  AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'phsync')
  AND d.classid IN ('pg_proc'::regclass, 'pg_namespace'::regclass)
  AND obj_description(d.objid, d.classid::regclass::name) IS NULL;

-- the statuses and triggers phsync.runs accepts
\set VERBOSITY terse
INSERT INTO phsync.runs (trigger, target) VALUES ('cron', 'x');
INSERT INTO phsync.runs (trigger, target, status) VALUES ('manual', 'x', 'done');
\set VERBOSITY default
