# phsync: PostgreSQL extension that syncs PostHog data into a table.
# Built with PGXS; see README.md for the test and demo commands.

MODULE_big = phsync
# in layer order, bottom up (see phsync.h; test/layers.sh checks it)
OBJS = settings.o servers.o presets.o shmem.o xact.o \
	schedule.o response.o convert.o hogql.o http.o retry.o \
	runlog.o target.o syncs.o loader.o \
	fetch.o verify.o query.o \
	run.o doctor.o roles.o \
	worker.o \
	phsync.o

EXTENSION = phsync
# the install script of this version, and the updates from released ones
# (their own install scripts are kept in test/versions/, for the tests)
DATA = phsync--$(EXTVERSION).sql $(notdir $(wildcard $(srcdir)/phsync--*--*.sql))
PGFILEDESC = "phsync - sync PostHog data into PostgreSQL"

# the version lives in phsync.control only
EXTVERSION = $(shell sed -n "s/^default_version *= *'\(.*\)'/\1/p" $(srcdir)/phsync.control)

PKG_CONFIG ?= pkg-config
SHLIB_LINK = $(shell $(PKG_CONFIG) --libs libcurl json-c libisal)
PG_CPPFLAGS = $(shell $(PKG_CONFIG) --cflags libcurl json-c libisal) -DPHSYNC_VERSION='"$(EXTVERSION)"'
# -Wextra minus unused-parameter: hook and fmgr signatures fix the arguments
PG_CFLAGS = -Wall -Wextra -Wno-unused-parameter
# PHSYNC_WERROR=1: warnings are errors (the project's own builds and CI; a
# user's build on a newer compiler should not fail on a new warning)
ifdef PHSYNC_WERROR
PG_CFLAGS += -Werror
endif
# PHSYNC_ASSERTS=1: Assert() checks on, even against a server built without
ifdef PHSYNC_ASSERTS
PG_CPPFLAGS += -DUSE_ASSERT_CHECKING
endif

REGRESS = phsync_install phsync_settings phsync_security
REGRESS_OPTS = --temp-instance=./tmp_check_regress --temp-config=./test/regress.conf

TAP_TESTS = 1
PROVE_TESTS = test/t/*.pl


PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# every object depends on the private headers (PGXS does not track headers),
# on the version, and on the flags and the PostgreSQL it is built for
# (PHSYNC_ASSERTS=1, or another PG_CONFIG, rebuilds everything)
BUILD_FLAGS = $(PG_CONFIG) $(VERSION) $(PG_CPPFLAGS) $(PG_CFLAGS)
$(OBJS): phsync.h compat.h phsync.control .build-flags
.build-flags: FORCE
	@echo '$(BUILD_FLAGS)' | cmp -s - $@ || echo '$(BUILD_FLAGS)' > $@
.PHONY: FORCE
FORCE:
EXTRA_CLEAN = .build-flags

# the released versions' install scripts, so that the tests can install
# each and update it (test/t/027_versions.pl); not part of a package
install-test-versions:
	$(INSTALL_DATA) $(wildcard $(srcdir)/test/versions/phsync--*.sql) '$(DESTDIR)$(datadir)/$(datamoduledir)/'
.PHONY: install-test-versions
