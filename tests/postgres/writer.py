"""A leader process for the pause tests: `python -m tests.postgres.writer URL NODE TAKEOVER`.

It takes part in leadership on the shared store (patchd.state.shared.Ha) and, while it
leads, journals one row after another as fast as it can. It prints one line per event on
stdout, flushed at once, so the test knows what it did:

    leader EPOCH            it became the leader
    wrote STEP EPOCH        record() of STEP returned (so STEP must be in the database)
    refused STEP REASON     record() of STEP raised NotLeader (so it must NOT be there)
    standby EPOCH REASON    it stepped down

It ends 2 s after it stepped down (or a write was refused), releasing nothing (it holds
nothing by then).
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime, timedelta

from patchd.config.schema import HaModel, StateModel
from patchd.state.leader import Change, NotLeader, Role
from patchd.state.shared import Ha, open_shared
from patchd.states import TargetState


def say(*words: object) -> None:
    print(*words, flush=True)


DOWN: list[float] = []  # when it stepped down


def on_change(change: Change) -> None:
    if change.role is Role.LEADER:
        say("leader", change.epoch)
    else:
        DOWN.append(time.monotonic())
        say("standby", change.epoch, change.reason.replace("\n", " "))


def main(url: str, node: str, takeover: float) -> None:
    store = open_shared(StateModel(url=url, outage_wait=timedelta(seconds=10)))
    ha = Ha.start(store, HaModel(node=node, takeover=timedelta(seconds=takeover)), on_change)
    run = f"run-{node}"
    started = False
    n = 0
    try:
        while not DOWN or time.monotonic() - DOWN[0] < 2:
            if not ha.may_act():
                time.sleep(0.01)
                continue
            at = datetime.now(UTC)
            step = f"{node}-{n}"
            try:
                if not started:
                    store.start_run(run, "web", None, at)
                    started = True
                store.record(run, "t", "t", TargetState.APPLYING, at, step=step, phase="p")
            except NotLeader as err:
                say("refused", step, str(err).replace("\n", " "))
                DOWN.append(time.monotonic())
                continue
            finally:
                n += 1
            say("wrote", step, ha.status().epoch)
    finally:
        ha.stop()
        store.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
