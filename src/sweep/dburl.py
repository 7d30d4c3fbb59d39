"""Database URLs as users write them, turned into the URLs SQLAlchemy opens.

Optuna's RDB storage and MLflow's SQL store both hand their URL to SQLAlchemy. SQLAlchemy 2.1
maps a bare `postgresql://` to the psycopg 3 driver, while the driver a user most likely has (and
the one `pip install "sweep[distributed]"` brings) is psycopg2. A bare scheme therefore gets the
driver that is installed; a URL that names its driver (`postgresql+psycopg://`) is left as it is.
"""

from __future__ import annotations

from importlib.util import find_spec

DRIVERS = ("psycopg2", "psycopg")  # in order of preference


class MissingDriver(ImportError):
    """No PostgreSQL driver is installed; the message says how to get one."""


def sqlalchemy_url(url: str) -> str:
    """`postgresql://...` (or `postgres://...`) with an installed driver; other URLs unchanged."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    for driver in DRIVERS:
        if find_spec(driver) is not None:
            return f"postgresql+{driver}://{rest}"
    raise MissingDriver(f"{scheme}:// needs a PostgreSQL driver: pip install 'sweep[distributed]' "
                        "(psycopg2-binary) or psycopg")
