"""Built-in strategies. Importing this package registers them (see ``busserve.router.strategy``)."""

from busserve.router.strategies import (  # noqa: F401
    adaptive,
    balanced_pd,
    data_parallel,
    migrate,
    pd,
    prefix_aware,
)
