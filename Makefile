# phsync: PostgreSQL extension that syncs PostHog data into a table.
# Built with PGXS; see README.md for the test and demo commands.

MODULE_big = phsync
OBJS = phsync.o scheduler.o schedule.o syncs.o sync.o verify.o retry.o http.o hogql.o load.o runlog.o doctor.o

EXTENSION = phsync
DATA = $(notdir $(wildcard $(srcdir)/phsync--*.sql))
PGFILEDESC = "phsync - sync PostHog data into PostgreSQL"

SHLIB_LINK = -lcurl -ljson-c
PG_CPPFLAGS = -I/usr/include/json-c
# -Wextra minus unused-parameter: hook and fmgr signatures fix the arguments
PG_CFLAGS = -Wall -Wextra -Wno-unused-parameter -Werror

REGRESS = phsync_install phsync_settings phsync_security
REGRESS_OPTS = --temp-instance=./tmp_check_regress --temp-config=./test/regress.conf

TAP_TESTS = 1
PROVE_TESTS = test/t/*.pl


PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# every object depends on the private header (PGXS does not track headers)
$(OBJS): phsync.h
