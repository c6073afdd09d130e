"""tests/engine/test_statuses.py on the cluster, over the HTTP API: every account and transfer
status, idempotency (exists and every exists_with_different_*), linked chains, holds posted in
full, in part and voided, expired. Two answers differ by design, and are checked here as the
cluster gives them."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Api, Ids
from tests.engine.test_statuses import *  # noqa: F403 - the module's tests and fixtures, run here
from tests.engine.test_statuses import World, accounts, bal, statuses, tr

pytestmark = pytest.mark.citus

# On a cluster a transfer id is checked within its ledger (engine/store.py, Store): a read of
# every shard per batch would tie every ledger to every worker.
ONE_SERVER_ONLY = {
    "test_exists_with_different[ledger]": "a transfer id is checked within its ledger",
    "test_pending_transfer_has_different[ledger]": "a transfer id is checked within its ledger",
}


async def test_a_transfer_id_is_checked_within_its_ledger(
    http: httpx.AsyncClient, api: Api, world: World, ids: Ids
) -> None:
    """What the cluster answers where one server says exists_with_different_ledger and
    pending_transfer_has_different_ledger: the other ledger has no transfer of that id."""
    w = world
    ledger = ids.ledger()
    bank, purse = ids.accounts(2)
    assert await accounts(http, api, [
        {"id": bank, "ledger": ledger, "kind": "clearing", "code": 1},
        {"id": purse, "ledger": ledger, "kind": "purse", "code": 1},
    ]) == ["created"] * 2
    hold = tr(w.ledger, w.purse, w.canteen, 300, flags=["pending"], timeout_s=600)
    assert await statuses(http, api, [hold]) == ["created"]
    post_it = tr(ledger, 0, 0, 0, pending_id=hold["id"], flags=["post_pending"])
    assert await statuses(http, api, [post_it]) == ["pending_transfer_not_found"]
    again = {**tr(ledger, bank, purse, 300), "id": hold["id"]}  # the same id, another ledger
    assert await statuses(http, api, [again]) == ["created"]
    # within its own ledger the id is as unique as anywhere
    assert await statuses(http, api, [hold]) == ["exists"]
    assert await statuses(http, api, [again]) == ["exists"]
    assert await bal(http, api, purse) == (300, 300)
