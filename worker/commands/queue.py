"""Commands on the queues: `request` (one job, its reply printed) and `dead-letters`."""

from __future__ import annotations

import argparse
import json
import sys
import uuid

import aio_pika
from pydantic import BaseModel, ValidationError

from worker.client import (
    ClientError,
    ExportError,
    NotPublished,
    ReplyTimeout,
    SchedulerClient,
)
from worker.commands import ExitCode
from worker.dead_letters import list_dead_letters, replay_dead_letters
from worker.messages import ExportReady
from worker.publisher import ConfirmedPublisher
from worker.replies import describe_validation_error
from worker.requester import connect_first
from worker.settings import Settings
from worker.topology import dead_letter_queue


async def request(settings: Settings, args: argparse.Namespace) -> int:
    """Prints the reply (an error reply too: exit 1); exit 4 when none comes in time."""
    try:
        client = await SchedulerClient.connect(
            settings.amqp_urls,
            exchange=settings.exchange,
            request_queue=settings.request_queue,
            timeout_s=args.timeout,
        )
    except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
        print(f"error: no broker answered: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    async with client:
        try:
            reply: BaseModel = await client.prepare(
                args.vm_id,
                args.disk,
                vm_name=args.vm_name,
                device_path=args.device,
                volume_id=args.volume,
                job_id=args.job_id or f"cli-{uuid.uuid4().hex[:12]}",
            )
        except ValidationError as exc:
            # Refused before publishing, as the worker would have refused it.
            print(f"invalid request: {describe_validation_error(exc)}", file=sys.stderr)
            return ExitCode.FAILURE
        except ReplyTimeout:
            print(f"no reply within {args.timeout:g} s (is the worker running?)", file=sys.stderr)
            return ExitCode.TIMEOUT
        except NotPublished as exc:
            # No reply will come: the exit code of a timeout, as before the client refused
            # unroutable jobs at once.
            print(f"not published: {exc} (is the worker running?)", file=sys.stderr)
            return ExitCode.TIMEOUT
        except ExportError as exc:
            reply = exc.reply
        except ClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return ExitCode.FAILURE
    print(json.dumps(reply.model_dump(mode="json"), indent=2))
    return ExitCode.OK if isinstance(reply, ExportReady) else ExitCode.FAILURE


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
