"""Who a caller is: a tenant and a role.

Owns: `Principal`, the identity every route and the adapter catalog reason about. How a principal
is established from a request (API keys) is `api/auth.py`'s business.
"""

from dataclasses import dataclass
from typing import Literal

from loraplex.errors import Forbidden

Role = Literal["admin", "tenant", "metrics"]  # metrics: may only read /metrics
DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class Principal:
    """The caller behind a request; admins see and manage every tenant's adapters."""

    tenant: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def require_admin(self) -> None:
        if not self.is_admin:
            raise Forbidden("this route is for admin keys only")
