"""``python -m chaos.run [--quick] [--only NAME[,NAME]] [--keep]``: the fault-injection table.

Runs every scenario (or those named) against the embedded PostgreSQL and
Valkey under a temporary ``CHANNELS_HOME`` of its own, so a developer's
``./.channels`` and other test runs are never touched, and prints one line
per scenario::

    scenario accepted=N delivered=N dead=N lost=0 dup_after_dedupe=0 dup_raw=K settle_s=T

followed by the checks a scenario failed and notes worth knowing. Exits 1
when any scenario has lost or duplicated anything or failed a check.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

# Before anything reads settings: the chaos run's own home and servers. A
# configured database or broker is ignored on purpose: scenarios restart the
# servers, which only the embedded ones allow.
_HOME = Path(tempfile.mkdtemp(prefix="channels-chaos-"))
os.environ["CHANNELS_HOME"] = str(_HOME)
os.environ["CHANNELS_EGRESS_ALLOW_CIDRS"] = "127.0.0.0/8"
for _var in (
    "CHANNELS_DATABASE_URL",
    "CHANNELS_BROKER_URL",
    "CHANNELS_QUEUE_URL",
    "CHANNELS_DISPATCHER",
):
    os.environ.pop(_var, None)

from channels_core import embedded  # noqa: E402
from channels_core.settings import configure  # noqa: E402
from chaos.ledger import Result  # noqa: E402
from chaos.receivers import FaultySmtp  # noqa: E402
from chaos.scenarios import SCENARIOS, Scenario  # noqa: E402
from chaos.stack import Chaos, Crew, Scene, boot  # noqa: E402
from chaos.world import World, new_api_loop  # noqa: E402


def run_one(chaos: Chaos, scenario: Scenario, quick: bool, smtp: FaultySmtp, crew: Crew) -> Result:
    started = time.monotonic()
    chaos.ensure_servers()
    if not scenario.shared and crew.running():
        crew.stop()  # a scenario with workers of its own has the broker to itself
    chaos.reset(flush=not crew.running())
    smtp.rearm(busy_first=scenario.smtp_busy)
    scene = Scene.open(chaos, scenario.name, smtp_port=smtp.port, tuning=scenario.tuning)
    api = new_api_loop()
    world = World(chaos, scene, quick, api, smtp=smtp, crew=crew if scenario.shared else None)
    try:
        result = scenario.run(world)
    except Exception as exc:
        result = Result(scenario.name)
        result.failures.append(f"scenario error: {type(exc).__name__}: {exc}")
        result.notes.append(traceback.format_exc(limit=4).replace("\n", " | ")[-600:])
    finally:
        world.close()
        scene.close()
        api.stop()
        # A scenario that stopped a server leaves it running again for the next.
        chaos.ensure_servers()
    shared = "shared worker and beat" if scenario.shared else "own worker and beat"
    result.notes.append(f"{time.monotonic() - started:.0f}s wall ({shared})")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chaos.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="each scenario at small size")
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--keep", action="store_true", help="keep the chaos home and its logs")
    args = parser.parse_args(argv)
    known = {s.name: s for s in SCENARIOS}
    wanted = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; known: {', '.join(known)}")
    chosen = [known[n] for n in wanted] if wanted else SCENARIOS

    started = time.monotonic()
    results: list[Result] = []
    # The scenarios that share a worker and beat first, one after the other.
    order = [s for s in chosen if s.shared] + [s for s in chosen if not s.shared]
    chaos: Chaos | None = None
    smtp: FaultySmtp | None = None
    crew: Crew | None = None
    try:
        chaos = boot(_HOME)
        print(f"chaos home {_HOME} ({'quick' if args.quick else 'full'} run)", flush=True)
        smtp = FaultySmtp().start()
        crew = Crew(Scene.open(chaos, "shared", smtp_port=smtp.port))
        for scenario in order:
            result = run_one(chaos, scenario, args.quick, smtp, crew)
            results.append(result)
            print(result.line(), flush=True)
            for failure in result.failures:
                print(f"    FAIL {failure}", flush=True)
            for note in result.notes:
                print(f"    note {note}", flush=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        if crew is not None:
            crew.stop()
        if smtp is not None:
            smtp.stop()
        if chaos is not None:
            chaos.close()
        configure(None)
        embedded.stop()
        if args.keep:
            print(f"kept {_HOME}")
        else:
            shutil.rmtree(_HOME, ignore_errors=True)
    rank = {s.name: i for i, s in enumerate(SCENARIOS)}
    results.sort(key=lambda r: rank.get(r.scenario, len(rank)))
    print()
    for result in results:
        print(result.line())
    failed = [r.scenario for r in results if not r.ok and not r.skipped]
    print(
        f"{len(results)} scenarios in {time.monotonic() - started:.0f}s; "
        + (f"failing: {', '.join(failed)}" if failed else "none failing")
    )
    return 1 if failed or len(results) < len(chosen) else 0


if __name__ == "__main__":
    sys.exit(main())
