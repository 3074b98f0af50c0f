"""One-time setup of a Prefect server for mlcls fan-out.

    python -m flows.setup                     # against PREFECT_API_URL

Creates (idempotently) the automation that marks a flow run `Crashed` when
its heartbeats stop: a worker whose machine dies leaves its run `Running`
forever otherwise, and `tag-images` re-submits only runs that ended. This is
Prefect's documented zombie detection; it needs `PREFECT_FLOWS_HEARTBEAT_FREQUENCY`
(seconds, at least 30) set where the workers run.
"""

from __future__ import annotations

import argparse
from datetime import timedelta

ZOMBIE_AUTOMATION = "mlcls: crash zombie flow runs"


def ensure_zombie_automation(within_seconds: float = 90.0) -> str:
    """Create the zombie-run automation unless one of that name exists; return its id."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    try:
        return str(Automation.read(name=ZOMBIE_AUTOMATION).id)
    except ValueError:
        pass
    automation = Automation(
        name=ZOMBIE_AUTOMATION,
        description="A flow run that stops sending heartbeats is marked Crashed (mlcls re-submits its shards).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_seconds),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message="No heartbeat: the run's machine or "
                                    "worker went away")],
    )
    return str(automation.create().id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--within", type=float, default=90.0,
                        help="seconds without a heartbeat before a run is marked Crashed (default 90)")
    args = parser.parse_args()
    print(f"automation {ZOMBIE_AUTOMATION!r}: {ensure_zombie_automation(args.within)}")


if __name__ == "__main__":
    main()
