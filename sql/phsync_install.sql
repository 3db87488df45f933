-- The objects CREATE EXTENSION phsync makes.
-- (CONTEXT lines differ between majors: 18 names the script and line)
\set SHOW_CONTEXT never
CREATE EXTENSION phsync;

-- (from 17 on, the row types of its tables and views are members too)
SELECT pg_describe_object(classid, objid, objsubid) AS object
FROM pg_depend
WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
  AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'phsync')
  AND NOT (classid = 'pg_type'::regclass AND EXISTS (
	SELECT FROM pg_type t LEFT JOIN pg_type e ON e.oid = t.typelem
	WHERE t.oid = objid AND (t.typrelid <> 0 OR e.typrelid <> 0)))
ORDER BY 1;

\d phsync.runs

-- run history is dumped with the database
SELECT extconfig::regclass[] FROM pg_extension WHERE extname = 'phsync';

-- every public object is documented: functions, the schema, every table
-- and view and each of their columns
SELECT pg_describe_object(d.classid, d.objid, 0) AS undocumented
FROM pg_depend d
WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
  AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'phsync')
  AND (d.classid IN ('pg_proc'::regclass, 'pg_namespace'::regclass)
       OR (d.classid = 'pg_class'::regclass
           AND (SELECT relkind FROM pg_class WHERE oid = d.objid) IN ('r', 'v')))
  AND obj_description(d.objid, d.classid::regclass::name) IS NULL
UNION ALL
SELECT a.attrelid::regclass || '.' || a.attname
FROM pg_depend d JOIN pg_attribute a ON a.attrelid = d.objid
WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
  AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'phsync')
  AND d.classid = 'pg_class'::regclass
  AND (SELECT relkind FROM pg_class WHERE oid = d.objid) IN ('r', 'v')
  AND a.attnum > 0 AND NOT a.attisdropped
  AND col_description(a.attrelid, a.attnum) IS NULL
ORDER BY 1;

-- CREATE EXTENSION phsync SCHEMA phsync puts the functions beside the tables
DROP EXTENSION phsync;
CREATE SCHEMA phsync;
CREATE EXTENSION phsync SCHEMA phsync;
SELECT pg_describe_object(classid, objid, 0) AS object
FROM pg_depend
WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
  AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'phsync')
  AND classid = 'pg_proc'::regclass
ORDER BY 1;
DROP EXTENSION phsync;
DROP SCHEMA phsync;
-- ... in a schema of its own only when a superuser owns it
CREATE ROLE phsync_squatter;
CREATE SCHEMA phsync AUTHORIZATION phsync_squatter;
CREATE EXTENSION phsync SCHEMA phsync;
DROP SCHEMA phsync;
DROP ROLE phsync_squatter;
CREATE EXTENSION phsync;

-- the statuses and triggers phsync.runs accepts
\set VERBOSITY terse
INSERT INTO phsync.runs (trigger, target) VALUES ('cron', 'x');
INSERT INTO phsync.runs (trigger, target, status) VALUES ('manual', 'x', 'done');
\set VERBOSITY default
