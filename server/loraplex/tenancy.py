"""Who a caller is: a tenant, a role and the tenant's weight.

Owns: `Principal`, the identity every route and the adapter catalog reason about. How a principal
is established from a request (API keys) is `api/auth.py`'s business.
"""

from dataclasses import dataclass
from typing import Literal

from loraplex.errors import Forbidden

Role = Literal["admin", "tenant", "metrics"]  # metrics: may only read /metrics
DEFAULT_TENANT = "default"
DEFAULT_WEIGHT = 1.0  # a tenant's weight when the keys file gives none
MAX_WEIGHT = 1000.0


@dataclass(frozen=True)
class Principal:
    """The caller behind a request; admins see and manage every tenant's adapters.

    `weight` is the tenant's share of a busy server against other tenants under fair scheduling
    (the same for every key of one tenant).
    """

    tenant: str
    role: Role
    weight: float = DEFAULT_WEIGHT

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def require_admin(self) -> None:
        if not self.is_admin:
            raise Forbidden("this route is for admin keys only")
