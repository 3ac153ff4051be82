"""Commands on the queues: `request` (one job, its reply printed) and `dead-letters`."""

from __future__ import annotations

import argparse
import json
import sys
import uuid

from worker.commands import ExitCode
from worker.dead_letters import list_dead_letters, replay_dead_letters
from worker.publisher import ConfirmedPublisher
from worker.requester import connect_first, request_export
from worker.settings import Settings
from worker.topology import dead_letter_queue


async def request(settings: Settings, args: argparse.Namespace) -> int:
    job = {
        "job_id": args.job_id or f"cli-{uuid.uuid4().hex[:12]}",
        "vm_id": args.vm_id,
        "vm_name": args.vm_name,
        "disk_unit_number": args.disk,
    }
    if args.device:
        job["device_path"] = args.device
    else:
        job["volume_id"] = args.volume
    try:
        reply = await request_export(
            settings.amqp_urls, settings.request_queue, job, timeout_s=args.timeout
        )
    except TimeoutError:
        print(f"no reply within {args.timeout:g} s (is the worker running?)", file=sys.stderr)
        return ExitCode.TIMEOUT
    print(json.dumps(reply, indent=2))
    return ExitCode.OK if reply.get("status") == "ready" else ExitCode.FAILURE


async def dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    dead_queue = dead_letter_queue(settings.request_queue)
    connection = await connect_first(settings.amqp_urls, settings.amqp_connect_timeout_s)
    async with connection:
        channel = await connection.channel()
        if args.replay:
            publisher = ConfirmedPublisher(
                connection,
                timeout_s=settings.publish_timeout_s,
                retry_s=settings.publish_retry_s,
            )
            letters = await replay_dead_letters(
                channel, publisher, dead_queue, settings.request_queue, args.limit
            )
            await publisher.close()
        else:
            letters = await list_dead_letters(channel, dead_queue, args.limit)
    if args.json:
        print(json.dumps([letter.as_dict() for letter in letters], indent=2))
    else:
        for letter in letters:
            print(f"{letter.reason:16} job_id={letter.job_id} body={letter.preview!r}")
        if args.replay:
            print(
                f"{len(letters)} dead letter(s) replayed from {dead_queue} "
                f"to {settings.request_queue}"
            )
        else:
            print(f"{len(letters)} dead letter(s) in {dead_queue} (left in place)")
    return ExitCode.OK
