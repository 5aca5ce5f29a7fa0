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
group's runs only; the operator's ``[ops] admin_token`` opens it for every run.

Where there are several groups, each has places of its own: peers (``server.max_clients``)
and active runs (``server.max_runs``) are split between the groups (:meth:`Groups.shares`),
so one group's clients, however many or hostile, can fill only their own group's places."""

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
    # group -> {"max_clients": N, "max_runs": N}: what the group set itself
    quotas: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], where: str = "server.groups") -> Groups:
        """``{GROUP: [NAME, ...]}`` or ``{GROUP: {members = [NAME, ...], token = "FILE"}}``;
        each name in one group at most."""
        by_name: dict[str, str] = {}
        tokens: dict[str, str] = {}
        quotas: dict[str, dict[str, int]] = {}
        for group, entry in raw.items():
            at = f"{where}.{group}"
            if not is_run_id(str(group)):
                raise ConfigError(
                    f"{at}: a group name is 1-64 letters, digits, '_', '.', '-' starting with a "
                    "letter or digit, and not 'runs.json' (the runs folder's index)"
                )
            members, token, quotas[str(group)] = _entry(entry, at)
            for name in members:
                if name in by_name:
                    raise ConfigError(
                        f"{at} lists {name!r}, which {where}.{by_name[name]} lists already; "
                        "a client belongs to one group"
                    )
                by_name[name] = str(group)
            if token:
                tokens[str(group)] = token
        return cls(by_name, tokens, configured=bool(raw), quotas=quotas)

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

    def shares(self, total: int, key: str) -> dict[str, int]:
        """Each group's places of the server's ``total`` (``key``: ``max_clients`` or
        ``max_runs``), by :meth:`namespace`; {}: one pool of ``total`` (no group says more).

        A group that sets ``key`` gets that many; the places left are split between the
        others evenly, none given more than it has members (a member is one peer and starts
        one run at a time: more would stand idle), what one does not need going to the rest.
        The shares add up to ``total`` at most, so each group's places are its own whatever
        the other groups do; a group left with none stops the server at start."""
        members = {g: list(self.by_name.values()).count(g) for g in set(self.by_name.values())}
        own = {g: q[key] for g, q in self.quotas.items() if key in q and g in members}
        if not self.several:  # one group: the server's places, or fewer where it says so
            return {ONE_GROUP: min(total, *own.values())} if own else {}
        if sum(own.values()) > total:
            raise ConfigError(
                f"server.groups: the groups' {key} add up to {sum(own.values())}, over "
                f"server.{key} = {total}; raise server.{key} or lower a group's {key}"
            )
        rest = sorted((g for g in members if g not in own), key=lambda g: (members[g], g))
        left = total - sum(own.values())
        if len(rest) > left:
            raise ConfigError(
                f"server.groups: {len(rest)} groups without {key} of their own share the "
                f"{left} place(s) server.{key} = {total} leaves them, one each at least; raise "
                f"server.{key}, or set each group's {key}"
            )
        shares = dict(own)
        for i, group in enumerate(rest):  # the smallest first: what it leaves goes on
            shares[group] = min(members[group], left // (len(rest) - i))
            left -= shares[group]
        return shares

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


QUOTA_KEYS = ("max_clients", "max_runs")  # a group's own share of the server's places


def _entry(entry: Any, at: str) -> tuple[list[str], str, dict[str, int]]:
    token, quotas = "", {}
    if isinstance(entry, Mapping):
        unknown = sorted(set(entry) - {"members", "token", *QUOTA_KEYS})
        if unknown:
            raise ConfigError(
                f"unknown key '{at}.{unknown[0]}'; valid keys here: members, token, "
                + ", ".join(QUOTA_KEYS)
            )
        token = entry.get("token", "")
        if not isinstance(token, str):
            raise ConfigError(f"{at}.token must be a string (a token file), got {token!r}")
        for key in QUOTA_KEYS:
            value = entry.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{at}.{key} must be a whole number of places, got {value!r}")
            if value is not None and value < 1:
                raise ConfigError(f"{at}.{key} = {value} must be at least 1")
            if value is not None:
                quotas[key] = value
        entry = entry.get("members", [])
    if not isinstance(entry, list) or not entry or not all(isinstance(n, str) for n in entry):
        raise ConfigError(
            f'{at} must list the group\'s client names, e.g. ["client-1", "client-2"] '
            '(or be a table with members = [...] and token = "FILE"), got '
            f"{entry!r}"
        )
    return list(entry), token, quotas


__all__ = ["ONE_GROUP", "QUOTA_KEYS", "SEPARATOR", "Groups", "qualify"]
