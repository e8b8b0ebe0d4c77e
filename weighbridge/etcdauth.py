"""etcd's users and roles for Weighbridge: who may write what (``wbctl etcd-auth setup``).

etcd is the root of trust: whoever writes a backend set receives that Service's calls. With
etcd's ``--client-cert-auth`` the user of a request is its client certificate's CN, so the
roles below bind the certificates the chart issues (CN ``weighbridge-controller``,
``weighbridge-proxy``, ``root``) to what each may do:

- ``weighbridge-controller``: readwrite on the whole prefix (sets, its leader key);
- ``weighbridge-proxy``: read on ``<prefix>services/``, readwrite on ``<prefix>proxies/``
  (its lease-bound status key) — it can never write a set;
- ``root`` with the ``root`` role, which etcd requires before it enables auth.

:func:`setup` is idempotent: it adds only what is missing and says what it did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import aetcd
import grpc
from aetcd import rpc

from weighbridge.errors import WeighbridgeError
from weighbridge.keys import KeyScheme

CONTROLLER: Final = "weighbridge-controller"
PROXY: Final = "weighbridge-proxy"
ROOT: Final = "root"

_PERM_NAMES: Final = {rpc.Permission.READ: "read", rpc.Permission.READWRITE: "readwrite"}


class EtcdAuthError(WeighbridgeError):
    """Setting up etcd's users and roles failed; the message says which step and why."""


@dataclass(frozen=True, slots=True)
class Grant:
    """One permission of one role: ``perm`` on the keys starting with ``prefix``."""

    role: str
    perm: int
    prefix: bytes

    @property
    def range_end(self) -> bytes:
        return prefix_range_end(self.prefix)

    def describe(self) -> str:
        return f"{_PERM_NAMES[self.perm]} on {self.prefix.decode()}*"


def prefix_range_end(prefix: bytes) -> bytes:
    """The etcd ``range_end`` covering every key that starts with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"
    return stripped[:-1] + bytes([stripped[-1] + 1])


def grants(scheme: KeyScheme) -> tuple[Grant, ...]:
    """The permissions Weighbridge's roles need below ``scheme``'s prefix."""
    return (
        Grant(CONTROLLER, rpc.Permission.READWRITE, scheme.prefix.encode()),
        Grant(PROXY, rpc.Permission.READ, scheme.services_prefix),
        Grant(PROXY, rpc.Permission.READWRITE, scheme.proxies_prefix),
    )


async def setup(etcd: aetcd.Client, scheme: KeyScheme) -> list[str]:
    """Create the roles and users (certificate CNs) Weighbridge needs, grant what is missing,
    and enable auth; returns one line per thing done or found done. Once auth is enabled it
    must run with root's certificate (CN ``root``)."""
    await etcd.connect()
    auth = _Auth(rpc.AuthStub(etcd.channel), etcd.metadata, etcd._timeout)
    done: list[str] = []
    enabled = (
        await auth.call("reading auth status", "AuthStatus", rpc.AuthStatusRequest())
    ).enabled
    roles = set((await auth.call("listing roles", "RoleList", rpc.AuthRoleListRequest())).roles)
    users = set((await auth.call("listing users", "UserList", rpc.AuthUserListRequest())).users)

    for role in (CONTROLLER, PROXY):
        if role not in roles:
            await auth.call(f"adding role {role}", "RoleAdd", rpc.AuthRoleAddRequest(name=role))
            done.append(f"role {role}: created")
        have = (
            await auth.call(f"reading role {role}", "RoleGet", rpc.AuthRoleGetRequest(role=role))
        ).perm
        for grant in (g for g in grants(scheme) if g.role == role):
            if any(
                p.permType == grant.perm
                and p.key == grant.prefix
                and p.range_end == grant.range_end
                for p in have
            ):
                done.append(f"role {role}: has {grant.describe()}")
                continue
            perm = rpc.Permission(permType=grant.perm, key=grant.prefix, range_end=grant.range_end)
            await auth.call(
                f"granting {role} {grant.describe()}",
                "RoleGrantPermission",
                rpc.AuthRoleGrantPermissionRequest(name=role, perm=perm),
            )
            done.append(f"role {role}: granted {grant.describe()}")

    for user in (CONTROLLER, PROXY, ROOT):
        if user not in users:
            # No password: these users authenticate only by a client certificate's CN.
            await auth.call(
                f"adding user {user}",
                "UserAdd",
                rpc.AuthUserAddRequest(name=user, options=rpc.UserAddOptions(no_password=True)),
            )
            done.append(f"user {user}: created (no password; its client certificate's CN)")
        have_roles = (
            await auth.call(f"reading user {user}", "UserGet", rpc.AuthUserGetRequest(name=user))
        ).roles
        role = ROOT if user == ROOT else user
        if role in have_roles:
            done.append(f"user {user}: has role {role}")
        else:
            await auth.call(
                f"granting user {user} role {role}",
                "UserGrantRole",
                rpc.AuthUserGrantRoleRequest(user=user, role=role),
            )
            done.append(f"user {user}: granted role {role}")

    if enabled:
        done.append("auth: already enabled")
    else:
        await auth.call("enabling auth", "AuthEnable", rpc.AuthEnableRequest())
        done.append("auth: enabled")
    return done


@dataclass(frozen=True, slots=True)
class _Auth:
    stub: Any
    metadata: Any
    timeout: float | None

    async def call(self, what: str, method: str, request: Any) -> Any:
        try:
            return await getattr(self.stub, method)(
                request, timeout=self.timeout, metadata=self.metadata
            )
        except grpc.aio.AioRpcError as exc:
            hint = ""
            if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                hint = " (with auth enabled, run it with root's client certificate: CN root)"
            elif exc.code() is grpc.StatusCode.UNAVAILABLE:
                hint = " (is etcd reachable, and are --etcd-cacert/--etcd-cert/--etcd-key right?)"
            raise EtcdAuthError(
                f"{what}: etcd answered {exc.code().name}: {exc.details()}{hint}"
            ) from exc
