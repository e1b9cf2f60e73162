"""Exceptions of slurm-quota: plain classes with full-sentence messages and the exit status
each one means, nothing else.

The CLI (slurm_quota.cli) and the click-free charge (slurm_quota.entry) exit with
`err.exit_code`; the codes are sysexits-like: 1 error, 2 usage, 75 temporary failure.
"""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: try again later
EXIT_INTERRUPTED = 130


class SlurmQuotaError(Exception):
    """Base class of every error slurm-quota reports to a person."""

    exit_code = EXIT_ERROR


class InvalidInput(SlurmQuotaError):
    """A value given on the command line or in a request is not acceptable."""

    exit_code = EXIT_USAGE


class ImplausibleSlurmData(SlurmQuotaError):
    """Slurm handed over a value no real job can have (e.g. PROCS=2**70); nothing was written."""


class NotPermitted(SlurmQuotaError):
    """The caller may not do this (e.g. an admin command run by a non-root user)."""


class NotFound(SlurmQuotaError):
    """A user, account, job or other record named by the caller does not exist."""


class SchemaError(SlurmQuotaError):
    """The database schema is not the one this version understands."""


class DatabaseDamaged(SchemaError):
    """The ledger file is damaged, or is not a SQLite file at all (e.g. a FIFO at its path)."""


class Inconsistent(SlurmQuotaError):
    """The ledger failed its consistency check (`slurm-quota check`)."""


class DatabaseMissing(SlurmQuotaError):
    """The database file does not exist (run `slurm-quota migrate`)."""


class TemporaryFailure(SlurmQuotaError):
    """Something outside our control is unavailable now; retrying later may work."""

    exit_code = EXIT_TEMPFAIL


class DatabaseUnavailable(TemporaryFailure):
    """The database is locked past the wait bound or cannot be opened."""


class SlurmUnavailable(TemporaryFailure):
    """Slurm (sacct, squeue, scontrol, slurmdbd) did not answer in time or failed."""


class ServiceUnavailable(TemporaryFailure):
    """The slurm-quota HTTP service did not answer."""


class NotAuthenticated(SlurmQuotaError):
    """The service cannot tell who sent a request, or the credential proves nothing (401)."""


class CredentialRefused(NotAuthenticated):
    """A MUNGE credential that does not prove who sent this request (replayed, expired,
    forged, or made for another request)."""


class MungeUnavailable(TemporaryFailure):
    """libmunge is missing or munged does not answer."""
