"""Scrape a worker's ``/metrics`` as an operator's Prometheus does: with the token of the
deployment's ``keys/metrics.token`` (``[ops] metrics_token``), or without it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

TIMEOUT = aiohttp.ClientTimeout(total=5)


def metrics_token(folder: Path) -> str:
    """The token a worker of the deployment or kit in ``folder`` asks for, read as
    Prometheus's ``credentials_file`` reads it."""
    return (folder / "keys" / "metrics.token").read_text().strip()


async def scrape(url: str, token: str | None = None) -> tuple[int, str]:
    """(status, body) of one ``GET url``; status 0 while nothing listens there yet."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT) as session,
            session.get(url, headers=headers) as response,
        ):
            return response.status, await response.text()
    except aiohttp.ClientError:
        return 0, ""


async def scrape_until_finished(
    url: str, token: str | None, run: asyncio.Future[object]
) -> tuple[str, bool]:
    """Scrape as Prometheus would, until a scrape says the client finished; whether the
    run was still going on then."""
    for _ in range(3000):  # bounded: 3000 x (scrape + 20 ms)
        if run.done():
            break
        _, body = await scrape(url, token)
        if "\nsl_finished 1.0" in body:
            return body, not run.done()
        await asyncio.sleep(0.02)
    raise AssertionError("no scrape ever showed sl_finished 1")


async def listening(url: str, run: asyncio.Future[object]) -> None:
    """Wait (bounded) until something answers at ``url``; fail if ``run`` ends first."""
    for _ in range(1000):  # bounded: 1000 x (a refused connection + 20 ms)
        assert not run.done(), f"the run ended before {url} answered"
        if (await scrape(url))[0]:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"nothing answered at {url}")
