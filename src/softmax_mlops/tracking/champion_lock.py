"""The lock around the @champion decision, so that two challengers finishing together cannot both win.

MLflow aliases have no compare-and-set: two export stages that each read the same champion, each find
themselves better, and each move @champion, leave it on whichever wrote last, which may be the worse one. A
sweep's children finish at about the same moment, so this is the normal case there, not a rare one.

The decision (read the champion, score it, move the alias) is therefore serialized with a Prefect global
concurrency limit of one slot, named in params.yaml (`export.champion_lock`), whenever a Prefect API is
configured (PREFECT_API_URL, as in every flow run of a worker). The limit is created when missing; one that
exists with more than one slot, or inactive, is refused, since it would no longer be a lock. The slot is a
lease: a holder killed with SIGKILL frees it when the lease ends, never holding the registry for good.

Without a Prefect API (`dvc repro` on a laptop, the ephemeral `softmax-mlops pipeline`), there is no lock:
DVC's own repository lock already lets one stage at a time run in a project.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress

from ..errors import PipelineError, first_line

LEASE_S = 300.0  # the slot returns to the pool this long after its holder is gone without releasing it


def prefect_api_url() -> str | None:
    """The Prefect API the current settings name (environment or profile), None without one."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


@contextmanager
def champion_lock(name: str, timeout_s: float) -> Iterator[None]:
    """Hold the one slot of the Prefect global concurrency limit ``name`` around the block, waiting at most
    ``timeout_s`` for it; without a Prefect API, hold nothing."""
    url = prefect_api_url()
    if url is None:
        yield
        return
    from prefect.concurrency.sync import concurrency

    _ensure_one_slot(name, url)
    with ExitStack() as stack:
        try:
            stack.enter_context(
                concurrency(name, occupy=1, timeout_seconds=timeout_s, lease_duration=LEASE_S, strict=True)
            )
        except TimeoutError:
            raise PipelineError(f"the champion lock {name!r} at {url} stayed taken for {timeout_s:g} s") from None
        except Exception as exc:  # noqa: BLE001 - httpx, Prefect and OS errors alike end as one line
            raise PipelineError(f"cannot take the champion lock {name!r} at {url}: {first_line(exc)}") from None
        yield


def _ensure_one_slot(name: str, url: str) -> None:
    """Create the limit with one slot if it is missing (two creators racing both succeed), and refuse one that
    would not serialize."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            try:  # read first: a create that meets an existing limit logs a traceback on the Prefect server
                limit = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                with suppress(ObjectAlreadyExists):
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
                limit = client.read_global_concurrency_limit_by_name(name)
    except Exception as exc:  # noqa: BLE001 - an unreachable or refusing API is one line naming it
        raise PipelineError(f"cannot reach the champion lock {name!r} at {url}: {first_line(exc)}") from None
    if limit.limit != 1 or not limit.active:
        state = f"{limit.limit} slot(s)" + ("" if limit.active else ", inactive")
        raise PipelineError(
            f"the Prefect concurrency limit {name!r} at {url} has {state}: the champion lock needs one active slot"
        )
