"""A producer in a process of its own, so a scenario can kill it.

``python -m chaos.produce CHANNEL_ID AUTHOR_ID COUNT`` sends COUNT messages
in one transaction through ``AsyncProducer.send_many`` with the dispatcher
``CHANNELS_DISPATCHER`` names, and prints the message ids if it lives.
"""

from __future__ import annotations

import asyncio
import json
import sys

from channels_core import db
from producer import AsyncProducer


async def main(channel_id: int, author_id: int, count: int) -> None:
    dispatches = await AsyncProducer().send_many(
        [{"content": f"chaos {i}", "author_id": author_id} for i in range(count)], channel_id
    )
    print(json.dumps([d.message_id for d in dispatches]), flush=True)
    await db.dispose()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
