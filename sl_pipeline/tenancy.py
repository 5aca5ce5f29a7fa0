"""Run membership on a server shared by several projects: ``[server] groups``.

A group is a set of admitted names (the clients and relays of one project). A run belongs to
the group of the peer whose first training message started it, and its id is looked up only
within the asking peer's group: to a peer of another group, a run it may not join is a run
that does not exist (the same answers, by the same code path: no oracle for guessing ids),
and naming that id starts a run of its own group. Two groups may therefore both have a
``run-1``; the server tells them apart by the qualified id ``GROUP:RUN`` (``runs list``, the
runs folder, the metrics). Where there is one group (what ``init`` and ``provision`` write:
every client of the project), or none (every admitted name in one), run ids stay
unqualified, as before groups existed.

A group may name a token file: that token opens the run API (``sl-pipeline runs``) for the
group's runs only; the operator's ``[ops] admin_token`` opens it for every run."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sl_pipeline.errors import ConfigError
from sl_pipeline.runid import is_run_id

ONE_GROUP = ""  # the group of every name on a server without [server] groups
SEPARATOR = ":"  # GROUP:RUN; no run id or group name holds it


@dataclass(frozen=True)
class Groups:
    """Who may train with whom: each member name's group, and each group's token file."""

    by_name: Mapping[str, str] = field(default_factory=dict)  # member name -> its group
    tokens: Mapping[str, str] = field(default_factory=dict)  # group -> its token file
    configured: bool = False

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], where: str = "server.groups") -> Groups:
        """``{GROUP: [NAME, ...]}`` or ``{GROUP: {members = [NAME, ...], token = "FILE"}}``;
        each name in one group at most."""
        by_name: dict[str, str] = {}
        tokens: dict[str, str] = {}
        for group, entry in raw.items():
            at = f"{where}.{group}"
            if not is_run_id(str(group)):
                raise ConfigError(
                    f"{at}: a group name is 1-64 letters, digits, '_', '.', '-' starting with a "
                    "letter or digit, and not 'runs.json' (the runs folder's index)"
                )
            members, token = _entry(entry, at)
            for name in members:
                if name in by_name:
                    raise ConfigError(
                        f"{at} lists {name!r}, which {where}.{by_name[name]} lists already; "
                        "a client belongs to one group"
                    )
                by_name[name] = str(group)
            if token:
                tokens[str(group)] = token
        return cls(by_name, tokens, configured=bool(raw))

    @classmethod
    def for_server(
        cls, raw: Mapping[str, Any], admitted: Iterable[str] | None, together: Iterable[str]
    ) -> Groups:
        """A server's groups, checked against its ``admitted`` names (None: ``--insecure``,
        names are claimed, checked at each hello) and its ``server.group``."""
        groups = cls.from_config(raw)
        if admitted is not None:
            groups.check_admitted(admitted)
        groups.check_together(together, "server.group")
        return groups

    def group_of(self, name: str) -> str | None:
        """The group whose runs ``name`` (an admitted name) may see, as runs are kept
        (:meth:`namespace`); None: it is in no group, so it may see none."""
        if not self.configured:
            return ONE_GROUP
        group = self.by_name.get(name)
        return None if group is None else self.namespace(group)

    def namespace(self, group: str) -> str:
        """Where ``group``'s runs are kept: under its name, or unqualified (ONE_GROUP) where
        it is the only group, since every admitted name is then in it."""
        return group if self.several else ONE_GROUP

    @property
    def several(self) -> bool:
        """More than one group: their runs are kept apart (ids qualified)."""
        return len(set(self.by_name.values())) > 1

    def check_admitted(self, admitted: Iterable[str], where: str = "server.groups") -> None:
        """Every admitted name is in a group and every member is admitted (a typo would
        leave a client out of its project's runs, found only when it trains)."""
        if not self.configured:
            return
        names = set(admitted)
        if stray := sorted(names - set(self.by_name)):
            raise ConfigError(
                f"{where} puts no group around {stray[0]!r}, which server.admitted admits; "
                "add it to its project's group (a client in no group can train in no run)"
            )
        if unknown := sorted(set(self.by_name) - names):
            raise ConfigError(
                f"{where}.{self.by_name[unknown[0]]} lists {unknown[0]!r}, which "
                "server.admitted does not admit; admit its key or remove the name"
            )

    def check_together(self, names: Iterable[str], where: str) -> None:
        """The ``names`` (the members of one SplitFed or round-robin group) train in one
        run, so they must be one group's."""
        groups = sorted({self.by_name.get(n, "") for n in names} - {""})
        if self.configured and len(groups) > 1:
            raise ConfigError(
                f"{where} names clients of the groups {', '.join(groups)} of server.groups; "
                "its members train in one run, so they must be one group's"
            )


def qualify(group: str, run_id: str) -> str:
    """The server-wide id of run ``run_id`` of ``group``."""
    return f"{group}{SEPARATOR}{run_id}" if group else run_id


def _entry(entry: Any, at: str) -> tuple[list[str], str]:
    token = ""
    if isinstance(entry, Mapping):
        unknown = sorted(set(entry) - {"members", "token"})
        if unknown:
            raise ConfigError(f"unknown key '{at}.{unknown[0]}'; valid keys here: members, token")
        token = entry.get("token", "")
        if not isinstance(token, str):
            raise ConfigError(f"{at}.token must be a string (a token file), got {token!r}")
        entry = entry.get("members", [])
    if not isinstance(entry, list) or not entry or not all(isinstance(n, str) for n in entry):
        raise ConfigError(
            f'{at} must list the group\'s client names, e.g. ["client-1", "client-2"] '
            '(or be a table with members = [...] and token = "FILE"), got '
            f"{entry!r}"
        )
    return list(entry), token


__all__ = ["ONE_GROUP", "SEPARATOR", "Groups", "qualify"]
